"""Benchmark inputs: synthetic scenes of exactly N objects, images of a registered dataset, and a
training batch; every sample carries the boxes that each architecture segments."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances

from objguided_d2.data import BioDatasetMapper
from objguided_d2.data.mapper import interior_points, tight_boxes
from objguided_d2.data.synthetic import Cell, rasterize_cells, render_scene


@dataclass
class Sample:
    """One image as the test mapper gives it, with the boxes every architecture segments."""

    inputs: dict  # "image" (C, H, W) uint8 at the network-input size, original "height"/"width"
    boxes: torch.Tensor  # (N, 4) XYXY in network-input pixels
    masks: torch.Tensor | None = None  # (N, H, W) bool at the network-input size (training)


@dataclass
class InputSet:
    """Samples timed under one name (``synthetic_n100``, a dataset's name)."""

    name: str
    description: str
    samples: list[Sample]


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
    """:func:`crowded_scene` repeated over ``channels``, with its tight boxes and masks."""
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


def build_input_sets(
    cfg, size: int, synthetic_counts: list[int], dataset: str, dataset_images: int
) -> tuple[list[InputSet], list[str]]:
    """One synthetic scene per count, then ``dataset_images`` images of ``dataset`` (``"none"``:
    no dataset); also notes on what was skipped. ``cfg`` gives the channels and the test mapper.
    """
    channels = len(cfg.MODEL.PIXEL_MEAN)
    sets, notes = [], []
    for count in synthetic_counts:
        sample = synthetic_sample(count, size, seed=0, channels=channels)
        description = f"synthetic {size}x{size} scene, N = {count} objects"
        sets.append(InputSet(f"synthetic_n{count}", description, [sample]))
    if dataset == "none":
        return sets, notes
    try:
        samples = dataset_samples(cfg, dataset, dataset_images)
    except (FileNotFoundError, KeyError) as error:
        # A dataset that is not prepared does not stop the run: the report says it was skipped.
        note = f"dataset {dataset} skipped: {error}"
        print(note, file=sys.stderr)
        notes.append(note)
    else:
        counts = ", ".join(str(len(s.boxes)) for s in samples)
        description = (
            f"{len(samples)} {dataset} images, longest side {size}, N = {counts} annotated objects"
        )
        sets.append(InputSet(dataset, description, samples))
    return sets, notes


def training_batch(size: int, batch_size: int, num_objects: int, channels: int) -> list[dict]:
    """``batch_size`` synthetic scenes (seeds 1, 2, ...) of ``num_objects`` objects as training
    inputs: "image" (C, size, size) uint8 and "instances" with boxes, class 0, masks and
    interior points."""
    batch = []
    for seed in range(1, batch_size + 1):
        sample = synthetic_sample(num_objects, size, seed, channels)
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(sample.boxes)
        instances.gt_classes = torch.zeros(len(sample.boxes), dtype=torch.int64)
        instances.gt_masks = BitMasks(sample.masks)
        # The keypoints of MODEL.OBJGUIDED.CENTER_POINT "interior" (other models ignore them).
        masks = sample.masks.numpy().astype(bool)
        points = interior_points(masks, sample.boxes.numpy())
        instances.gt_interior_points = torch.from_numpy(points)
        batch.append({"image": sample.inputs["image"], "instances": instances})
    return batch
