"""Predictions in the formats biology tools read: instance label images, COCO RLE results, overlays.

Overlaps. Instance masks of a model may overlap; a label image holds one instance per pixel. Every
instance gets the label ``1 + its rank by descending score`` (ties keep the model's order), and a
pixel covered by several instances takes the smallest label, i.e. the best-scored instance. So an
instance's region in the label image is its mask minus the masks of all better-scored instances;
an instance that these cover entirely keeps its number but has no pixel. The COCO results keep the
unresolved masks and record each instance's ``label``, which ties the two outputs together.
"""

import colorsys
from collections.abc import Sequence

import numpy as np
import tifffile
import torch
from detectron2.structures import Instances

from .evaluation.bio_metrics import paint_by_score
from .evaluation.coco import instances_to_coco_results

# The largest label a uint16 image can hold (0 is background).
MAX_LABEL = np.iinfo(np.uint16).max


def instance_labels(scores: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Label of each instance: 1 + its rank by descending score, ties in the given order.

    Args:
        scores: (N,) instance scores.

    Returns:
        (N,) int64 labels, a permutation of 1..N.
    """
    scores = np.asarray(torch.as_tensor(scores, dtype=torch.float64))
    order = np.argsort(-scores, kind="stable")
    labels = np.empty(len(scores), dtype=np.int64)
    labels[order] = np.arange(1, len(scores) + 1)
    return labels


def instances_to_label_image(instances: Instances) -> tuple[np.ndarray, np.ndarray]:
    """Label image of one image's predictions (see the module docstring for overlaps).

    Args:
        instances: predictions at the original image size, with ``pred_masks`` ((N, H, W) or
            N masks' windows) and ``scores`` (N,).

    Returns:
        (H, W) uint16 label image (0 = background) and the (N,) label of each instance.
    """
    if len(instances) > MAX_LABEL:
        raise ValueError(f"{len(instances)} instances do not fit a uint16 label image")
    scores = instances.scores.cpu()
    labels = instance_labels(scores)
    # The evaluation's overlap rule: a pixel belongs to the best-scored mask covering it (-1: none).
    owner = paint_by_score(instances.pred_masks.to("cpu"), scores).numpy()
    label_of_owner = np.append(labels, 0).astype(np.uint16)  # index -1 -> background
    return label_of_owner[owner], labels


def write_label_tiff(path: str, labels: np.ndarray) -> None:
    """Write a uint16 label image as a zlib-compressed TIFF (read by napari, Fiji and Cellpose)."""
    tifffile.imwrite(path, np.asarray(labels, dtype=np.uint16), compression="zlib")


def instances_to_results(
    instances: Instances,
    image_id: int,
    file_name: str,
    labels: np.ndarray,
    category_ids: Sequence[int] | None = None,
) -> list[dict]:
    """COCO results of one image: detectron2's RLE encoding plus ``file_name`` and ``label``.

    Args:
        instances: predictions at the original image size (on any device).
        image_id: id written into every result.
        file_name: path of the image, written into every result.
        labels: (N,) label of each instance in the image's label image.
        category_ids: dataset category id of each contiguous class (detectron2's
            ``thing_dataset_id_to_contiguous_id`` inverted); None keeps the contiguous ids.

    Returns:
        One dict per instance: image_id, file_name, category_id, bbox (XYWH), score,
        segmentation (COCO RLE, counts as str) and label.
    """
    results = instances_to_coco_results(instances, image_id)
    for result, label in zip(results, labels, strict=True):
        if category_ids is not None:
            result["category_id"] = category_ids[result["category_id"]]
        result["file_name"] = file_name
        result["label"] = int(label)
    return results


def label_colors(num_labels: int) -> np.ndarray:
    """Distinct, deterministic RGB colors: row ``k`` is the color of label ``k`` (row 0 black).

    Hues step by the golden ratio, so neighbouring labels differ strongly at any count.

    Returns:
        (num_labels + 1, 3) uint8.
    """
    colors = np.zeros((num_labels + 1, 3), dtype=np.uint8)
    for k in range(1, num_labels + 1):
        hue = (k * 0.618033988749895) % 1.0
        colors[k] = np.round(np.array(colorsys.hsv_to_rgb(hue, 0.85, 1.0)) * 255)
    return colors


def draw_overlay(
    image: np.ndarray, labels: np.ndarray, alpha: float = 0.4, band_rows: int = 512
) -> np.ndarray:
    """Instances of a label image drawn over their image: tinted regions with solid outlines.

    Args:
        image: (H, W) or (H, W, 3) uint8 RGB image.
        labels: (H, W) integer label image, 0 = background.
        alpha: opacity of the region tint (outlines are opaque).
        band_rows: rows blended at once (the float temporaries of a band, not of the image).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    colors = label_colors(int(labels.max())).astype(np.float32)
    inside = labels > 0
    # An outline pixel is a labelled pixel with a differently labelled 4-neighbour.
    padded = np.pad(labels, 1, mode="edge")
    outline = inside & (
        (padded[:-2, 1:-1] != labels)
        | (padded[2:, 1:-1] != labels)
        | (padded[1:-1, :-2] != labels)
        | (padded[1:-1, 2:] != labels)
    )
    del padded
    out = np.empty(rgb.shape, dtype=np.uint8)
    for start in range(0, labels.shape[0], band_rows):
        band = slice(start, start + band_rows)
        color = colors[labels[band]]
        pixels = rgb[band].astype(np.float32)
        tinted = np.where(inside[band, :, None], (1 - alpha) * pixels + alpha * color, pixels)
        drawn = np.where(outline[band, :, None], color, tinted)
        out[band] = np.clip(np.round(drawn), 0, 255)
    return out
