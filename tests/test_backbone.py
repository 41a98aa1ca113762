"""ResNet + "B" decoder backbone: shapes, parameter counts, weight loading, freezing."""

import pickle

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from torch import nn

from objguided_d2 import add_objguided_config
from objguided_d2.modeling.backbone import ObjGuidedBackbone, build_objguided_resnet_backbone


def make_cfg(depth: int, norm: str = "BN", freeze_at: int = 0):
    cfg = get_cfg()
    add_objguided_config(cfg)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    return cfg


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def r50_backbone():
    return build_objguided_resnet_backbone(make_cfg(50), ShapeSpec(channels=3))


@pytest.mark.parametrize(
    "depth, decoder_channels",
    [
        (18, {"dec4": 64, "dec8": 128, "dec16": 256}),
        (50, {"dec4": 256, "dec8": 512, "dec16": 1024}),
    ],
)
def test_outputs_have_the_declared_shapes_and_strides(depth, decoder_channels):
    backbone = build_objguided_resnet_backbone(make_cfg(depth), ShapeSpec(channels=3))
    expected = {
        "stem": (64, 2),
        **{name: (c, int(name[3:])) for name, c in decoder_channels.items()},
    }
    shapes = backbone.output_shape()
    assert {name: (s.channels, s.stride) for name, s in shapes.items()} == expected
    assert backbone.size_divisibility == 32

    backbone.eval()
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 64, 96))
    assert set(outputs) == set(expected)
    for name, (channels, stride) in expected.items():
        assert outputs[name].shape == (1, channels, 64 // stride, 96 // stride), name


def test_r50_parameter_counts_match_the_authors(r50_backbone):
    # ResNet-50 without its classifier (torchvision's 25,557,032 minus fc's 2,049,000).
    assert num_params(r50_backbone.bottom_up) == 23_508_032
    # Each B module: 3x3 conv (low -> skip) + bias, 1x1 conv (2 skip -> skip) + bias, two BNs.
    decoder = sum(
        low * skip * 9 + skip + 2 * skip * skip + skip + 2 * (2 * skip)
        for low, skip in [(2048, 1024), (1024, 512), (512, 256)]
    )
    assert decoder == 27_535_872
    assert num_params(r50_backbone) - num_params(r50_backbone.bottom_up) == decoder


def test_decoder_channels_and_norm_come_from_the_config():
    cfg = make_cfg(18)
    cfg.MODEL.OBJGUIDED.DECODER_CHANNELS = [96, 64, 32]
    cfg.MODEL.OBJGUIDED.DECODER_NORM = "GN"
    backbone = build_objguided_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert [backbone.output_shape()[n].channels for n in ("dec16", "dec8", "dec4")] == [96, 64, 32]
    assert isinstance(backbone.dec4.norm_fuse, nn.GroupNorm)
    assert backbone.dec16.conv_low.in_channels == 512  # R-18 res5

    with pytest.raises(ValueError, match="one entry per stride"):
        ObjGuidedBackbone(backbone.bottom_up, decoder_channels=[32, 16], norm="BN")


def test_one_channel_input_runs():
    backbone = build_objguided_resnet_backbone(make_cfg(18), ShapeSpec(channels=1))
    assert backbone.bottom_up.stem.conv1.in_channels == 1
    backbone.eval()
    with torch.no_grad():
        outputs = backbone(torch.randn(2, 1, 32, 32))
    assert outputs["dec4"].shape == (2, 64, 8, 8)
    assert outputs["stem"].shape == (2, 64, 16, 16)


def test_freeze_at_freezes_the_stem_and_res2_only():
    backbone = build_objguided_resnet_backbone(make_cfg(18, freeze_at=2), ShapeSpec(channels=3))
    resnet = backbone.bottom_up.named_parameters()
    trainable = {name.split(".")[0] for name, p in resnet if p.requires_grad}
    assert trainable == {"res3", "res4", "res5"}
    assert all(p.requires_grad for name, p in backbone.named_parameters() if name.startswith("dec"))


def test_stem_feature_is_conv1_before_the_max_pool():
    backbone = build_objguided_resnet_backbone(make_cfg(18), ShapeSpec(channels=3)).eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = torch.relu(backbone.bottom_up.stem.conv1(image))
        assert torch.equal(backbone(image)["stem"], expected)


def test_imagenet_resnet_weights_load_by_name(tmp_path, r50_backbone):
    """A detectron2 ImageNet R-50 file (keys "stem.conv1.weight", "res2.0.conv1.weight", ...) fills
    every ResNet weight through DetectionCheckpointer and leaves the decoder alone."""
    source_cfg = make_cfg(50, norm="FrozenBN")
    source_cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    source = build_resnet_backbone(source_cfg, ShapeSpec(channels=3)).state_dict()
    source = {name: torch.rand_like(value) for name, value in source.items()}
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        data = {name: value.numpy() for name, value in source.items()}
        pickle.dump({"model": data, "__author__": "torchvision", "matching_heuristics": True}, f)

    model = nn.ModuleDict({"backbone": r50_backbone})
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if ".dec" in k}
    DetectionCheckpointer(model).load(str(path))

    state = model.state_dict()
    resnet_keys = {k[len("backbone.bottom_up.") :] for k in state if ".bottom_up." in k}
    assert set(source) <= resnet_keys
    # BN's step counter is the only ResNet entry an ImageNet (FrozenBN) file cannot carry.
    assert all(k.endswith("num_batches_tracked") for k in resnet_keys - set(source))
    for name, value in source.items():
        assert torch.equal(state["backbone.bottom_up." + name], value), name
    for name, value in decoder_before.items():
        assert torch.equal(state[name], value), name
