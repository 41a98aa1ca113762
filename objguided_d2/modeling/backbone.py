"""ResNet encoder with the paper's top-down "B" decoder (Yi et al., TMI 2021, Sec. II-A, Fig. 1).

detectron2's ResNet is kept intact as ``bottom_up`` so that detectron2 / torchvision-converted
ImageNet weights load unchanged; the decoder fuses res5 into res4, res3 and res2 with
:class:`.fusion.FusionBlock`, the same block the mask branch uses (with instance norm) as its "S"
module.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import ResNet, build_resnet_backbone

from .fusion import FusionBlock

__all__ = ["ObjGuidedBackbone", "build_objguided_resnet_backbone"]


class ObjGuidedBackbone(Backbone):
    """ResNet + three top-down fusion blocks.

    Outputs (strides for a ResNet without dilation):

    * ``"stem"``: conv1 + norm + ReLU, before the max-pool (stride 2, STEM_OUT_CHANNELS channels);
    * ``"dec16"`` = B(res5, res4), ``"dec8"`` = B(dec16, res3), ``"dec4"`` = B(dec8, res2).
    """

    def __init__(self, bottom_up: ResNet, *, decoder_channels: Sequence[int], norm: str):
        """
        Args:
            bottom_up: a detectron2 ResNet whose out_features include res2..res5.
            decoder_channels: output channels of dec16, dec8, dec4.
            norm: norm of the fusion blocks (see :func:`.fusion.build_fusion_norm`).
        """
        super().__init__()
        if len(decoder_channels) != 3:
            raise ValueError(
                f"decoder_channels needs one entry per stride (16, 8, 4), got {decoder_channels}"
            )
        self.bottom_up = bottom_up
        stages = bottom_up.output_shape()
        c16, c8, c4 = decoder_channels
        self.dec16 = FusionBlock(stages["res5"].channels, stages["res4"].channels, c16, norm)
        self.dec8 = FusionBlock(c16, stages["res3"].channels, c8, norm)
        self.dec4 = FusionBlock(c8, stages["res2"].channels, c4, norm)

        stem_conv = bottom_up.stem.conv1
        self._out_features = ["stem", "dec4", "dec8", "dec16"]
        self._out_feature_channels = {
            "stem": stem_conv.out_channels,
            "dec4": c4,
            "dec8": c8,
            "dec16": c16,
        }
        self._out_feature_strides = {
            "stem": stem_conv.stride[0],
            "dec4": stages["res2"].stride,
            "dec8": stages["res3"].stride,
            "dec16": stages["res4"].stride,
        }

    @property
    def size_divisibility(self) -> int:
        # res5 is at stride 32 and is upsampled onto res4: sizes must halve exactly five times.
        return 32

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            x: (N, C, H, W) normalized images, H and W divisible by 32.

        Returns:
            dict of "stem" (N, 64, H/2, W/2), "dec4", "dec8", "dec16" (N, C_s, H/s, W/s).
        """
        # The stem is run step by step because its output before the max-pool is a feature.
        stem = F.relu_(self.bottom_up.stem.conv1(x))
        x = F.max_pool2d(stem, kernel_size=3, stride=2, padding=1)
        res = {}
        for name, stage in zip(self.bottom_up.stage_names, self.bottom_up.stages):
            x = stage(x)
            res[name] = x
        dec16 = self.dec16(res["res5"], res["res4"])
        dec8 = self.dec8(dec16, res["res3"])
        dec4 = self.dec4(dec8, res["res2"])
        return {"stem": stem, "dec4": dec4, "dec8": dec8, "dec16": dec16}


@BACKBONE_REGISTRY.register()
def build_objguided_resnet_backbone(cfg, input_shape: ShapeSpec) -> ObjGuidedBackbone:
    """Build the ResNet of MODEL.RESNETS (depth 18/34/50/101, its norm, MODEL.BACKBONE.FREEZE_AT)
    and the decoder of MODEL.OBJGUIDED (DECODER_CHANNELS, DECODER_NORM).
    """
    resnet_cfg = cfg.clone()
    resnet_cfg.defrost()
    resnet_cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    if resnet_cfg.MODEL.RESNETS.DEPTH in (18, 34):
        # detectron2's default (256) is for bottleneck ResNets; basic-block ones need 64.
        resnet_cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    bottom_up = build_resnet_backbone(resnet_cfg, input_shape)

    decoder_channels = cfg.MODEL.OBJGUIDED.DECODER_CHANNELS
    if not decoder_channels:
        stages = bottom_up.output_shape()
        decoder_channels = [stages[name].channels for name in ("res4", "res3", "res2")]
    return ObjGuidedBackbone(
        bottom_up, decoder_channels=decoder_channels, norm=cfg.MODEL.OBJGUIDED.DECODER_NORM
    )
