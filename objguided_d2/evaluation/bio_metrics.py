"""Object-level metrics biologists report for instance segmentation, one class at a time.

Predictions enter as a label image: overlapping predicted masks are resolved by score-ordered
painting (:func:`paint_by_score`), each pixel going to the highest-scored mask that covers it, and
masks left without pixels are dropped. AJI, PQ and SBD are defined on label images, the object
counts a biologist reads off are those of the label image, IoU > 0.5 only gives a unique matching
when objects do not overlap, and the three architectures compared (whose masks overlap to
different degrees) are treated alike. Ground truths are used as annotated.

Per image (see :class:`ImageStatistics`):

* AJI (aggregated Jaccard index, Kumar et al., TMI 2017): every ground truth G_i takes the
  prediction S_j of largest IoU (a prediction may serve several ground truths);
  C += |G_i & S_j|, U += |G_i | S_j|. A ground truth that overlaps no prediction adds |G_i| to U
  and claims nothing. U finally adds the areas of the predictions no ground truth claimed.
  AJI = C / U.
* Matching at IoU > 0.5 (Kirillov et al., CVPR 2019), one-to-one: with non-overlapping objects at
  most one partner can exceed 0.5, so the matching is unique. (Ground truths that overlap each
  other are matched greedily by decreasing IoU, which gives the same pairs whenever they do
  not.) Matched pairs are TP, unmatched predictions FP, unmatched ground truths FN.
* SBD (symmetric best Dice, CVPPP, Scharr et al. 2016): BD(A, B) = mean over objects of A of
  their largest Dice with an object of B; SBD = min(BD(pred, gt), BD(gt, pred)).
* DiC (difference in count) = #pred - #GT.

Over a dataset (:func:`summarize`):

* AJI, SBD: mean of the per-image values over the images where they are defined (AJI needs a
  ground truth or a prediction; SBD is 0 when exactly one side is empty and undefined when both
  are, like the CVPPP code).
* PQ, SQ, RQ, precision, recall, F1 at IoU 0.5: from TP, FP, FN and the matched IoUs pooled over
  all images, as PQ is defined (Kirillov et al.). PQ = SQ * RQ with
  SQ = sum(IoU of TP) / TP (0 when TP = 0, as in the reference panopticapi),
  RQ = TP / (TP + FP / 2 + FN / 2), which is exactly F1 at IoU 0.5.
* DiC: mean signed difference; absDiC: mean |DiC| (the mean absolute count error, CVPPP |DiC|).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..modeling.mask_windows import MaskWindows, overlapping_box_pairs
from .matching import (
    encode_masks,
    encode_window,
    intersections_and_unions,
    mask_iou,
    rle_areas,
    rle_boxes,
)

# Metrics in object counts; every other metric is a ratio.
COUNT_METRICS = ("DiC", "absDiC")


def _painted_windows(masks: torch.Tensor, scores: torch.Tensor, rles: list[dict]):
    """Score-ordered painting, one mask at a time inside its tight box.

    A mask keeps the pixels that no higher-scored mask covers, so only the higher-scored masks
    whose boxes overlap its box are consulted, and only inside its box.

    Args:
        masks: bool (N, H, W) or N masks' windows; scores: (N,), ties go to the lower index;
            rles: the masks' RLEs.

    Yields:
        In decreasing score order: (index, (row slice, col slice) of the mask's tight box,
        bool crop of the painted mask in that box, whether painting removed anything).
    """
    boxes = rle_boxes(rles).astype(np.int64)
    # each mask's box-overlapping neighbours, grouped by mask (no N x N matrix: N may be 10^4)
    pairs = overlapping_box_pairs(torch.from_numpy(boxes)).numpy()
    pairs = np.concatenate([pairs, pairs[:, ::-1]])
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    first = np.searchsorted(pairs[:, 0], np.arange(len(rles) + 1))
    painted = np.zeros(len(rles), dtype=bool)
    for i in np.argsort(-scores.detach().cpu().numpy(), kind="stable").tolist():
        x0, y0, x1, y1 = boxes[i]
        window = (slice(y0, y1), slice(x0, x1))
        crop = _box_crops(masks, [i], y0, x0, y1, x1)[0]
        above = pairs[first[i] : first[i + 1], 1]
        above = above[painted[above]]
        removed = False
        if len(above):
            covered = _box_crops(masks, above, y0, x0, y1, x1).any(dim=0)
            removed = bool((crop & covered).any())
            crop = crop & ~covered
        painted[i] = True
        yield i, window, crop, removed


def _box_crops(masks, indices, y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
    """The masks ``indices`` inside the image box [y0, y1) x [x0, x1): (K, y1 - y0, x1 - x0)."""
    if isinstance(masks, MaskWindows):
        return torch.stack([masks.crop(int(i), (y0, x0), (y1 - y0, x1 - x0)) for i in indices])
    # Slice before indexing: gathers the boxes, not whole masks.
    return masks[:, y0:y1, x0:x1][torch.as_tensor(indices, device=masks.device)]


def paint_by_score(masks: torch.Tensor | MaskWindows, scores: torch.Tensor) -> torch.Tensor:
    """Label image of overlapping masks: each pixel goes to the highest-scored mask covering it.

    Args:
        masks: bool (N, H, W), or N masks' windows.
        scores: (N,); ties go to the lower index.

    Returns:
        int32 (H, W): the index of the owning mask, -1 where no mask covers the pixel.
    """
    labels = torch.full(masks.shape[1:], -1, dtype=torch.int32, device=masks.device)
    for i, window, crop, _ in _painted_windows(masks, scores, encode_masks(masks)):
        labels[window][crop] = i
    return labels


def paint_by_score_rles(masks: torch.Tensor | MaskWindows, scores: torch.Tensor) -> list[dict]:
    """The instances of :func:`paint_by_score`'s label image as RLEs, in decreasing score order;
    masks left without pixels are dropped.

    Args:
        masks: bool (N, H, W), or N masks' windows.
        scores: (N,); ties go to the lower index.
    """
    rles = encode_masks(masks)
    kept, changed = [], []
    for i, window, crop, was_changed in _painted_windows(masks, scores, rles):
        if crop.any():
            if was_changed:
                changed.append((len(kept), window, crop))
            kept.append(rles[i])
    # Re-encode only what painting changed (usually a few masks), from their boxes.
    for position, (rows, cols), crop in changed:
        kept[position] = encode_window(crop, [rows.start, cols.start], masks.shape[1:])
    return kept


def match_pairs(iou: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of predictions and ground truths with IoU > ``threshold`` (> 0.5 is
    unique for non-overlapping objects; otherwise pairs are taken by decreasing IoU).

    Args:
        iou: (P, G).

    Returns:
        (pred_indices, gt_indices) of the matched pairs, int arrays of equal length.
    """
    candidates = np.argwhere(iou > threshold)
    candidates = candidates[np.argsort(-iou[tuple(candidates.T)], kind="stable")]
    pred_used, gt_used, pairs = set(), set(), []
    for pred, gt in candidates.tolist():
        if pred not in pred_used and gt not in gt_used:
            pred_used.add(pred)
            gt_used.add(gt)
            pairs.append((pred, gt))
    pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def aggregated_jaccard(
    iou: np.ndarray, pred_areas: np.ndarray, gt_areas: np.ndarray
) -> tuple[float, float]:
    """Aggregated intersection C and union U of Kumar et al.'s AJI (AJI = C / U).

    Args:
        iou: (P, G) mask IoUs.
        pred_areas, gt_areas: (P,) and (G,) pixel counts.
    """
    inter, union = intersections_and_unions(iou, pred_areas, gt_areas)
    num_pred, num_gt = iou.shape
    if num_pred == 0:
        return 0.0, float(gt_areas.sum())
    best = iou.argmax(axis=0)
    gts = np.arange(num_gt)
    overlapping = iou[best, gts] > 0
    claimed = np.zeros(num_pred, dtype=bool)
    claimed[best[overlapping]] = True
    intersection = inter[best[overlapping], gts[overlapping]].sum()
    total_union = (
        union[best[overlapping], gts[overlapping]].sum()
        + gt_areas[~overlapping].sum()
        + pred_areas[~claimed].sum()
    )
    return float(intersection), float(total_union)


def best_dice(iou: np.ndarray) -> float:
    """BD(A, B): mean over the rows (objects of A) of the largest Dice with a column (B).

    Dice = 2 IoU / (1 + IoU), so the IoU matrix suffices. 0 when B is empty, NaN when A is.
    """
    if iou.shape[0] == 0:
        return float("nan")
    if iou.shape[1] == 0:
        return 0.0
    dice = 2 * iou / (1 + iou)
    return float(dice.max(axis=1).mean())


def symmetric_best_dice(iou: np.ndarray) -> float:
    """SBD = min(BD(pred, gt), BD(gt, pred)) from a (P, G) IoU matrix; NaN when both are empty."""
    if iou.size == 0:
        return float("nan") if iou.shape == (0, 0) else 0.0
    return min(best_dice(iou), best_dice(iou.T))


@dataclass(frozen=True)
class ImageStatistics:
    """Everything the dataset metrics need from one image (and one class)."""

    num_pred: int
    num_gt: int
    true_positives: int
    matched_iou: float  # sum of the IoUs of the matched (TP) pairs
    aji_intersection: float
    aji_union: float
    sbd: float  # NaN when the image has neither predictions nor ground truths

    @classmethod
    def from_masks(cls, pred_rles: list[dict], gt_rles: list[dict]) -> ImageStatistics:
        """Statistics of non-overlapping predicted masks against the ground-truth masks (RLEs)."""
        iou = mask_iou(pred_rles, gt_rles)
        pred_idx, gt_idx = match_pairs(iou)
        intersection, union = aggregated_jaccard(iou, rle_areas(pred_rles), rle_areas(gt_rles))
        return cls(
            num_pred=len(pred_rles),
            num_gt=len(gt_rles),
            true_positives=len(pred_idx),
            matched_iou=float(iou[pred_idx, gt_idx].sum()),
            aji_intersection=intersection,
            aji_union=union,
            sbd=symmetric_best_dice(iou),
        )

    @property
    def aji(self) -> float:
        return self.aji_intersection / self.aji_union if self.aji_union > 0 else float("nan")

    @property
    def dic(self) -> int:
        return self.num_pred - self.num_gt


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def mean_of_defined(values: Sequence[float]) -> float:
    """Mean of the values that are not NaN; NaN when none is."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def summarize(stats: Sequence[ImageStatistics], leaf_metrics: bool = False) -> dict[str, float]:
    """Dataset metrics (ratios in [0, 1], counts in objects) from per-image statistics.

    Keys: AJI, PQ, SQ, RQ, P@0.5, R@0.5, F1@0.5, [SBD if ``leaf_metrics``], DiC, absDiC. A ratio
    with nothing to measure (e.g. recall without any ground truth) is NaN.
    """
    tp = sum(s.true_positives for s in stats)
    fp = sum(s.num_pred for s in stats) - tp
    fn = sum(s.num_gt for s in stats) - tp
    matched_iou = sum(s.matched_iou for s in stats)
    rq = _ratio(tp, tp + fp / 2 + fn / 2)
    sq = (matched_iou / tp if tp else 0.0) if tp + fp + fn else float("nan")
    metrics = {
        "AJI": mean_of_defined([s.aji for s in stats]),
        "PQ": sq * rq,
        "SQ": sq,
        "RQ": rq,
        "P@0.5": _ratio(tp, tp + fp),
        "R@0.5": _ratio(tp, tp + fn),
        "F1@0.5": rq,
    }
    if leaf_metrics:
        metrics["SBD"] = mean_of_defined([s.sbd for s in stats])
    dic = np.array([s.dic for s in stats], dtype=np.float64)
    metrics["DiC"] = float(dic.mean()) if len(dic) else float("nan")
    metrics["absDiC"] = float(np.abs(dic).mean()) if len(dic) else float("nan")
    return metrics
