#!/usr/bin/env python
"""Speed of ObjGuided, Mask R-CNN and PointRend side by side, on the same images and boxes.

    tools/benchmark.py                                   # defaults: the full run of benchmarks/
    tools/benchmark.py --objguided-configs default fast --synthetic-counts 100 300 \\
        --dataset dsb2018_val --dataset-images 4 --threads 1
    tools/benchmark.py --profile                         # profile of ObjGuided (see below)

Equal-N protocol. Untrained models emit arbitrary numbers of boxes, and ObjGuided's mask cost
depends on the box sizes (size-adaptive ROIs), so every architecture segments exactly the same
N ground-truth boxes of each image:

* ObjGuided: backbone (encoder + decoder) and center-keypoint head run and decode as at inference;
  their proposals are then replaced by the N boxes (scores decreasing with the index), which the
  ROI heads segment, paste back at the original size and filter by mask NMS.
* Mask R-CNN / PointRend: backbone + FPN, the RPN and the box head on the RPN's proposals run as
  at inference (that cost does not depend on N); the box head's detections are then replaced by
  the N boxes (``forward_with_given_boxes``: mask head, PointRend's point head), whose masks are
  pasted back at the original size (``detector_postprocess``). The box head runs on exactly
  ``MODEL.RPN.POST_NMS_TOPK_TEST`` (1000) proposals, as many as a trained RPN keeps on crowded
  images: an untrained RPN keeps a few dozen valid boxes, which are repeated up to that number.
  In training no such correction is made: the baselines' ROI heads sample from fewer proposals
  than a trained RPN gives (the GT boxes and a few dozen), so their training s/iter is a lower
  bound.

Reported per architecture and input set: median milliseconds per image over the timed
repetitions (after warm-up), split into the *dense* part (everything that does not depend on N;
for ObjGuided the encoder, decoder, detection heads and the full-resolution level-0 image conv)
and the *per-instance* part (ObjGuided: ROI pyramid, crops, S modules, seg head, paste-back, mask
NMS; the baselines: mask head, point head, paste-back), the number of boxes segmented (N for
all) and of masks returned (ObjGuided's mask NMS drops empty and duplicate masks), and the peak
memory of one inference. Training: seconds per iteration (forward, backward, optimizer step) of
each architecture at the same input size and batch on synthetic scenes of ``--train-instances``
objects; for ObjGuided also the same step with the mask branch off (dense part only, level-0 image
conv included), whose difference to the full step is the mask branch plus refinement. Model size:
parameters, and GMACs (fvcore's count of multiply-adds, through detectron2's
``FlopCountAnalysis``) of the dense part and of the per-instance part at the first synthetic
scene. Bilinear gathers (ObjGuided's ``embedding_bag``, PointRend's ``grid_sampler``) are counted as
one MAC per tap and channel; ops fvcore cannot count (e.g. ROIAlign) are listed as not counted.

Inputs: synthetic ``--size`` x ``--size`` scenes with exactly N nucleus-like objects each (the
synthetic-data renderer's cells on a jittered grid, sizes from the grid pitch), and images of a
registered dataset (default ``dsb2018_val``, resized as at test time, longest side ``--size``,
its annotated boxes); a dataset that is not prepared is skipped with a message. All models start
from random weights (``MODEL.WEIGHTS ""``): timing does not depend on them under this protocol,
except that ObjGuided's mask NMS sees the untrained masks (reported as "returned").

Timing: one image per forward, models interleaved (A, B, C, A, B, C, ...) so that load changes on
a shared machine hit all of them alike; on CUDA ``torch.cuda.synchronize`` around every clock.
Peak memory: on CUDA ``max_memory_allocated`` during one inference minus the memory allocated
before it; on the CPU, one fresh subprocess per model and input builds both, resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``), runs one inference and reports ``VmHWM`` minus the
``VmRSS`` before it (resident memory the inference added; allocator caching included).

``--profile`` writes ``benchmarks/profile_<date>.md``: torch.profiler operator tables and cProfile
function tables of ObjGuided inference at each synthetic count and of one training step.

Outputs ``<output-dir>/benchmark_<tag>.json`` and ``.md``; the last line printed is
``ratio objguided/pointrend = X.XX``: inference time per image of the first ObjGuided config over
PointRend's on the first synthetic input (512 x 512, N = 100 and the default config with the
default arguments).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import datetime
import functools
import gc
import io
import json
import math
import os
import platform
import pstats
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
from detectron2.utils.events import EventStorage
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from objguided_d2.data import BioDatasetMapper
from objguided_d2.data.mapper import tight_boxes
from objguided_d2.data.synthetic import Cell, rasterize_cells, render_scene
from objguided_d2.engine import Trainer, architecture_name, load_config

REPO = Path(__file__).resolve().parents[1]
# Short names of ObjGuided configs accepted by --objguided-configs.
OBJGUIDED_CONFIGS = {
    "default": "configs/Base-ObjGuided.yaml",
    "fast": "configs/Base-ObjGuided-Fast.yaml",
}
RATIO_LINE = "ratio objguided/pointrend = {:.2f}"


# -------------------------------------------------------------------------------------------------
# Inputs
# -------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One image as the test mapper gives it, with the boxes every architecture segments."""

    inputs: dict  # "image" (C, H, W) uint8 at the network-input size, original "height"/"width"
    boxes: torch.Tensor  # (N, 4) XYXY in network-input pixels
    masks: torch.Tensor | None = None  # (N, H, W) bool at the network-input size (training)


@dataclass
class InputSet:
    name: str
    description: str
    samples: list[Sample] = field(default_factory=list)


def crowded_scene(num_objects: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A size x size grayscale scene of exactly ``num_objects`` separate nucleus-like cells.

    Cells (the synthetic renderer's soma with its nucleus, no protrusions) sit one per slot of a
    ceil(sqrt(N))-square grid, major semi-axis 0.25-0.45 of the slot pitch, aspect 0.55-1, any
    angle, jittered inside their slot, so none overlaps another.

    Returns:
        image (H, W) uint8 and masks (N, H, W) bool.
    """
    rng = np.random.default_rng([seed, num_objects, size])
    slots = math.ceil(math.sqrt(num_objects))
    pitch = size / slots
    cells = []
    for slot in rng.choice(slots * slots, num_objects, replace=False):
        row, col = divmod(int(slot), slots)
        major = rng.uniform(0.25, 0.45) * pitch
        minor = major * rng.uniform(0.55, 1.0)
        jitter = pitch / 2 - major
        center = (
            round((col + 0.5) * pitch + rng.uniform(-jitter, jitter)),
            round((row + 0.5) * pitch + rng.uniform(-jitter, jitter)),
        )
        axes = (max(1, round(major)), max(1, round(minor)))
        cells.append(Cell(center=center, axes=axes, angle=float(rng.uniform(0, 180))))
    labels, parts = rasterize_cells(cells, size, size)
    image = render_scene(labels, parts, rng)
    masks = labels[None] == np.arange(1, num_objects + 1)[:, None, None]
    return image, masks


def synthetic_sample(num_objects: int, size: int, seed: int, channels: int) -> Sample:
    image, masks = crowded_scene(num_objects, size, seed)
    tensor = torch.from_numpy(image)[None].expand(channels, -1, -1).contiguous()
    return Sample(
        inputs={"image": tensor, "height": size, "width": size},
        boxes=torch.from_numpy(tight_boxes(masks)),
        masks=torch.from_numpy(masks),
    )


def dataset_samples(cfg, dataset: str, count: int) -> list[Sample]:
    """``count`` images spread evenly over a registered dataset, mapped as at test time, with
    their annotated boxes scaled to the network input."""
    records = DatasetCatalog.get(dataset)
    mapper = BioDatasetMapper(cfg, is_train=False)
    picks = np.linspace(0, len(records) - 1, min(count, len(records))).round().astype(int)
    samples = []
    for index in picks:
        record = records[index]
        inputs = mapper(record)
        height, width = inputs["image"].shape[1:]
        boxes = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in record["annotations"]
            if not a.get("iscrowd", 0)
        ]
        scale = torch.tensor([width / record["width"], height / record["height"]] * 2)
        inputs = {key: inputs[key] for key in ("image", "height", "width")}
        samples.append(Sample(inputs, torch.tensor(boxes).reshape(-1, 4) * scale))
    return samples


def build_input_sets(args, cfg) -> tuple[list[InputSet], list[str]]:
    """The synthetic sets and the dataset set; notes on what was skipped."""
    channels = len(cfg.MODEL.PIXEL_MEAN)
    sets, notes = [], []
    for count in args.synthetic_counts:
        sample = synthetic_sample(count, args.size, seed=0, channels=channels)
        sets.append(
            InputSet(
                f"synthetic_n{count}",
                f"synthetic {args.size}x{args.size} scene, N = {count} objects",
                [sample],
            )
        )
    if args.dataset != "none":
        try:
            samples = dataset_samples(cfg, args.dataset, args.dataset_images)
        except (FileNotFoundError, KeyError) as error:
            note = f"dataset {args.dataset} skipped: {error}"
            print(note, file=sys.stderr)
            notes.append(note)
        else:
            counts = [len(s.boxes) for s in samples]
            sets.append(
                InputSet(
                    args.dataset,
                    f"{len(samples)} {args.dataset} images, longest side {args.size}, "
                    f"N = {', '.join(map(str, counts))} annotated objects",
                    samples,
                )
            )
    return sets, notes


def training_batch(args, channels: int) -> list[dict]:
    """``--train-batch`` synthetic scenes of ``--train-instances`` objects as training inputs."""
    batch = []
    for seed in range(1, args.train_batch + 1):
        sample = synthetic_sample(args.train_instances, args.size, seed, channels)
        instances = Instances((args.size, args.size))
        instances.gt_boxes = Boxes(sample.boxes)
        instances.gt_classes = torch.zeros(len(sample.boxes), dtype=torch.int64)
        instances.gt_masks = BitMasks(sample.masks)
        batch.append({"image": sample.inputs["image"], "instances": instances})
    return batch


# -------------------------------------------------------------------------------------------------
# Architectures under the equal-N protocol
# -------------------------------------------------------------------------------------------------


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Runner:
    """One architecture: its model, optimizer and the equal-N inference split in two stages."""

    def __init__(self, label: str, config_file: str, cfg):
        self.label = label
        self.config_file = config_file
        self.cfg = cfg
        self.architecture = architecture_name(cfg)
        self.model = build_model(cfg)
        self.optimizer = Trainer.build_optimizer(cfg, self.model)
        self.device = self.model.device

    @property
    def has_dense_training(self) -> bool:
        return False

    def dense(self, inputs: dict):
        """Everything that does not depend on the N boxes; returns the state :meth:`instances`
        continues from."""
        raise NotImplementedError

    def instances(self, state, inputs: dict, boxes: torch.Tensor) -> Instances:
        """Masks of the given boxes at the original image size."""
        raise NotImplementedError

    def dense_only_losses(self, batch: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    def infer(self, sample: Sample) -> tuple[Instances, dict[str, float]]:
        """One timed inference: (result, {"dense": s, "instance": s, "total": s})."""
        boxes = sample.boxes.to(self.device)
        with torch.no_grad():
            start = clock(self.device)
            state = self.dense(sample.inputs)
            middle = clock(self.device)
            result = self.instances(state, sample.inputs, boxes)
            end = clock(self.device)
        shift = self.dense_seconds_inside_instances()
        return result, {
            "dense": middle - start + shift,
            "instance": end - middle - shift,
            "total": end - start,
        }

    def dense_seconds_inside_instances(self) -> float:
        """Time of dense per-image work that :meth:`instances` ran last (counted as dense)."""
        return 0.0

    def segmented(self, boxes: torch.Tensor) -> int:
        """Number of the boxes that get a mask computed."""
        return len(boxes)

    def train_step(self, batch: list[dict], dense_only: bool = False) -> float:
        """One training iteration (forward, backward, optimizer step); its seconds."""
        self.model.train()
        # detectron2's heads log training statistics to an event storage
        with EventStorage():
            start = clock(self.device)
            if dense_only:
                loss = self.dense_only_losses(batch)
            else:
                loss = sum(self.model(batch).values())
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            seconds = clock(self.device) - start
        self.model.eval()
        return seconds


class ObjGuidedRunner(Runner):
    def __init__(self, label, config_file, cfg):
        super().__init__(label, config_file, cfg)
        heads = self.model.roi_heads
        self._level0_seconds = 0.0
        self._level0_start = 0.0

        # The level-0 image conv is dense per-image work that runs inside the ROI heads: time it
        # with hooks and move it to the dense part.
        def before(module, args):
            self._level0_start = clock(self.device)

        def after(module, args, output):
            self._level0_seconds += clock(self.device) - self._level0_start

        heads.image_conv.register_forward_pre_hook(before)
        heads.image_conv.register_forward_hook(after)

    @property
    def has_dense_training(self) -> bool:
        return True

    def dense(self, inputs):
        model = self.model
        images = model.preprocess_image([inputs])
        features = model.backbone(images.tensor)
        # The detector decodes as at inference; the given boxes replace its proposals.
        model.proposal_generator(images, features)
        self._level0_seconds = 0.0
        return images, features

    def instances(self, state, inputs, boxes):
        images, features = state
        proposals = Instances(images.image_sizes[0])
        proposals.proposal_boxes = Boxes(boxes)
        proposals.objectness_logits = torch.linspace(3, -3, len(boxes), device=boxes.device)
        proposals.pred_classes = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
        output_size = (int(inputs["height"]), int(inputs["width"]))
        (result,), _ = self.model.roi_heads(
            images, features, [proposals], output_sizes=[output_size]
        )
        return result

    def dense_seconds_inside_instances(self):
        return self._level0_seconds

    def segmented(self, boxes):
        return int((self.model.roi_heads.build_pyramid(boxes).num_levels > 0).sum())

    def dense_only_losses(self, batch):
        """Backbone and detection losses, plus the level-0 image conv (forward and backward, at
        zero weight): the training step of the dense part alone."""
        model = self.model
        images = model.preprocess_image(batch)
        gt_instances = [x["instances"].to(self.device) for x in batch]
        features = model.backbone(images.tensor)
        _, losses = model.proposal_generator(images, features, gt_instances)
        level0 = model.roi_heads.level0_map(images)
        return sum(losses.values()) + 0.0 * level0.sum()


class RCNNRunner(Runner):
    """Mask R-CNN and PointRend (detectron2's GeneralizedRCNN)."""

    def dense(self, inputs):
        model = self.model
        images = model.preprocess_image([inputs])
        features = model.backbone(images.tensor)
        (proposals,), _ = model.proposal_generator(images, features, None)
        # The box stage as at inference (StandardROIHeads' own step) on POST_NMS_TOPK_TEST
        # proposals, as many as a trained RPN keeps on these crowded images (an untrained one
        # keeps a few dozen): its own, repeated. Its detections are replaced by the given boxes.
        count = self.cfg.MODEL.RPN.POST_NMS_TOPK_TEST
        repeat = torch.arange(count, device=self.device) % max(len(proposals), 1)
        model.roi_heads._forward_box(features, [proposals[repeat]])
        return images, features

    def instances(self, state, inputs, boxes):
        images, features = state
        detections = Instances(images.image_sizes[0])
        # a copy: detector_postprocess scales the boxes in place
        detections.pred_boxes = Boxes(boxes.clone())
        detections.scores = torch.ones(len(boxes), device=boxes.device)
        detections.pred_classes = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
        (detections,) = self.model.roi_heads.forward_with_given_boxes(features, [detections])
        return detector_postprocess(detections, int(inputs["height"]), int(inputs["width"]))


def runner_specs(args) -> list[tuple[str, str]]:
    """(label, config file) of every model benchmarked, ObjGuided configs first."""
    specs = []
    for name in args.objguided_configs:
        path = OBJGUIDED_CONFIGS.get(name, name)
        label = name if name in OBJGUIDED_CONFIGS else Path(name).stem
        specs.append((f"objguided[{label}]", path))
    for label, path in (("mask_rcnn", args.mask_rcnn_config), ("pointrend", args.pointrend_config)):
        if path != "none":
            specs.append((label, path))
    return specs


def input_size_opts(size: int) -> list:
    """Config overrides that train and test every model at ``size``."""
    return ["INPUT.IMAGE_SIZE", size, "INPUT.TEST_IMAGE_SIZE", size]


def build_runner(args, label: str, config_file: str) -> Runner:
    opts = [
        "MODEL.WEIGHTS", "",
        "MODEL.DEVICE", args.device,
        *input_size_opts(args.size),
        # Weights stay fixed (learning rate 0) so that every timed training step does the same
        # work; the optimizer step still runs.
        "SOLVER.BASE_LR", 0.0,
        *args.opts,
    ]  # fmt: skip
    cfg = load_config(str(REPO / config_file), opts)
    runner_class = (
        ObjGuidedRunner if cfg.MODEL.META_ARCHITECTURE == "ObjGuidedSegmentor" else RCNNRunner
    )
    runner = runner_class(label, config_file, cfg)
    runner.model.eval()
    return runner


# -------------------------------------------------------------------------------------------------
# Measurements
# -------------------------------------------------------------------------------------------------


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else float("nan")


def time_inference(args, runners: list[Runner], input_sets: list[InputSet]) -> dict:
    """Interleaved repetitions; per (runner, input set) medians of the per-image stage times."""
    times = {r.label: {s.name: {"dense": [], "instance": [], "total": []} for s in input_sets}
             for r in runners}  # fmt: skip
    counts = {r.label: {s.name: [] for s in input_sets} for r in runners}
    for repetition in range(args.warmup + args.repeats):
        for input_set in input_sets:
            for sample in input_set.samples:
                for runner in runners:
                    result, seconds = runner.infer(sample)
                    if repetition < args.warmup:
                        continue
                    for stage, value in seconds.items():
                        times[runner.label][input_set.name][stage].append(value)
                    if repetition == args.warmup:
                        counts[runner.label][input_set.name].append(
                            {
                                "boxes": len(sample.boxes),
                                "segmented": runner.segmented(sample.boxes.to(runner.device)),
                                "returned": len(result),
                                "nonempty_masks": int(result.pred_masks.flatten(1).any(1).sum()),
                            }
                        )
        print(f"inference repetition {repetition + 1}/{args.warmup + args.repeats} done")
    results = {}
    for runner in runners:
        results[runner.label] = {}
        for input_set in input_sets:
            stages = times[runner.label][input_set.name]
            total = median_ms(stages["total"])
            per_instance = median_ms(stages["instance"])
            results[runner.label][input_set.name] = {
                "ms_per_image": total,
                "dense_ms": median_ms(stages["dense"]),
                "per_instance_ms": per_instance,
                "per_instance_share": statistics.median(
                    i / t for i, t in zip(stages["instance"], stages["total"])
                ),
                "samples": len(stages["total"]),
                "instances": counts[runner.label][input_set.name],
            }
    return results


def time_training(args, runners: list[Runner], batch: list[dict]) -> dict:
    """Interleaved training steps; median seconds per iteration of each runner (and of the
    dense part alone where the runner has one)."""
    variants = []
    for runner in runners:
        variants.append((runner.label, runner, False))
        if runner.has_dense_training:
            variants.append((f"{runner.label}:dense_only", runner, True))
    seconds = {name: [] for name, _, _ in variants}
    for iteration in range(args.train_warmup + args.train_iters):
        for name, runner, dense_only in variants:
            step = runner.train_step(batch, dense_only)
            if iteration >= args.train_warmup:
                seconds[name].append(step)
        print(f"training iteration {iteration + 1}/{args.train_warmup + args.train_iters} done")
    results = {}
    for runner in runners:
        full = seconds[runner.label]
        entry = {"s_per_iter": statistics.median(full)}
        if runner.has_dense_training:
            dense = seconds[f"{runner.label}:dense_only"]
            entry["dense_only_s_per_iter"] = statistics.median(dense)
            # Paired: each full step against the dense-only step that ran right after it, so that
            # a load change on a shared machine shifts both.
            entry["mask_branch_s_per_iter"] = statistics.median(f - d for f, d in zip(full, dense))
            entry["mask_branch_share"] = statistics.median(1 - d / f for f, d in zip(full, dense))
        entry["iterations"] = len(full)
        results[runner.label] = entry
    return results


def _gather_flops(weight, indices, *args, out_shape=None, **kwargs) -> int:
    """aten embedding_bag (ObjGuided's bilinear gathers): one MAC per index and channel."""
    return 2 * math.prod(indices) * weight[1]


def _addmm_inplace_flops(input, mat1, mat2, *args, out_shape=None, **kwargs) -> int:
    """aten addmm_ (ObjGuided's 1 x 1 convs of concatenations), which torch counts only out of
    place."""
    return 2 * mat1[0] * mat1[1] * mat2[1]


def _grid_sample_flops(image, grid, *args, out_shape=None, **kwargs) -> int:
    """aten grid_sampler_2d (PointRend's point sampling, detectron2's paste-back): 4 bilinear
    taps per output element."""
    return 2 * 4 * math.prod(out_shape)


def _roi_align_flops(image, rois, scale, pooled_h, pooled_w, sampling_ratio, aligned, **kwargs):
    """torchvision roi_align: 4 bilinear taps per sample, per channel; detectron2's adaptive
    sampling (ratio 0) takes ceil(roi side / bins) samples per bin and axis."""
    sides = (rois[:, 3:5] - rois[:, 1:3]) * scale
    if not aligned:
        sides = sides.clamp(min=1)
    bins = torch.tensor([pooled_w, pooled_h], device=rois.device)
    grid = torch.full_like(sides, sampling_ratio) if sampling_ratio > 0 else (sides / bins).ceil()
    samples = int(grid.prod(dim=1).sum()) * pooled_h * pooled_w
    return 2 * 4 * samples * image.shape[1]


_roi_align_flops._get_raw = True  # the formula needs the boxes, not only shapes
# Counted besides torch's own formulas (convolutions, matmuls); FLOPs = 2 MACs as torch counts.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._embedding_bag_forward_only: _gather_flops,
    torch.ops.aten._embedding_bag: _gather_flops,
    torch.ops.aten.addmm_: _addmm_inplace_flops,
    torch.ops.aten.grid_sampler_2d: _grid_sample_flops,
    torch.ops.torchvision.roi_align: _roi_align_flops,
}
# Ops with arithmetic that no formula counts, listed when they run (elementwise ops, norms and
# activations are never counted).
_UNCOUNTED_OPS = {
    "aten.upsample_bilinear2d",
    "aten.upsample_nearest2d",
    "aten.max_pool2d_with_indices",
    "torchvision.nms",
}


class _OpRecorder(TorchDispatchMode):
    """Names of the ops that ran."""

    def __init__(self):
        super().__init__()
        self.names = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_macs(runner: Runner, sample: Sample) -> dict:
    """GMACs of the dense and per-instance parts of one equal-N inference of ``sample``
    (``torch.utils.flop_counter`` at dispatch, so data-dependent code is counted as it runs)."""
    counters, recorder = [], _OpRecorder()
    with torch.no_grad(), recorder:
        state = None
        for stage in ("dense", "instances"):
            with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
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
        "not_counted_ops": {k: v for k, v in recorder.names.items() if k in _UNCOUNTED_OPS},
    }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _memory_kb(field_name: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", status).group(1))


def measure_peak_memory(args, runner: Runner, sample: Sample) -> dict:
    """Peak memory of one inference (see the module docstring), in MB."""
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
        torch.cuda.reset_peak_memory_stats(runner.device)
        before = torch.cuda.memory_allocated(runner.device)
        runner.infer(sample)
        peak = torch.cuda.max_memory_allocated(runner.device)
        return {"peak_mb": (peak - before) / 2**20, "method": "cuda max_memory_allocated"}
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _memory_kb("VmRSS")
    runner.infer(sample)
    peak = _memory_kb("VmHWM")
    return {
        "peak_mb": (peak - before) / 1024,
        "process_peak_mb": peak / 1024,
        "method": "VmHWM - VmRSS before, fresh process",
    }


def probe_memory(args, runners_specs, input_sets) -> dict:
    """Peak memory of each runner on the first image of each input set."""
    results = {}
    for label, config_file in runners_specs:
        results[label] = {}
        for input_set in input_sets:
            if args.device == "cpu":
                probe = ["--memory-probe", label, input_set.name]
                command = [sys.executable, __file__, *probe, *sys.argv[1:]]
                output = subprocess.run(command, capture_output=True, text=True, check=True)
                results[label][input_set.name] = json.loads(output.stdout.strip().splitlines()[-1])
            else:
                runner = build_runner(args, label, config_file)
                results[label][input_set.name] = measure_peak_memory(
                    args, runner, input_set.samples[0]
                )
                del runner
    return results


# -------------------------------------------------------------------------------------------------
# Profile
# -------------------------------------------------------------------------------------------------


def _op_table(run: Callable[[], None], rows: int) -> str:
    with torch.profiler.profile(activities=_profiler_activities()) as profiler:
        run()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=rows)


def _profiler_activities():
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def _function_table(run: Callable[[], None], rows: int) -> str:
    """cProfile cumulative times of the project's functions."""
    profile = cProfile.Profile()
    profile.enable()
    run()
    profile.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream).sort_stats("cumulative")
    stats.print_stats(re.escape(str(REPO / "objguided_d2")), rows)
    lines = stream.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return "\n".join(line.replace(str(REPO) + "/", "") for line in lines[start:] if line.strip())


def write_profile(args, runner: Runner, input_sets: list[InputSet], path: Path) -> None:
    """torch.profiler and cProfile summaries of one ObjGuided runner: its per-instance part at
    each synthetic input (the dense part precomputed) and one training step."""
    sections = [
        f"# Profile of {runner.label} ({runner.config_file})",
        "",
        f"Command: `{' '.join(sys.argv)}`  ",
        f"Date: {datetime.date.today()}, device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
    ]
    for input_set in input_sets:
        if not input_set.name.startswith("synthetic"):
            continue
        sample = input_set.samples[0]
        boxes = sample.boxes.to(runner.device)
        stage_ms = []
        for _ in range(args.warmup + args.repeats):
            _, seconds = runner.infer(sample)
            stage_ms.append(seconds)
        medians = {k: round(median_ms([s[k] for s in stage_ms[args.warmup :]]), 1)
                   for k in stage_ms[0]}  # fmt: skip
        with torch.no_grad():
            state = runner.dense(sample.inputs)

            per_instance = functools.partial(runner.instances, state, sample.inputs, boxes)
            per_instance()
            operators = _op_table(per_instance, args.profile_rows)
            functions = _function_table(per_instance, args.profile_rows)
        sections += [
            f"## Inference, {input_set.description}",
            "",
            f"Median stage times over {args.repeats} runs (ms): {medians}",
            "",
            "Operators of the per-instance part (torch.profiler; the level-0 image conv, which "
            "runs inside the ROI heads, included):",
            "",
            "```",
            operators,
            "```",
            "",
            "Project functions of the per-instance part (cProfile, cumulative):",
            "",
            "```",
            functions,
            "```",
            "",
        ]
    batch = training_batch(args, len(runner.cfg.MODEL.PIXEL_MEAN))
    for _ in range(args.train_warmup):
        runner.train_step(batch)
    sections += [
        f"## Training step, batch {args.train_batch}, {args.train_instances} objects per image",
        "",
        "Operators (torch.profiler, whole step):",
        "",
        "```",
        _op_table(lambda: runner.train_step(batch), args.profile_rows),
        "```",
        "",
        "Project functions (cProfile, cumulative):",
        "",
        "```",
        _function_table(lambda: runner.train_step(batch), args.profile_rows),
        "```",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sections))
    print(f"profile written to {path}")


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def target_checks(report: dict) -> list[dict]:
    """The issue's targets, evaluated on this run's numbers where it has them."""
    inference, checks = report["inference"], []
    objguided = [label for label in report["configs"] if label.startswith("objguided")]
    synthetic = [s["name"] for s in report["inputs"] if s["name"].startswith("synthetic")]
    if not objguided:
        return checks
    default = objguided[0]
    for name, limit in zip(synthetic if inference else [], (0.15, 0.30)):
        share = inference[default][name]["per_instance_share"]
        checks.append(
            {
                "target": f"{default}: per-instance part <= {limit:.0%} of inference ({name})",
                "value": f"{share:.1%}",
                "met": share <= limit,
            }
        )
    if synthetic and "pointrend" in inference:
        first = synthetic[0]
        ratio = (
            inference[default][first]["ms_per_image"]
            / inference["pointrend"][first]["ms_per_image"]
        )
        macs = report.get("model_size", {})
        if default in macs and "pointrend" in macs:
            mac_ratio = macs[default]["total_gmac"] / macs["pointrend"]["total_gmac"]
            checks.append(
                {
                    "target": f"{default}/pointrend time ratio <= GMAC ratio ({first})",
                    "value": f"{ratio:.2f} vs {mac_ratio:.2f}",
                    "met": ratio <= mac_ratio,
                }
            )
        for label in objguided[1:]:
            fast = (
                inference[label][first]["ms_per_image"]
                / inference["pointrend"][first]["ms_per_image"]
            )
            checks.append(
                {
                    "target": f"{label} time <= 0.8 x pointrend's ({first})",
                    "value": f"{fast:.2f} x",
                    "met": fast <= 0.8,
                }
            )
    training = report.get("training", {})
    if default in training:
        share = training[default]["mask_branch_share"]
        checks.append(
            {
                "target": f"{default} training: mask branch + refinement <= 25% of an iteration",
                "value": f"{share:.1%}",
                "met": share <= 0.25,
            }
        )
    return checks


def _dense_summary(modules: dict[str, float]) -> dict[str, float]:
    """Top-level modules of the dense part; ObjGuided's backbone split into encoder and decoder."""
    summary = {name: value for name, value in modules.items() if "." not in name}
    decoder = sum(v for name, v in modules.items() if name.startswith("ObjGuidedBackbone.dec"))
    if decoder:
        summary["encoder"] = summary.pop("ObjGuidedBackbone") - decoder
        summary["decoder"] = decoder
    if "ObjGuidedROIHeads.image_conv" in modules:
        summary["level-0 image conv"] = modules["ObjGuidedROIHeads.image_conv"]
    return summary


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# Benchmark {report['tag']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{env['date']}; device {env['device']} ({env['device_name']}); torch {env['torch']}, "
        f"{env['torch_threads']} threads; {env['cpu_count']} CPUs, load average "
        f"{env['load_average']} at the start.",
        "",
        "Inputs: " + "; ".join(f"`{s['name']}`: {s['description']}" for s in report["inputs"]),
        "",
    ]
    lines += [f"Note: {note}" for note in report["notes"]]
    if report["inference"]:
        lines += [
            "",
            "## Inference (equal N; median ms per image)",
            "",
            "| model | input | total ms | dense ms | per-instance ms | per-instance share | "
            "boxes segmented | masks returned | peak MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for label, per_set in report["inference"].items():
        for name, entry in per_set.items():
            counts = entry["instances"]
            segmented = "/".join(str(c["segmented"]) for c in counts)
            returned = "/".join(str(c["returned"]) for c in counts)
            memory = report.get("memory", {}).get(label, {}).get(name, {}).get("peak_mb")
            lines.append(
                f"| {label} | {name} | {_fmt(entry['ms_per_image'])} | {_fmt(entry['dense_ms'])} "
                f"| {_fmt(entry['per_instance_ms'])} | {entry['per_instance_share']:.1%} "
                f"| {segmented} | {returned} | {_fmt(memory, 0)} |"
            )
    if report.get("training"):
        lines += [
            "",
            f"## Training (median s/iter; {report['training_setup']})",
            "",
            "| model | s/iter | dense part only | mask branch + refinement | share |",
            "|---|---|---|---|---|",
        ]
        for label, entry in report["training"].items():
            share = entry.get("mask_branch_share")
            lines.append(
                f"| {label} | {_fmt(entry['s_per_iter'], 2)} "
                f"| {_fmt(entry.get('dense_only_s_per_iter'), 2)} "
                f"| {_fmt(entry.get('mask_branch_s_per_iter'), 2)} "
                f"| {'-' if share is None else f'{share:.1%}'} |"
            )
    if report.get("model_size"):
        lines += [
            "",
            "## Model size (GMACs at the first synthetic input)",
            "",
            "| model | parameters (M) | dense GMAC | per-instance GMAC (boxes) | total GMAC "
            "| dense breakdown | not counted |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, entry in report["model_size"].items():
            breakdown = ", ".join(
                f"{k} {v:.1f}" for k, v in _dense_summary(entry["dense_modules_gmac"]).items()
            )
            missing = ", ".join(f"{k} x{v}" for k, v in entry["not_counted_ops"].items())
            lines.append(
                f"| {label} | {entry['parameters'] / 1e6:.2f} | {entry['dense_gmac']:.1f} "
                f"| {entry['per_instance_gmac']:.1f} ({entry['boxes']}) "
                f"| {entry['total_gmac']:.1f} | {breakdown} | {missing or '-'} |"
            )
    if report["targets"]:
        lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
        for check in report["targets"]:
            lines.append(
                f"| {check['target']} | {check['value']} | {'yes' if check['met'] else 'no'} |"
            )
    lines += ["", report["ratio_line"], ""]
    return "\n".join(lines)


def environment(args) -> dict:
    device = torch.device(args.device)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        )
        or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


# -------------------------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--objguided-configs",
        nargs="+",
        default=["default", "fast"],
        help=f"ObjGuided configs: {', '.join(OBJGUIDED_CONFIGS)} or paths (first = reference)",
    )
    parser.add_argument(
        "--mask-rcnn-config", default="configs/Base-MaskRCNN.yaml", help="config or 'none'"
    )
    parser.add_argument(
        "--pointrend-config", default="configs/Base-PointRend.yaml", help="config or 'none'"
    )
    parser.add_argument("--size", type=int, default=512, help="network input side")
    parser.add_argument("--synthetic-counts", type=int, nargs="*", default=[100, 300])
    parser.add_argument("--dataset", default="dsb2018_val", help="registered dataset or 'none'")
    parser.add_argument("--dataset-images", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed inferences; 0: none")
    parser.add_argument("--train-iters", type=int, default=3, help="timed iterations; 0: none")
    parser.add_argument("--train-warmup", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-instances", type=int, default=100)
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--tag", default=None, help="file name tag (default: date and device)")
    parser.add_argument("--profile", action="store_true", help="profile ObjGuided instead")
    parser.add_argument("--profile-output", default=None)
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--memory-probe", nargs=2, metavar=("LABEL", "INPUT"), help="internal")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs (all)")
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    specs = runner_specs(args)
    first_cfg = load_config(str(REPO / specs[0][1]), [*input_size_opts(args.size), *args.opts])
    input_sets, notes = build_input_sets(args, first_cfg)

    if args.memory_probe:
        label, name = args.memory_probe
        runner = build_runner(args, label, dict(specs)[label])
        sample = next(s for s in input_sets if s.name == name).samples[0]
        print(json.dumps(measure_peak_memory(args, runner, sample)))
        return None
    if args.profile:
        runner = build_runner(args, *specs[0])
        date = datetime.date.today().isoformat()
        path = Path(args.profile_output or REPO / "benchmarks" / f"profile_{date}.md")
        write_profile(args, runner, input_sets, path)
        return None

    runners = [build_runner(args, label, config) for label, config in specs]
    env = environment(args)
    tag = args.tag or f"{datetime.date.today().isoformat()}_{args.device}"
    report = {
        "tag": tag,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": env,
        "protocol": __doc__[__doc__.index("Equal-N") : __doc__.index("Reported per")].strip(),
        "configs": {r.label: r.config_file for r in runners},
        "inputs": [{"name": s.name, "description": s.description} for s in input_sets],
        "notes": notes,
        "settings": {
            "size": args.size,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "train_iters": args.train_iters,
            "train_warmup": args.train_warmup,
            "train_batch": args.train_batch,
            "train_instances": args.train_instances,
        },
    }
    report["inference"] = time_inference(args, runners, input_sets) if args.repeats > 0 else {}
    if args.train_iters > 0:
        batch = training_batch(args, len(first_cfg.MODEL.PIXEL_MEAN))
        report["training_setup"] = (
            f"batch {args.train_batch} synthetic {args.size}x{args.size} scenes of "
            f"{args.train_instances} objects, {args.train_iters} timed after "
            f"{args.train_warmup} warm-up"
        )
        report["training"] = time_training(args, runners, batch)
    synthetic = [s for s in input_sets if s.name.startswith("synthetic")]
    if not args.no_flops and synthetic:
        sample = synthetic[0].samples[0]
        report["model_size"] = {
            r.label: {"parameters": count_parameters(r.model), **count_macs(r, sample)}
            for r in runners
        }
    if not args.no_memory:
        report["memory"] = probe_memory(args, specs, input_sets)
    report["targets"] = target_checks(report)
    reference = [s for s in input_sets if s.name.startswith("synthetic")] or input_sets
    default = runners[0].label
    ratio = float("nan")
    if reference and "pointrend" in report["inference"]:
        name = reference[0].name
        ratio = (
            report["inference"][default][name]["ms_per_image"]
            / report["inference"]["pointrend"][name]["ms_per_image"]
        )
    report["ratio_line"] = RATIO_LINE.format(ratio)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"benchmark_{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (output_dir / f"benchmark_{tag}.md").write_text(text)
    print(text)
    print(report["ratio_line"])
    return report


if __name__ == "__main__":
    main()
