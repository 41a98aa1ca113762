"""Shared test helpers: the repository's paths, model configs built in code, tools/ scripts as
modules and small synthetic instance images."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import BitMasks, Instances

from objguided_d2 import add_objguided_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
# The three architectures of the project: config-name part -> name in reports.
ARCHITECTURES = {"objguided": "ObjGuided", "mask_rcnn": "Mask R-CNN", "pointrend": "PointRend"}


def load_tool(name: str) -> ModuleType:
    """A script of tools/ as a module (tools/ is not a package), registered in sys.modules so
    that its dataclasses resolve their annotations."""
    module_name = f"{name}_tool"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def objguided_cfg(depth: int = 50, *, compact: bool = False, opts: list | None = None) -> CfgNode:
    """The object-guided segmentor on CPU, from scratch (BN everywhere, nothing frozen).

    compact: R-18 with a narrow decoder and heads, sized for tests that train on CPU.
    opts: extra key / value pairs applied last (``merge_from_list``).
    """
    cfg = get_cfg()
    add_objguided_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "ObjGuidedSegmentor"
    cfg.MODEL.BACKBONE.NAME = "build_objguided_resnet_backbone"
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "CenterKeypointProposalGenerator"
    cfg.MODEL.ROI_HEADS.NAME = "ObjGuidedROIHeads"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.TEST.DETECTIONS_PER_IMAGE = 1000
    if compact:
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.OBJGUIDED.DECODER_CHANNELS = [64, 32, 16]
        cfg.MODEL.OBJGUIDED.HEAD_CHANNELS = 32
        cfg.MODEL.OBJGUIDED.WH_KERNEL_SIZE = 3
        cfg.MODEL.OBJGUIDED.IMAGE_CONV_CHANNELS = 16
    cfg.merge_from_list(opts or [])
    return cfg


def instances_from_masks(masks: np.ndarray) -> Instances:
    """Training targets of (N, H, W) bool masks: tight boxes, class 0, BitMasks."""
    bit_masks = BitMasks(torch.from_numpy(np.ascontiguousarray(masks, dtype=bool)))
    instances = Instances(tuple(masks.shape[1:]))
    instances.gt_boxes = bit_masks.get_bounding_boxes()
    instances.gt_classes = torch.zeros(len(masks), dtype=torch.int64)
    instances.gt_masks = bit_masks
    return instances


def ellipse_mask(
    shape: tuple[int, int], center: tuple[float, float], axes: tuple[float, float], angle: float
) -> np.ndarray:
    """(H, W) bool ellipse: centre (x, y), semi-axes (a, b) in pixels, rotated by ``angle`` rad."""
    ys, xs = np.mgrid[: shape[0], : shape[1]] + 0.5
    dx, dy = xs - center[0], ys - center[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1


def render(masks: np.ndarray, intensities: list[float], seed: int) -> torch.Tensor:
    """(3, H, W) uint8 image of non-overlapping masks: each object gets its intensity, with a
    darker rim that separates touching objects, on a noisy dark background."""
    rng = np.random.default_rng(seed)
    image = rng.normal(30, 6, masks.shape[1:])
    for mask, intensity in zip(masks, intensities):
        image[mask] = intensity
        eroded = mask.copy()
        eroded[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        image[mask & ~eroded] = intensity * 0.6
    image += rng.normal(0, 4, image.shape)
    gray = torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8))
    return gray.expand(3, -1, -1).contiguous()
