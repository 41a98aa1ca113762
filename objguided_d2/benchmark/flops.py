"""Multiply-adds (MACs) of one equal-N inference, counted at dispatch.

``torch.utils.flop_counter.FlopCounterMode`` sees every aten op as it runs, so data-dependent code
(ObjGuided's size-adaptive ROIs, mask NMS) is counted as executed. fvcore's JIT-traced count
(detectron2's ``FlopCountAnalysis``) is not used: tracing fails on ObjGuided's mask boxes and
cannot see detectron2's scripted paste-back. Besides torch's own formulas (convolutions, matmuls),
:data:`EXTRA_FLOP_FORMULAS` counts the bilinear gathers at one MAC per tap and channel; elementwise
ops, norms and activations are never counted, and the ops of :data:`UNCOUNTED_OPS` are listed
when they run. Torch counts FLOPs = 2 MACs; the results here are GMACs.
"""

from __future__ import annotations

import collections
import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .inputs import Sample
from .runners import Runner


def _gather_flops(weight, indices, *args, out_shape=None, **kwargs) -> int:
    """aten embedding_bag sums (ObjGuided's bilinear gathers) of a (rows, C) ``weight`` at
    ``indices`` (flat, one per tap): one MAC per index and channel."""
    return 2 * math.prod(indices) * weight[1]


def _grid_sample_flops(image, grid, *args, out_shape=None, **kwargs) -> int:
    """aten grid_sampler_2d (PointRend's point sampling, detectron2's paste-back): 4 bilinear
    taps per element of the (B, C, H_out, W_out) output."""
    return 2 * 4 * math.prod(out_shape)


def _roi_align_flops(image, rois, scale, pooled_h, pooled_w, sampling_ratio, aligned, **kwargs):
    """torchvision roi_align of a (B, C, H, W) ``image`` at (R, 5) ``rois`` (batch index, XYXY):
    4 bilinear taps per sample and channel; detectron2's adaptive sampling (ratio 0) takes
    ceil(roi side / bins) samples per bin and axis."""
    sides = (rois[:, 3:5] - rois[:, 1:3]) * scale
    if not aligned:
        sides = sides.clamp(min=1)
    bins = torch.tensor([pooled_w, pooled_h], device=rois.device)
    grid = torch.full_like(sides, sampling_ratio) if sampling_ratio > 0 else (sides / bins).ceil()
    samples = int(grid.prod(dim=1).sum()) * pooled_h * pooled_w
    return 2 * 4 * samples * image.shape[1]


_roi_align_flops._get_raw = True  # the formula needs the boxes, not only shapes
# FlopCounterMode's custom_mapping: formulas for ops torch's counter has none for.
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._embedding_bag_forward_only: _gather_flops,
    torch.ops.aten._embedding_bag: _gather_flops,
    torch.ops.aten.grid_sampler_2d: _grid_sample_flops,
    torch.ops.torchvision.roi_align: _roi_align_flops,
}
# Ops with arithmetic that no formula counts, listed in the report when they run.
UNCOUNTED_OPS = {
    "aten.upsample_bilinear2d",
    "aten.upsample_nearest2d",
    "aten.max_pool2d_with_indices",
    "torchvision.nms",
}


class OpRecorder(TorchDispatchMode):
    """Counts of the aten (and torchvision) ops that ran, by name (``"aten.conv2d"``)."""

    def __init__(self):
        super().__init__()
        self.names = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_macs(runner: Runner, sample: Sample) -> dict:
    """GMACs of the dense and the per-instance part of one equal-N inference of ``sample``, the
    dense part's by module (top two levels), and the uncounted ops that ran."""
    counters, recorder = [], OpRecorder()
    with torch.no_grad(), recorder:
        state = None
        for stage in ("dense", "instances"):
            with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
                if stage == "dense":
                    state = runner.dense(sample.inputs)
                else:
                    runner.instances(state, sample.inputs, sample.boxes.to(runner.device))
            counters.append(counter)
    dense, instances = (
        {name: sum(ops.values()) / 2e9 for name, ops in c.get_flop_counts().items()}
        for c in counters
    )
    # ObjGuided's level-0 image conv runs in the ROI heads but is dense per-image work.
    level0 = sum(v for name, v in instances.items() if name.endswith("ROIHeads.image_conv"))
    modules = {name: v for name, v in dense.items() if name != "Global" and name.count(".") <= 1}
    if level0:
        modules["ObjGuidedROIHeads.image_conv"] = level0
    return {
        "dense_gmac": dense.get("Global", 0.0) + level0,
        "per_instance_gmac": instances.get("Global", 0.0) - level0,
        "total_gmac": dense.get("Global", 0.0) + instances.get("Global", 0.0),
        "boxes": len(sample.boxes),
        "dense_modules_gmac": modules,
        "not_counted_ops": {k: v for k, v in recorder.names.items() if k in UNCOUNTED_OPS},
    }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
