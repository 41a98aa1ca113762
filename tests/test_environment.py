"""The stack the plugin runs on (detectron2, PointRend and torchvision's ops work on CPU), the
plugin's names registered on import, and the environment report."""

import subprocess
import sys

import pytest
import torch
from torchvision.ops import nms, roi_align

from objguided_d2.env import registered_names


def test_torchvision_ops_run_on_cpu():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]

    feature = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = roi_align(feature, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], output_size=2, aligned=True)
    # Each 2x2 bin averages its four bilinear samples: the means of the four quadrants.
    assert torch.allclose(pooled.flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))


@pytest.mark.slow
def test_detectron2_and_pointrend_build_on_cpu():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.projects.point_rend import add_pointrend_config

    cfg = get_cfg()
    add_pointrend_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NAME = "PointRendROIHeads"
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_MASK_HEAD.NAME = "PointRendMaskHead"
    cfg.MODEL.ROI_MASK_HEAD.POINT_HEAD_ON = True
    cfg.MODEL.POINT_HEAD.IN_FEATURES = ["p2"]
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = ""
    cfg.MODEL.ROI_MASK_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.IN_FEATURES = ["p2"]
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.POINT_HEAD.NUM_CLASSES = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    model = build_model(cfg).eval()
    with torch.no_grad():
        image = torch.zeros(3, 64, 64, dtype=torch.uint8)
        out = model([{"image": image, "height": 64, "width": 64}])
    assert "instances" in out[0]


def test_import_registers_the_plugin_names():
    names = registered_names()
    assert names["META_ARCH_REGISTRY"] == ["ObjGuidedSegmentor"]
    assert names["BACKBONE_REGISTRY"] == ["build_objguided_resnet_backbone"]
    assert names["PROPOSAL_GENERATOR_REGISTRY"] == ["CenterKeypointProposalGenerator"]
    assert names["ROI_HEADS_REGISTRY"] == ["ObjGuidedROIHeads"]


@pytest.mark.slow
def test_environment_report_runs():
    result = subprocess.run(
        [sys.executable, "-m", "objguided_d2.env"], capture_output=True, text=True, check=True
    )
    for field in ("torch", "torchvision", "detectron2 install route", "C extension", "device"):
        assert field in result.stdout
