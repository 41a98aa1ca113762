"""VOC2010+ all-point AP (objguided_d2.evaluation.paper_ap): hand-computed cases, pycocotools."""

import contextlib
import io

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from objguided_d2.evaluation.matching import box_iou, encode_masks, mask_iou, rle_boxes
from objguided_d2.evaluation.paper_ap import (
    IOU_THRESHOLDS,
    greedy_voc_matches,
    pooled_average_precision,
    voc_average_precision,
)


def test_iou_thresholds_are_the_papers_ten_exact_values():
    assert IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_voc_ap_is_the_area_under_the_precision_envelope():
    # TP, FP, TP on 2 GT: recall 1/2, 1/2, 1; precision 1, 1/2, 2/3 -> 1/2 * 1 + 1/2 * 2/3.
    assert voc_average_precision(np.array([0.5, 0.5, 1.0]), np.array([1, 0.5, 2 / 3])) == (
        pytest.approx(5 / 6)
    )
    # The envelope lifts the dip at recall 0.5 (precision 2/3) to the later 3/4.
    recall = np.array([0.25, 0.25, 0.5, 0.75])
    precision = np.array([1.0, 0.5, 2 / 3, 3 / 4])
    assert voc_average_precision(recall, precision) == pytest.approx(0.25 + 0.25 * 0.75 * 2)
    assert voc_average_precision(np.zeros(0), np.zeros(0)) == 0.0


# Two GT (A, B) and three predictions in score order 0.9, 0.8, 0.7:
#   p1 overlaps A at 0.9;
#   p2 overlaps A at 0.6 (its best GT, taken by p1) and B at 0.55;
#   p3 overlaps B at exactly 0.75.
TWO_GT_THREE_PRED_IOU = np.array([[0.9, 0.0], [0.6, 0.55], [0.0, 0.75]])
TWO_GT_THREE_PRED_SCORES = np.array([0.9, 0.8, 0.7])


def test_greedy_voc_rule_does_not_fall_back_to_the_second_best_gt():
    is_tp = greedy_voc_matches(TWO_GT_THREE_PRED_IOU, [0.5, 0.75, 0.8, 0.95])
    # p2 is a false positive even at 0.5, where COCO would give it B (IoU 0.55 >= 0.5);
    # p3's IoU of exactly 0.75 passes the 0.75 threshold (>=).
    np.testing.assert_array_equal(
        is_tp,
        [
            [True, False, True],
            [True, False, True],
            [True, False, False],
            [False, False, False],
        ],
    )


def test_ap_per_threshold_of_two_gt_and_three_predictions():
    # Shuffled input order: ranking is by score.
    order = np.array([2, 0, 1])
    result = pooled_average_precision(
        [(TWO_GT_THREE_PRED_SCORES[order], TWO_GT_THREE_PRED_IOU[order])]
    )
    # IoU 0.50..0.75: TP FP TP -> 5/6; 0.80..0.90: TP FP FP -> 1/2; 0.95: nothing -> 0.
    expected = np.array([5 / 6] * 6 + [0.5] * 3 + [0.0])
    np.testing.assert_allclose(result.ap, expected)
    assert result.ap.mean() == pytest.approx(0.65)
    assert result.num_gt == 2
    np.testing.assert_array_equal(result.scores, [0.9, 0.8, 0.7])
    np.testing.assert_allclose(result.recall[0], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(result.precision[0], [1.0, 0.5, 2 / 3])


def test_predictions_are_ranked_over_all_images_together():
    # Image 1: one GT, a TP at score 0.9. Image 2: one GT, an FP at 0.95 and a TP at 0.5.
    # Pooled ranking FP, TP, TP: recall 0, 1/2, 1; precision 0, 1/2, 2/3 -> AP 2/3.
    # (The mean of per-image APs would be (1 + 1/2) / 2 instead.)
    images = [
        (np.array([0.9]), np.array([[0.8]])),
        (np.array([0.95, 0.5]), np.array([[0.3], [0.9]])),
    ]
    result = pooled_average_precision(images, thresholds=[0.5])
    np.testing.assert_allclose(result.ap, [2 / 3])
    np.testing.assert_allclose(result.precision[0], [0.0, 0.5, 2 / 3])


def test_empty_cases():
    no_predictions = pooled_average_precision([(np.zeros(0), np.zeros((0, 3)))])
    np.testing.assert_array_equal(no_predictions.ap, np.zeros(10))
    assert no_predictions.num_gt == 3

    no_gt = pooled_average_precision([(np.array([0.9, 0.4]), np.zeros((2, 0)))])
    assert np.isnan(no_gt.ap).all() and np.isnan(no_gt.recall).all()
    np.testing.assert_array_equal(no_gt.precision[0], [0.0, 0.0])

    nothing = pooled_average_precision([(np.zeros(0), np.zeros((0, 0)))])
    assert np.isnan(nothing.ap).all() and len(nothing.scores) == 0
    assert nothing.curve(0.5) == {"precision": [], "recall": [], "score": []}


def test_curve_is_subsampled_keeping_first_and_last_points():
    scores = np.linspace(1, 0.01, 250)
    iou = np.eye(250)[:, :200]  # the 200 first predictions hit one GT each, the rest miss
    result = pooled_average_precision([(scores, iou)], thresholds=[0.5, 0.75])
    curve = result.curve(0.75, max_points=200)
    assert len(curve["precision"]) == len(curve["recall"]) == len(curve["score"]) == 200
    assert curve["score"][0] == 1.0 and curve["score"][-1] == pytest.approx(0.01)
    assert curve["recall"][-1] == 1.0 and curve["precision"][-1] == pytest.approx(200 / 250)
    assert result.curve(0.5, max_points=1000)["recall"] == result.recall[0].tolist()


def _rect(rows, cols, height=40, width=60):
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def _coco_scene():
    """Three 40x60 images, one class, well-separated GT rectangles, distinct scores.

    Every prediction overlaps at most one GT, so COCO's fallback to the next-best unmatched GT
    never applies and COCO and VOC assign the same true positives.
    """
    gt = {
        1: [((2, 12), (2, 12)), ((20, 30), (5, 15)), ((25, 35), (40, 55))],
        2: [((5, 15), (30, 40)), ((25, 35), (45, 55))],
        3: [],
    }
    predictions = {  # (rows, cols, score)
        1: [
            ((3, 12), (2, 12), 0.91),  # IoU 0.9 with GT 1
            ((2, 12), (5, 15), 0.62),  # duplicate of GT 1, IoU 7/13
            ((22, 30), (5, 15), 0.55),  # IoU 0.8 with GT 2
            ((0, 5), (30, 36), 0.87),  # background
            ((25, 35), (40, 49), 0.45),  # IoU 0.6 with GT 3
        ],
        2: [((5, 15), (32, 40), 0.78), ((30, 38), (0, 8), 0.33)],  # IoU 0.8; background
        3: [((10, 20), (10, 20), 0.71)],
    }
    return gt, predictions


def _coco_eval(gt, predictions, iou_type):
    images = [{"id": i, "height": 40, "width": 60} for i in gt]
    annotations, results = [], []
    for image_id, rects in gt.items():
        for rows, cols in rects:
            rle = encode_masks(_rect(rows, cols)[None])[0]
            box = rle_boxes([rle])[0]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_util.area(rle)),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "iscrowd": 0,
                }
            )
    for image_id, preds in predictions.items():
        for rows, cols, score in preds:
            rle = encode_masks(_rect(rows, cols)[None])[0]
            box = rle_boxes([rle])[0]
            result = {"image_id": image_id, "category_id": 1, "score": score}
            if iou_type == "segm":
                result["segmentation"] = rle
            else:
                result["bbox"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            results.append(result)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}]}
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        coco_eval.params.iouThrs = np.array([0.5, 0.75])
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_true_positives_and_precision_recall_agree_with_cocoeval(iou_type):
    """Where the definitions coincide, COCOeval and the VOC evaluator rank and match alike.

    What is compared, at IoU 0.5 and 0.75 (both >=):
    * the TP/FP flag of every prediction (COCOeval's ``evalImgs[...]["dtMatches"]``);
    * the final recall (COCOeval's ``eval["recall"]``);
    * the interpolated precision at COCO's 101 recall points (``eval["precision"]``), which
      COCOeval reads off the same monotone precision envelope whose area is the VOC AP.
    The AP numbers themselves are not compared: COCO averages the envelope at 101 recall points
    (recall 0 included), VOC2010+ integrates it over all points, and the two only coincide in
    degenerate cases (e.g. precision 1 up to recall 1).
    """
    gt, predictions = _coco_scene()
    coco_eval = _coco_eval(gt, predictions, iou_type)
    thresholds = [0.5, 0.75]

    per_image = []
    for image_id in gt:
        gt_masks = [_rect(rows, cols) for rows, cols in gt[image_id]]
        preds = sorted(predictions[image_id], key=lambda p: -p[2])
        pred_masks = [_rect(rows, cols) for rows, cols, _ in preds]
        gt_rles = encode_masks(torch.stack(gt_masks)) if gt_masks else []
        pred_rles = encode_masks(torch.stack(pred_masks))
        if iou_type == "segm":
            iou = mask_iou(pred_rles, gt_rles)
        else:
            iou = box_iou(rle_boxes(pred_rles), rle_boxes(gt_rles))
        scores = np.array([p[2] for p in preds])
        per_image.append((scores, iou))

        coco_image = next(
            e
            for e in coco_eval.evalImgs
            if e is not None and e["image_id"] == image_id and e["aRng"] == [0, 1e10]
        )
        np.testing.assert_array_equal(
            coco_image["dtMatches"] > 0, greedy_voc_matches(iou, thresholds)
        )

    result = pooled_average_precision(per_image, thresholds)
    coco_precision = coco_eval.eval["precision"][:, :, 0, 0, -1]  # (T, 101), area all, 100 dets
    coco_recall = coco_eval.eval["recall"][:, 0, 0, -1]
    for t in range(len(thresholds)):
        np.testing.assert_allclose(result.recall[t, -1], coco_recall[t])
        envelope = np.maximum.accumulate(result.precision[t][::-1])[::-1]
        at = np.searchsorted(result.recall[t], coco_eval.params.recThrs, side="left")
        sampled = np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.0)
        np.testing.assert_allclose(sampled, coco_precision[t], atol=1e-12)
    # The scene does exercise both outcomes at both thresholds.
    assert 0 < result.recall[1, -1] < result.recall[0, -1] < 1
