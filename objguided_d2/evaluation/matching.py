"""Instance masks as COCO RLEs and the overlap matrices every metric of the package is built on.

Masks are compressed COCO RLEs (``{"size": [H, W], "counts": bytes | str}``) at the original image
resolution, so that pycocotools' C routines compute areas, tight boxes and IoUs without decoding.
Boxes are float arrays in XYXY_ABS with continuous coordinates (no "+1" in widths).
"""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import torch

from ..modeling.mask_windows import MaskWindows

# Masks encoded per call to pycocotools: bounds the uint8 copy to CHUNK x H x W.
_ENCODE_CHUNK = 64
# pycocotools (2.0.11) sizes its area output with a uint8 scalar, which NumPy 2 refuses beyond 255.
_AREA_CHUNK = 255


def encode_masks(masks: torch.Tensor | MaskWindows) -> list[dict]:
    """Compressed RLEs of binary masks.

    Args:
        masks: bool or uint8 tensor of shape (N, H, W), on any device, or N masks' windows
            (encoded from the windows, never written out at full size).

    Returns:
        N RLE dicts, in order.
    """
    if isinstance(masks, MaskWindows):
        return [
            encode_window(masks.window(i), masks.origins[i].tolist(), masks.image_hw)
            for i in range(len(masks))
        ]
    rles = []
    for chunk in masks.split(_ENCODE_CHUNK):
        # pycocotools wants an H x W x N uint8 array in Fortran order.
        array = np.asfortranarray(chunk.to(device="cpu", dtype=torch.uint8).permute(1, 2, 0))
        rles.extend(mask_util.encode(array))
    return rles


def encode_window(window: torch.Tensor, origin: list[int], image_hw: tuple[int, int]) -> dict:
    """Compressed RLE of the (H, W) image mask whose pixels are all in ``window`` ((h, w) bool
    at image position ``origin`` (y, x)), the same as :func:`encode_masks` of the full mask."""
    height, width = image_hw
    # Foreground pixels in the column-major order of COCO's RLE, as positions in the full image.
    cols, rows = np.nonzero(window.cpu().numpy().T)
    positions = (origin[1] + cols) * height + (origin[0] + rows)
    if positions.size == 0:
        counts = np.array([height * width])
    else:
        run_breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        starts = positions[np.r_[0, run_breaks]]
        ends = positions[np.r_[run_breaks - 1, positions.size - 1]] + 1
        edges = np.stack((starts, ends), axis=1).reshape(-1)
        # alternating background / foreground runs; a mask ending on the last pixel ends on its run
        counts = np.diff(np.r_[0, edges, height * width])
        counts = counts[:-1] if counts[-1] == 0 else counts
    return mask_util.frPyObjects(
        {"counts": counts.tolist(), "size": [height, width]}, height, width
    )


def annotation_to_rle(segmentation, height: int, width: int) -> dict:
    """Compressed RLE of a COCO ``segmentation`` field: polygons, uncompressed or compressed RLE."""
    if isinstance(segmentation, list):
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_util.frPyObjects(segmentation, height, width)
    return segmentation


def rle_areas(rles: list[dict]) -> np.ndarray:
    """Pixel counts of the masks, float64 array of shape (N,)."""
    chunks = [mask_util.area(rles[i : i + _AREA_CHUNK]) for i in range(0, len(rles), _AREA_CHUNK)]
    return np.concatenate([np.zeros(0), *chunks]).astype(np.float64)


def rle_boxes(rles: list[dict]) -> np.ndarray:
    """Tight boxes of the masks, float64 (N, 4) XYXY_ABS: a pixel (x, y) spans [x, x + 1)."""
    if not rles:
        return np.zeros((0, 4))
    boxes = mask_util.toBbox(rles).astype(np.float64)
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def mask_iou(pred_rles: list[dict], gt_rles: list[dict]) -> np.ndarray:
    """IoU matrix of two mask sets, float64 (P, G); empty masks have IoU 0 with everything."""
    if not pred_rles or not gt_rles:
        return np.zeros((len(pred_rles), len(gt_rles)))
    return mask_util.iou(pred_rles, gt_rles, [0] * len(gt_rles))


def box_iou(pred_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """IoU matrix of XYXY boxes (P, 4) and (G, 4), float64 (P, G); degenerate boxes give 0."""
    pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(pred_boxes[:, None, :2], gt_boxes[None, :, :2])
    bottom_right = np.minimum(pred_boxes[:, None, 2:], gt_boxes[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)

    def area(boxes):
        return np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(axis=1)

    union = area(pred_boxes)[:, None] + area(gt_boxes)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def intersections_and_unions(
    iou: np.ndarray, pred_areas: np.ndarray, gt_areas: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel intersections and unions (P, G) recovered exactly from an IoU matrix and the areas.

    From IoU = I / (a + b - I): I = IoU (a + b) / (1 + IoU). Pixel counts are integers and the IoU
    is a double, so rounding restores them exactly for any realistic image size.
    """
    sums = pred_areas[:, None] + gt_areas[None, :]
    inter = np.rint(iou * sums / (1.0 + iou))
    return inter, sums - inter
