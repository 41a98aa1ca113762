"""Evaluation: the paper's AP (VOC2010+ all-point, IoU 0.50:0.95, masks and boxes) and the
object-level metrics biologists report (AJI, PQ, F1, SBD, counting errors), as detectron2
evaluators.

Not imported by ``import objguided_d2``; ``from objguided_d2.evaluation import ...`` loads it.
"""

from .bio_metrics import ImageStatistics, paint_by_score, paint_by_score_rles, summarize
from .coco import WindowCOCOEvaluator, instances_to_coco_results
from .detector_diagnostics import diagnose_detector, masks_on_true_boxes, summarize_detections
from .evaluator import BiologyEvaluator, PaperAPEvaluator
from .matching import box_iou, encode_masks, mask_iou
from .paper_ap import IOU_THRESHOLDS, PrecisionRecall, pooled_average_precision

__all__ = [
    "BiologyEvaluator",
    "IOU_THRESHOLDS",
    "ImageStatistics",
    "PaperAPEvaluator",
    "PrecisionRecall",
    "WindowCOCOEvaluator",
    "box_iou",
    "diagnose_detector",
    "encode_masks",
    "instances_to_coco_results",
    "mask_iou",
    "masks_on_true_boxes",
    "paint_by_score",
    "paint_by_score_rles",
    "pooled_average_precision",
    "summarize",
    "summarize_detections",
]
