"""ResNet encoder with the paper's top-down "B" decoder (Yi et al., TMI 2021, Sec. II-A, Fig. 1).

detectron2's ResNet is kept intact as ``bottom_up`` so that detectron2 / torchvision-converted
ImageNet weights load unchanged; the decoder fuses res5 into res4, res3 and res2 with
:class:`FusionBlock`, the same block the mask branch reuses (with instance norm) as its "S" module.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import ResNet, build_resnet_backbone
from torch import nn

__all__ = [
    "FusionBlock",
    "ObjGuidedBackbone",
    "build_fusion_norm",
    "build_objguided_resnet_backbone",
]


def build_fusion_norm(norm: str, channels: int) -> nn.Module:
    """Norm layer of a :class:`FusionBlock`.

    Args:
        norm: a name of detectron2's :func:`get_norm` ("BN", "GN", "SyncBN", "FrozenBN", ...),
            "" for none, "IN" for instance norm without parameters or running statistics (the
            authors' "S" module) or "IN_AFFINE" for instance norm with the learnable gamma / eta of
            the paper's Eq. 6.
        channels: number of channels it normalizes.
    """
    if norm == "IN":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if norm == "IN_AFFINE":
        return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)
    return get_norm(norm, channels) or nn.Identity()


class FusionBlock(nn.Module):
    """Fuse a deep map into a shallower skip map (the paper's "B" and "S" modules).

    ``low`` is bilinearly upsampled to the size of ``skip``, then::

        up  = relu(norm_low(conv_low(low)))                 # 3x3, low_channels -> out_channels
        out = relu(norm_fuse(conv_fuse(cat[skip, up])))     # 1x1, skip + out -> out_channels

    With ``out_channels == skip_channels`` this is the authors' module exactly. Its pieces are the
    attributes ``conv_low`` (nn.Conv2d), ``norm_low`` (nn.Module), ``conv_fuse`` (nn.Conv2d) and
    ``norm_fuse`` (nn.Module), so a caller can run the same weights step by step (e.g. on padded
    batches of ROIs with its own masked normalization). Weights keep PyTorch's default init, as the
    authors' code does.
    """

    def __init__(self, low_channels: int, skip_channels: int, out_channels: int, norm: str):
        """
        Args:
            low_channels: channels of the deep input.
            skip_channels: channels of the shallow (skip) input.
            out_channels: channels of the output.
            norm: see :func:`build_fusion_norm`.
        """
        super().__init__()
        # Both convs keep their bias, as in the authors' module, whatever the norm.
        self.conv_low = nn.Conv2d(low_channels, out_channels, kernel_size=3, padding=1)
        self.norm_low = build_fusion_norm(norm, out_channels)
        self.conv_fuse = nn.Conv2d(skip_channels + out_channels, out_channels, kernel_size=1)
        self.norm_fuse = build_fusion_norm(norm, out_channels)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """
        Args:
            low: (N, low_channels, h, w) deep features.
            skip: (N, skip_channels, H, W) shallow features.

        Returns:
            (N, out_channels, H, W).
        """
        up = F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        up = F.relu(self.norm_low(self.conv_low(up)))
        return F.relu(self.norm_fuse(self.conv_fuse(torch.cat([skip, up], dim=1))))


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
            norm: norm of the fusion blocks (see :func:`build_fusion_norm`).
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
