"""Average precision as in the paper's Table I (Yi et al., TMI 2021, Sec. III-B): PASCAL VOC2010+.

Rules (one class at a time):

* Predictions of all images are pooled and ranked by score (ties: image order, then the order
  inside the image).
* Inside an image, predictions are matched greedily in score order. A prediction is a true
  positive when its best-IoU ground truth (over all ground truths of the image, matched or not)
  is still unmatched and IoU >= threshold; otherwise it is a false positive. This is the VOC rule:
  unlike COCO, a prediction whose best ground truth is taken does not fall back to its second
  best. ">=" is used for masks and boxes alike, as in VOC and COCO (the authors' code used ">" for
  masks and ">=" for boxes).
* AP is the all-point area under the monotone precision envelope (VOC2010+, not the 11-point
  VOC2007 rule and not COCO's 101-point sampling).
* The paper's APseg / APdet are the mean AP over IoU thresholds 0.50:0.05:0.95.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Rounded, so that an IoU of exactly 0.7 passes the 0.7 threshold (np.arange: 0.7000000000000001).
IOU_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.5, 0.951, 0.05), 2))


def voc_average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point VOC2010+ AP: area under the monotone (non-increasing) envelope of precision.

    Args:
        recall, precision: (N,) values after each of the N ranked predictions (recall
            non-decreasing).
    """
    recall = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.concatenate([[0.0], precision, [0.0]])
    envelope = np.maximum.accumulate(envelope[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def greedy_voc_matches(iou: np.ndarray, thresholds: Iterable[float]) -> np.ndarray:
    """True-positive flags of one image's predictions under the VOC rule, at every threshold.

    Args:
        iou: (P, G) IoUs of the predictions, sorted by decreasing score, with the ground truths.
        thresholds: T IoU thresholds.

    Returns:
        bool array (T, P).
    """
    thresholds = np.asarray(tuple(thresholds), dtype=np.float64)
    num_pred, num_gt = iou.shape
    is_tp = np.zeros((len(thresholds), num_pred), dtype=bool)
    if num_gt == 0:
        return is_tp
    best_gt = iou.argmax(axis=1)
    best_iou = iou[np.arange(num_pred), best_gt]
    matched = np.zeros((len(thresholds), num_gt), dtype=bool)
    # Sequential in score order by definition; vectorized over thresholds.
    for i, gt in enumerate(best_gt):
        hit = (best_iou[i] >= thresholds) & ~matched[:, gt]
        matched[:, gt] |= hit
        is_tp[:, i] = hit
    return is_tp


@dataclass(frozen=True)
class PrecisionRecall:
    """Pooled ranking of one class's predictions over a dataset.

    Attributes:
        thresholds: (T,) IoU thresholds.
        num_gt: number of ground-truth instances.
        scores: (N,) prediction scores in ranking order.
        precision, recall: (T, N) values after each ranked prediction; recall is NaN when
            ``num_gt == 0``.
        ap: (T,) VOC2010+ AP per threshold in [0, 1]; NaN when ``num_gt == 0`` (undefined).
    """

    thresholds: np.ndarray
    num_gt: int
    scores: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    ap: np.ndarray

    def curve(self, threshold: float, max_points: int = 200) -> dict[str, list[float]]:
        """The precision-recall curve at one threshold, evenly subsampled to ``max_points``.

        The first and last ranked predictions are always kept, so the curve ends at the final
        recall and precision.
        """
        t = int(np.flatnonzero(np.isclose(self.thresholds, threshold))[0])
        n = len(self.scores)
        keep = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))
        return {
            "precision": self.precision[t, keep].tolist(),
            "recall": self.recall[t, keep].tolist(),
            "score": self.scores[keep].tolist(),
        }


def pooled_average_precision(
    images: Iterable[tuple[np.ndarray, np.ndarray]], thresholds: Iterable[float] = IOU_THRESHOLDS
) -> PrecisionRecall:
    """VOC2010+ AP of one class with predictions pooled over all images.

    Args:
        images: per image ``(scores, iou)``: the (P,) prediction scores and the (P, G) IoUs of
            those predictions with the image's G ground truths (masks or boxes).
        thresholds: IoU thresholds (default 0.50:0.05:0.95).
    """
    thresholds = np.asarray(tuple(thresholds), dtype=np.float64)
    all_scores, all_tp, num_gt = [], [], 0
    for scores, iou in images:
        order = np.argsort(-scores, kind="stable")
        all_scores.append(scores[order])
        all_tp.append(greedy_voc_matches(iou[order], thresholds))
        num_gt += iou.shape[1]
    scores = np.concatenate([np.zeros(0), *all_scores])
    is_tp = np.concatenate([np.zeros((len(thresholds), 0), dtype=bool), *all_tp], axis=1)

    ranking = np.argsort(-scores, kind="stable")
    scores, is_tp = scores[ranking], is_tp[:, ranking]
    tp = np.cumsum(is_tp, axis=1)
    precision = tp / np.arange(1, len(scores) + 1)
    if num_gt == 0:
        recall = np.full(tp.shape, np.nan)
        ap = np.full(len(thresholds), np.nan)
    else:
        recall = tp / num_gt
        ap = np.array([voc_average_precision(r, p) for r, p in zip(recall, precision)])
    return PrecisionRecall(thresholds, num_gt, scores, precision, recall, ap)
