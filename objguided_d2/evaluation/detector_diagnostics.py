"""Where an ObjGuided model's detections go wrong: does the center heatmap fire on each object, and
are the decoded boxes the objects' size?

For every ground-truth object of a dataset (boxes scaled to the network input, as the test mapper
resizes the image):

* its *center peak*: the highest center score in the 3 x 3 output cells around the cell that
  carries its keypoint (the heatmap target's peak: the box centre, or the innermost pixel of its
  mask with ``MODEL.OBJGUIDED.CENTER_POINT "interior"``);
* its *matched detection*: the detection (score at least the threshold) of highest box IoU with it,
  if that IoU exceeds 0.5, whose width and height are compared with the object's;
* its *size-head box*: the width and height that the size head predicts at the cell of its
  keypoint, detected or not, compared with the object's.

Summaries: center recall (share of objects whose center peak reaches the threshold), detections
and objects per image, the median predicted / true width and height over matched objects and
the median size-head / true width and height over all objects, in all and per object size; and,
a property of the data, the share of objects whose box centre lies on the object itself (not on
background or a neighbour).

:func:`masks_on_true_boxes` measures the mask branch alone, the detector bypassed: each object's
mask predicted from its own ground-truth box, its IoU with the object's mask, and how much of the
object's thin parts (protrusions under ``THIN_PART_WIDTH`` px wide) and of the rest it misses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, BoxMode, Instances, pairwise_iou

from ..data.formats import segmentation_to_rle
from ..data.mapper import interior_points, tight_boxes
from ..modeling.center_head import box_extents

__all__ = [
    "SIZE_BINS",
    "THIN_PART_WIDTH",
    "diagnose_detector",
    "masks_on_true_boxes",
    "summarize_detections",
    "thin_parts",
]

# Object sizes (sqrt of the box area, network-input pixels) the size ratios are reported for.
SIZE_BINS = (0, 20, 40, 80, float("inf"))
# Logit step between the scores that rank the objects of masks_on_true_boxes: sigmoid keeps
# thousands of such steps apart in float32.
RANK_STEP = 1e-3
# Diameter (px, original image) of the disc whose morphological opening removes an object's thin
# parts: protrusions narrower than this.
THIN_PART_WIDTH = 5


@torch.no_grad()
def diagnose_detector(
    model: torch.nn.Module, inputs: Iterable[tuple[dict, dict]], score_thresh: float
) -> dict:
    """Per-object measurements of an ObjGuidedSegmentor's detector, summarized.

    Args:
        model: an ObjGuidedSegmentor in eval mode.
        inputs: (dataset record, test-mapper output) pairs.
        score_thresh: center score a detection needs.

    Returns:
        :func:`summarize_detections` of the per-object measurements, plus
        "box_center_on_object".
    """
    generator = model.proposal_generator
    peaks, gt_sizes, pred_sizes, head_sizes, detections, centered = [], [], [], [], [], []
    for record, mapped in inputs:
        images = model.preprocess_image([mapped])
        features = model.backbone(images.tensor)
        heatmap, wh, offset = generator.predict_maps(features[generator.in_feature])
        (proposals,) = generator.decode(heatmap, wh, offset, images.image_sizes)
        height, width = images.image_sizes[0]
        gt = _input_boxes(record, (height, width))
        kept = proposals[proposals.objectness_logits.sigmoid() >= score_thresh]
        detections.append(len(kept))
        interior, center_on_object = _object_points(_object_masks(record), (height, width))
        centered.append(center_on_object)
        keypoints = (
            interior if generator.center_point == "interior" else (gt[:, :2] + gt[:, 2:]) / 2
        )
        peaks.append(_peaks_at(heatmap.sigmoid().amax(dim=1)[0], keypoints, generator.stride))
        gt_sizes.append(gt[:, 2:] - gt[:, :2])
        pred_sizes.append(_matched_sizes(gt, kept.proposal_boxes.tensor))
        head_sizes.append(_size_head_at(generator, wh[0], keypoints))
    summary = summarize_detections(
        torch.cat(peaks),
        torch.cat(gt_sizes),
        torch.cat(pred_sizes),
        torch.cat(head_sizes),
        detections,
        score_thresh,
    )
    summary["box_center_on_object"] = float(np.concatenate(centered).mean())
    return summary


@torch.no_grad()
def masks_on_true_boxes(model: torch.nn.Module, inputs: Iterable[tuple[dict, dict]]) -> dict:
    """The mask branch of an ObjGuidedSegmentor on the ground-truth boxes: each object's mask
    predicted from its own box and keypoint (the detector bypassed, no mask NMS), at the original
    size, and its IoU with the object's mask. A branch that segments the wrong object of a crowded
    box, or only part of its object, scores low here whatever the detector does.

    Args:
        model: an ObjGuidedSegmentor in eval mode.
        inputs: (dataset record, test-mapper output) pairs.

    Returns:
        {"objects", "mean_iou", "iou_0.5", "iou_0.75" (shares of objects with an IoU of at
        least 0.5, 0.75), "on_other_objects" (mean over the non-empty masks of the share of
        their pixels that lie on other objects), "thin_share" (share of the objects' pixels in
        thin parts, :func:`thin_parts`), "thin_missed" and "core_missed" (shares of the thin
        parts' and of the other pixels that the masks miss; pixels pooled over all objects),
        "by_size": [{"size": (lo, hi), "objects", "mean_iou", "iou_0.5", "iou_0.75"}, ...]},
        sizes as in :func:`diagnose_detector`.
    """
    heads = model.roi_heads
    ious, sides, on_others = [], [], []
    # pixels of thin parts and of the rest: [all, missed]
    thin_pixels, core_pixels = np.zeros(2, np.int64), np.zeros(2, np.int64)
    nms_thresh, cap, refine_steps, confidence_score = (
        heads.mask_nms_thresh,
        heads.detections_per_image,
        heads.box_refine_steps,
        heads.mask_confidence_score,
    )
    heads.mask_nms_thresh = 1.0  # an IoU never exceeds 1: nothing is suppressed
    heads.box_refine_steps = 0  # the masks of the true boxes themselves
    heads.mask_confidence_score = False  # the scores carry the objects' ranks
    try:
        for record, mapped in inputs:
            images = model.preprocess_image([mapped])
            features = model.backbone(images.tensor)
            boxes = _input_boxes(record, images.image_sizes[0])
            masks = _object_masks(record)
            heads.detections_per_image = len(boxes)
            proposals = Instances(images.image_sizes[0])
            proposals.proposal_boxes = Boxes(boxes)
            # decreasing scores: a prediction's rank is the index of its object
            proposals.objectness_logits = -RANK_STEP * torch.arange(len(boxes)).float()
            proposals.pred_classes = torch.zeros(len(boxes), dtype=torch.long)
            if model.proposal_generator.center_point == "interior":  # else the boxes' centres
                proposals.proposal_keypoints = _object_points(masks, images.image_sizes[0])[0]
            height, width = record["height"], record["width"]
            (predicted,), _ = heads(images, features, [proposals], output_sizes=[(height, width)])
            objects = [torch.from_numpy(mask) for mask in masks]
            coverage = torch.stack(objects).sum(dim=0) if objects else None  # objects per pixel
            # a missing prediction (an ROI too small to segment, an empty mask) scores 0
            image_ious = torch.zeros(len(objects))
            missed = [truth.numpy() for truth in objects]  # what no mask covers
            ranks = torch.round(-torch.logit(predicted.scores.double()) / RANK_STEP).long()
            for row, rank in enumerate(ranks.tolist()):
                mask, truth = predicted.pred_masks.to_masks(torch.tensor([row]))[0], objects[rank]
                image_ious[rank] = (mask & truth).sum() / (mask | truth).sum().clamp(min=1)
                missed[rank] = (truth & ~mask).numpy()
                if mask.any():
                    on_others.append(float((coverage[mask] > truth[mask]).float().mean()))
            for truth, not_covered in zip(masks, missed):
                thin = thin_parts(truth)
                thin_pixels += [thin.sum(), (thin & not_covered).sum()]
                core_pixels += [truth.sum() - thin.sum(), (~thin & not_covered).sum()]
            ious.append(image_ious)
            sides.append((boxes[:, 2:] - boxes[:, :2]).prod(dim=1).sqrt())
    finally:
        heads.mask_nms_thresh, heads.detections_per_image = nms_thresh, cap
        heads.box_refine_steps, heads.mask_confidence_score = refine_steps, confidence_score
    ious, side = torch.cat(ious).numpy(), torch.cat(sides).numpy()

    def iou_summary(rows: np.ndarray) -> dict:
        values = ious[rows]
        share = (lambda t: float((values >= t).mean())) if rows.any() else lambda t: float("nan")
        return {
            "objects": int(rows.sum()),
            "mean_iou": float(values.mean()) if rows.any() else float("nan"),
            "iou_0.5": share(0.5),
            "iou_0.75": share(0.75),
        }

    return {
        **iou_summary(np.ones(len(ious), bool)),
        "on_other_objects": float(np.mean(on_others)) if on_others else float("nan"),
        "thin_share": _share(thin_pixels[0], thin_pixels[0] + core_pixels[0]),
        "thin_missed": _share(thin_pixels[1], thin_pixels[0]),
        "core_missed": _share(core_pixels[1], core_pixels[0]),
        "by_size": [
            {"size": (lo, hi), **iou_summary((side >= lo) & (side < hi))}
            for lo, hi in zip(SIZE_BINS[:-1], SIZE_BINS[1:])
        ],
    }


def thin_parts(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of an object's (H, W) mask in parts narrower than
    ``THIN_PART_WIDTH`` px, those that a morphological opening with a disc of that diameter
    removes (thin protrusions, and the corners of the rest)."""
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (THIN_PART_WIDTH, THIN_PART_WIDTH))
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, disc).astype(bool)
    return mask.astype(bool) & ~opened


def _share(part: int, whole: int) -> float:
    return float(part / whole) if whole else float("nan")


def _input_boxes(record: dict, input_hw: Sequence[int]) -> torch.Tensor:
    """(G, 4) XYXY ground-truth boxes of a record, scaled to the network input."""
    boxes = [
        BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
        for a in record["annotations"]
        if not a.get("iscrowd", 0)
    ]
    scale = torch.tensor([input_hw[1] / record["width"], input_hw[0] / record["height"]] * 2)
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale


def _object_points(
    masks: Sequence[np.ndarray], input_hw: Sequence[int]
) -> tuple[torch.Tensor, np.ndarray]:
    """Of each (H, W) ground-truth mask of an image (:func:`_object_masks`): its innermost pixel
    (G, 2), scaled to the network input, and whether its box's centre pixel lies on it (G,)."""
    points = np.zeros((len(masks), 2), np.float32)
    on_object = np.zeros(len(masks), bool)
    for index, mask in enumerate(masks):
        box = tight_boxes(mask[None])
        points[index] = interior_points(mask[None], box)[0]
        x, y = ((box[0, :2] + box[0, 2:]) / 2).astype(int)
        on_object[index] = mask[y, x]  # inside the image: the box is the mask's
    height, width = masks[0].shape if masks else input_hw
    scale = torch.tensor([input_hw[1] / width, input_hw[0] / height])
    return torch.from_numpy(points) * scale, on_object


def _object_masks(record: dict) -> list[np.ndarray]:
    """The (H, W) bool masks of a record's ground-truth objects (crowd regions left out)."""
    height, width = record["height"], record["width"]
    return [
        mask_util.decode(segmentation_to_rle(a["segmentation"], height, width)).astype(bool)
        for a in record["annotations"]
        if not a.get("iscrowd", 0)
    ]


def _keypoint_cells(
    keypoints: torch.Tensor, stride: int, map_hw: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G,) rows and (G,) columns of the cells of an (H, W) output map that carry the (G, 2)
    keypoints (network-input pixels), clamped to the map."""
    cells = (keypoints / stride).floor().long()
    return cells[:, 1].clamp(0, map_hw[0] - 1), cells[:, 0].clamp(0, map_hw[1] - 1)


def _peaks_at(heatmap: torch.Tensor, keypoints: torch.Tensor, stride: int) -> torch.Tensor:
    """(G,) highest score of the (H, W) heatmap in the 3 x 3 cells around the cell of each (G, 2)
    keypoint (network-input pixels)."""
    pooled = F.max_pool2d(heatmap[None, None], 3, stride=1, padding=1)[0, 0]
    return pooled[_keypoint_cells(keypoints, stride, heatmap.shape)]


def _size_head_at(generator, sizes: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
    """(G, 2) width, height (network-input pixels) of the boxes that the size map (2 or 4, H, W)
    of ``generator`` gives at the cells of the (G, 2) keypoints."""
    sizes = generator.decoded_sizes(sizes)
    cells = _keypoint_cells(keypoints, generator.stride, sizes.shape[1:])
    low, high = box_extents(sizes[(slice(None), *cells)].T)
    return (low + high) * generator.stride


def _matched_sizes(gt: torch.Tensor, detections: torch.Tensor) -> torch.Tensor:
    """(G, 2) width, height of each object's best-IoU detection if IoU > 0.5, else NaN."""
    sizes = torch.full((len(gt), 2), float("nan"))
    if len(gt) and len(detections):
        iou = pairwise_iou(Boxes(gt), Boxes(detections))
        best_iou, best = iou.max(dim=1)
        matched = best_iou > 0.5
        sizes[matched] = (detections[:, 2:] - detections[:, :2])[best[matched]]
    return sizes


def summarize_detections(
    peaks: torch.Tensor,
    gt_sizes: torch.Tensor,
    pred_sizes: torch.Tensor,
    head_sizes: torch.Tensor,
    detections: Sequence[int],
    score_thresh: float,
) -> dict:
    """Summary of per-object measurements.

    Args:
        peaks: (G,) center peak of every object.
        gt_sizes, pred_sizes: (G, 2) width, height of every object and of its matched detection
            (NaN where none matched).
        head_sizes: (G, 2) width, height of the size head's box at every object's keypoint.
        detections: the number of detections of each image.
        score_thresh: the score threshold the measurements used.

    Returns:
        {"score_thresh", "images", "detections_per_image", "objects_per_image", "objects",
        "center_recall", "matched", "median_width_ratio", "median_height_ratio",
        "median_head_width_ratio", "median_head_height_ratio", "by_size": [{"size": (lo, hi),
        "objects", and the same per object size}, ...]}.
    """
    ratios = (pred_sizes / gt_sizes).numpy()
    head_ratios = (head_sizes / gt_sizes).numpy()
    side = gt_sizes.prod(dim=1).sqrt().numpy()

    def medians(values: np.ndarray) -> list[float]:
        return np.median(values, axis=0).tolist() if len(values) else [np.nan, np.nan]

    def ratio_summary(rows: np.ndarray) -> dict:
        matched = rows & ~np.isnan(ratios[:, 0])
        found = peaks.numpy()[rows] >= score_thresh
        (width, height), (head_width, head_height) = (
            medians(ratios[matched]),
            medians(head_ratios[rows]),
        )
        return {
            "objects": int(rows.sum()),
            "center_recall": float(found.mean()) if rows.any() else float("nan"),
            "matched": int(matched.sum()),
            "median_width_ratio": width,
            "median_height_ratio": height,
            "median_head_width_ratio": head_width,
            "median_head_height_ratio": head_height,
        }

    every = np.ones(len(side), bool)
    return {
        "score_thresh": score_thresh,
        "images": len(detections),
        "detections_per_image": float(np.mean(detections)) if detections else 0.0,
        "objects_per_image": len(side) / max(len(detections), 1),
        **ratio_summary(every),
        "by_size": [
            {"size": (lo, hi), **ratio_summary((side >= lo) & (side < hi))}
            for lo, hi in zip(SIZE_BINS[:-1], SIZE_BINS[1:])
        ],
    }
