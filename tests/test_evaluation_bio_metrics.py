"""AJI, PQ/SQ/RQ, F1, SBD and DiC of objguided_d2.evaluation.bio_metrics on hand-made masks."""

import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from objguided_d2.evaluation.bio_metrics import (
    ImageStatistics,
    aggregated_jaccard,
    match_pairs,
    paint_by_score,
    paint_by_score_rles,
    summarize,
    symmetric_best_dice,
)
from objguided_d2.evaluation.matching import encode_masks
from objguided_d2.modeling.mask_windows import MaskWindows


def rles(height, width, *rects):
    """RLEs of rectangles given as ((row0, row1), (col0, col1)), half-open."""
    masks = torch.zeros(len(rects), height, width, dtype=torch.bool)
    for mask, (rows, cols) in zip(masks, rects):
        mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return encode_masks(masks) if rects else []


# A 10 x 12 image. GT: g1 rows 0-3 cols 0-3 (16 px), g2 rows 0-3 cols 6-9 (16 px).
# Predictions: p1 rows 0-3 cols 2-5 (16 px; 8 px on g1, IoU 1/3),
#              p2 rows 0-3 cols 6-10 (20 px; covers g2, IoU 0.8),
#              p3 rows 8-9 cols 0-1 (4 px, alone).
GT = rles(10, 12, ((0, 4), (0, 4)), ((0, 4), (6, 10)))
PRED = rles(10, 12, ((0, 4), (2, 6)), ((0, 4), (6, 11)), ((8, 10), (0, 2)))


def test_image_statistics_of_the_hand_made_scene():
    stats = ImageStatistics.from_masks(PRED, GT)
    assert (stats.num_pred, stats.num_gt, stats.true_positives) == (3, 2, 1)
    assert stats.matched_iou == pytest.approx(0.8)
    # AJI: g1 -> p1 (I 8, U 24), g2 -> p2 (I 16, U 20), p3 unclaimed (+4): 24 / 48.
    assert (stats.aji_intersection, stats.aji_union) == (24, 48)
    assert stats.aji == 0.5
    # Dice: p1-g1 2*8/32 = 1/2, p2-g2 2*16/36 = 8/9, p3 none.
    # BD(pred, gt) = (1/2 + 8/9 + 0) / 3, BD(gt, pred) = (1/2 + 8/9) / 2; SBD is the smaller.
    assert stats.sbd == pytest.approx((0.5 + 8 / 9) / 3)
    assert stats.dic == 1


def test_summary_of_one_image_pq_is_sq_times_rq_and_rq_is_f1():
    metrics = summarize([ImageStatistics.from_masks(PRED, GT)], leaf_metrics=True)
    # TP 1 (IoU 0.8), FP 2, FN 1.
    assert metrics["SQ"] == pytest.approx(0.8)
    assert metrics["RQ"] == pytest.approx(1 / (1 + 1 + 0.5))
    assert metrics["PQ"] == pytest.approx(0.8 * 0.4)
    assert metrics["P@0.5"] == pytest.approx(1 / 3)
    assert metrics["R@0.5"] == pytest.approx(1 / 2)
    assert metrics["F1@0.5"] == metrics["RQ"]
    assert metrics["AJI"] == 0.5
    assert metrics["SBD"] == pytest.approx((0.5 + 8 / 9) / 3)
    assert (metrics["DiC"], metrics["absDiC"]) == (1, 1)
    keys = ["AJI", "PQ", "SQ", "RQ", "P@0.5", "R@0.5", "F1@0.5", "SBD", "DiC", "absDiC"]
    assert list(metrics) == keys
    assert "SBD" not in summarize([ImageStatistics.from_masks(PRED, GT)])


def test_aji_reuses_a_prediction_and_counts_unmatched_gt_area_only():
    # One prediction covers two adjacent 16 px GTs (IoU 0.5 each); a third GT (4 px) is missed.
    gt = rles(10, 12, ((0, 4), (0, 4)), ((0, 4), (4, 8)), ((8, 10), (8, 10)))
    pred = rles(10, 12, ((0, 4), (0, 8)))
    stats = ImageStatistics.from_masks(pred, gt)
    # C = 16 + 16; U = 32 + 32 (the prediction enters both unions) + 4.
    assert (stats.aji_intersection, stats.aji_union) == (32, 68)
    # IoU exactly 0.5 is not a match (> 0.5).
    assert stats.true_positives == 0


def test_empty_predictions_empty_gt_and_both_empty():
    no_pred = ImageStatistics.from_masks([], GT)
    assert (no_pred.aji, no_pred.sbd, no_pred.dic) == (0.0, 0.0, -2)
    metrics = summarize([no_pred], leaf_metrics=True)
    assert (metrics["PQ"], metrics["SQ"], metrics["RQ"], metrics["R@0.5"]) == (0, 0, 0, 0)
    assert math.isnan(metrics["P@0.5"])

    no_gt = ImageStatistics.from_masks(PRED, [])
    assert (no_gt.aji, no_gt.sbd, no_gt.dic) == (0.0, 0.0, 3)
    metrics = summarize([no_gt])
    assert (metrics["PQ"], metrics["P@0.5"], metrics["F1@0.5"]) == (0, 0, 0)
    assert math.isnan(metrics["R@0.5"])

    nothing = ImageStatistics.from_masks([], [])
    assert math.isnan(nothing.aji) and math.isnan(nothing.sbd) and nothing.dic == 0
    metrics = summarize([nothing], leaf_metrics=True)
    assert (metrics["DiC"], metrics["absDiC"]) == (0, 0)
    assert all(math.isnan(v) for k, v in metrics.items() if k not in ("DiC", "absDiC"))


def test_dataset_aggregation_means_aji_and_sbd_and_pools_pq_counts():
    stats = [
        ImageStatistics.from_masks(PRED, GT),  # AJI 0.5, TP 1, FP 2, FN 1, DiC +1
        ImageStatistics.from_masks([], rles(10, 12, ((0, 4), (0, 4)))),  # AJI 0, FN 1, DiC -1
        ImageStatistics.from_masks([], []),  # AJI and SBD undefined, DiC 0
    ]
    metrics = summarize(stats, leaf_metrics=True)
    assert metrics["AJI"] == pytest.approx(0.25)
    assert metrics["SBD"] == pytest.approx((0.5 + 8 / 9) / 3 / 2)
    # Pooled TP 1, FP 2, FN 2.
    assert metrics["RQ"] == pytest.approx(1 / 3)
    assert metrics["SQ"] == pytest.approx(0.8)
    assert metrics["PQ"] == pytest.approx(0.8 / 3)
    assert metrics["P@0.5"] == pytest.approx(1 / 3) and metrics["R@0.5"] == pytest.approx(1 / 3)
    assert metrics["DiC"] == 0 and metrics["absDiC"] == pytest.approx(2 / 3)


def test_symmetric_best_dice_of_a_known_pair():
    # One pair at IoU 1/3 (Dice 1/2) plus an extra prediction: min((1/2 + 0) / 2, 1/2).
    assert symmetric_best_dice(np.array([[1 / 3], [0.0]])) == pytest.approx(0.25)
    assert symmetric_best_dice(np.zeros((0, 2))) == 0.0
    assert math.isnan(symmetric_best_dice(np.zeros((0, 0))))


def test_aggregated_jaccard_from_matrices():
    # GT 0 best overlaps pred 1 (IoU 1/3 of two 10 px masks: I 5, U 15); GT 1 (5 px) overlaps
    # nothing; pred 0 (7 px) is unclaimed.
    iou = np.array([[0.0, 0.0], [1 / 3, 0.0]])
    pred_areas, gt_areas = np.array([7.0, 10.0]), np.array([10.0, 5.0])
    assert aggregated_jaccard(iou, pred_areas, gt_areas) == (5, 15 + 5 + 7)
    assert aggregated_jaccard(np.zeros((0, 1)), np.zeros(0), np.array([9.0])) == (0, 9)


def test_match_pairs_takes_pairs_by_decreasing_iou():
    iou = np.array([[0.6, 0.8], [0.7, 0.0], [0.55, 0.0]])
    pred, gt = match_pairs(iou)
    assert sorted(zip(pred.tolist(), gt.tolist())) == [(0, 1), (1, 0)]
    pred, gt = match_pairs(np.zeros((0, 2)))
    assert pred.shape == gt.shape == (0,)


def test_paint_by_score_gives_contested_pixels_to_the_higher_score():
    masks = torch.zeros(3, 4, 3, dtype=torch.bool)
    masks[0, 0:3] = True  # score 0.6
    masks[1, 1:4] = True  # score 0.9: wins rows 1-2
    masks[2, 2] = True  # score 0.3, inside mask 1: no pixel left
    labels = paint_by_score(masks, torch.tensor([0.6, 0.9, 0.3]))
    expected = torch.tensor([[0] * 3, [1] * 3, [1] * 3, [1] * 3])
    assert torch.equal(labels, expected)

    # Ties go to the lower index; uncovered pixels are -1.
    tied = torch.zeros(2, 1, 3, dtype=torch.bool)
    tied[:, 0, :2] = True
    assert paint_by_score(tied, torch.tensor([0.5, 0.5])).tolist() == [[0, 0, -1]]
    assert paint_by_score(torch.zeros(0, 2, 2, dtype=torch.bool), torch.zeros(0)).tolist() == [
        [-1, -1],
        [-1, -1],
    ]


def test_painting_matches_a_pixel_by_pixel_reference():
    # 40 random rectangles on 30 x 40 with repeated scores (ties), some fully covered.
    generator = torch.Generator().manual_seed(3)
    masks = torch.zeros(40, 30, 40, dtype=torch.bool)
    for mask in masks:
        y0, x0 = torch.randint(0, 25, (2,), generator=generator).tolist()
        h, w = torch.randint(1, 12, (2,), generator=generator).tolist()
        mask[y0 : y0 + h, x0 : x0 + w] = True
    scores = torch.randint(0, 5, (40,), generator=generator).float()

    reference = torch.full((30, 40), -1, dtype=torch.int32)
    for y in range(30):
        for x in range(40):
            covering = [i for i in range(40) if masks[i, y, x]]
            if covering:  # highest score, then lowest index
                reference[y, x] = min(covering, key=lambda i: (-scores[i].item(), i))
    windows = MaskWindows.from_masks(masks).tight()  # each mask in the window of its box
    assert torch.equal(paint_by_score(masks, scores), reference)
    assert torch.equal(paint_by_score(windows, scores), reference)

    order = sorted(range(40), key=lambda i: (-scores[i].item(), i))
    expected = [reference == i for i in order if (reference == i).any()]
    painted = mask_util.decode(paint_by_score_rles(masks, scores)).transpose(2, 0, 1)
    assert len(expected) < 40  # some masks were covered entirely
    np.testing.assert_array_equal(painted, torch.stack(expected).numpy())
    assert paint_by_score_rles(windows, scores) == paint_by_score_rles(masks, scores)
    assert paint_by_score_rles(torch.zeros(0, 3, 3, dtype=torch.bool), torch.zeros(0)) == []
