"""Detectron2 ``DatasetEvaluator``s: the paper's AP table and the biology metrics.

Both evaluators

* read the ground truth of ``dataset_name`` from ``DatasetCatalog`` (original-resolution
  annotations: compressed or uncompressed RLE or polygons; ``iscrowd`` annotations are left out),
  pairing each processed image by ``image_id`` or, failing that, ``file_name``;
* take the outputs every architecture of the project returns, ``Instances`` at the original image
  size with full-image ``pred_masks``, ``pred_boxes``, ``scores`` and ``pred_classes``;
* work in any number of processes like detectron2's ``COCOEvaluator``: each process encodes its
  images' predictions as RLEs on the CPU, the main process gathers them and computes;
* evaluate every class separately and report the mean over the classes present in the ground
  truth, plus per-class values ("<metric>-<class name>");
* return ``{task: {metric: float}}`` (flat, as ``DefaultTrainer.test``'s ``print_csv_format``
  and ``EvalHook`` require), log tables, and write the full report, per-class and per-threshold
  values and curves included, to one JSON file in ``output_dir`` (undefined values as null).

Ratios are in percent (0-100, as detectron2 reports AP); counts are in objects.
"""

from __future__ import annotations

import abc
import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table
from tabulate import tabulate

from .bio_metrics import (
    COUNT_METRICS,
    ImageStatistics,
    mean_of_defined,
    paint_by_score_rles,
    summarize,
)
from .matching import (
    annotation_to_rle,
    box_iou,
    encode_masks,
    mask_iou,
    rle_boxes,
)
from .paper_ap import IOU_THRESHOLDS, PrecisionRecall, pooled_average_precision

# IoU thresholds of the AP50 / AP75 columns and of the precision-recall curves in the JSON.
_CURVE_THRESHOLDS = (0.5, 0.75)
_MAX_CURVE_POINTS = 200


@dataclass(frozen=True)
class _GroundTruth:
    """One image's annotations: G RLEs, (G, 4) XYXY_ABS boxes, (G,) contiguous class ids."""

    image_size: tuple[int, int]
    rles: list
    boxes: np.ndarray
    classes: np.ndarray

    @classmethod
    def from_dataset_dict(cls, record: dict) -> _GroundTruth:
        height, width = record["height"], record["width"]
        annotations = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
        return cls(
            image_size=(height, width),
            rles=[annotation_to_rle(a["segmentation"], height, width) for a in annotations],
            boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4),
            classes=np.array([a["category_id"] for a in annotations], dtype=np.int64),
        )


def _take(rles: list, selection: np.ndarray) -> list:
    return [rles[i] for i in np.flatnonzero(selection)]


def _table(rows: list[list], headers: list[str]) -> str:
    """Pipe table whose first column (an IoU or a class name) is printed as given."""
    return tabulate(
        rows,
        headers=headers,
        tablefmt="pipe",
        floatfmt=".3f",
        numalign="center",
        disable_numparse=[0],
    )


def _json_ready(value):
    """NaN -> None (JSON has no NaN), recursively."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class _InstanceEvaluator(DatasetEvaluator, abc.ABC):
    """Gathering, ground-truth pairing, class bookkeeping and output shared by the evaluators.

    Subclasses set ``_task`` (the results key) and ``_json_name`` and implement ``_encode`` and
    ``_compute``.
    """

    _task: str
    _json_name: str

    def __init__(self, dataset_name: str, output_dir: str | None = None):
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._thing_classes = MetadataCatalog.get(dataset_name).get("thing_classes")
        self._logger = logging.getLogger(__name__)
        self._records = []

    def reset(self):
        self._records = []

    def process(self, inputs, outputs):
        for image, output in zip(inputs, outputs):
            instances = output["instances"]
            self._records.append(
                {
                    "image_id": image.get("image_id"),
                    "file_name": image.get("file_name"),
                    "image_size": tuple(instances.image_size),
                    **self._encode(instances),
                }
            )

    def evaluate(self):
        comm.synchronize()
        records = list(itertools.chain(*comm.gather(self._records, dst=0)))
        if not comm.is_main_process():
            return {}
        if not records:
            self._logger.warning(f"[{type(self).__name__}] received no predictions.")
            return {}
        images = self._pair_with_ground_truth(records)
        report, results = self._compute(images, self._class_ids(images))
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, self._json_name)
            with PathManager.open(path, "w") as f:
                json.dump(_json_ready(report), f, indent=1)
            self._logger.info(f"Wrote {path}")
        return OrderedDict([(self._task, results)])

    def _pair_with_ground_truth(self, records: list[dict]) -> list[tuple[dict, _GroundTruth]]:
        """(prediction record, ground truth) per processed image, in dataset order."""
        dataset = DatasetCatalog.get(self._dataset_name)
        by_id = {d["image_id"]: i for i, d in enumerate(dataset) if "image_id" in d}
        by_file = {d["file_name"]: i for i, d in enumerate(dataset)}
        indexed = {}
        for record in records:
            index = by_id.get(record["image_id"], by_file.get(record["file_name"]))
            if index is None:
                raise KeyError(
                    f"Dataset '{self._dataset_name}' has no image with image_id="
                    f"{record['image_id']!r} or file_name={record['file_name']!r}."
                )
            gt = _GroundTruth.from_dataset_dict(dataset[index])
            if record["image_size"] != gt.image_size:
                raise ValueError(
                    f"Predictions for {record['file_name']} are {record['image_size']} (H, W) but "
                    f"the image is {gt.image_size}: outputs must be at the original resolution."
                )
            indexed[index] = (record, gt)
        if len(indexed) < len(dataset):
            self._logger.warning(
                f"Evaluating {len(indexed)} of the {len(dataset)} images of "
                f"'{self._dataset_name}': the others received no predictions."
            )
        return [indexed[i] for i in sorted(indexed)]

    def _class_ids(self, images: list[tuple[dict, _GroundTruth]]) -> list[int]:
        if self._thing_classes is not None:
            return list(range(len(self._thing_classes)))
        seen = set()
        for record, gt in images:
            seen.update(record["classes"].tolist(), gt.classes.tolist())
        return sorted(seen)

    def _class_name(self, class_id: int) -> str:
        return self._thing_classes[class_id] if self._thing_classes is not None else str(class_id)

    @abc.abstractmethod
    def _encode(self, instances) -> dict:
        """What ``evaluate`` needs of one image's ``Instances``: numpy arrays and RLEs (CPU),
        including "classes" (the contiguous class id of each kept prediction)."""

    @abc.abstractmethod
    def _compute(self, images: list[tuple[dict, _GroundTruth]], class_ids: list[int]):
        """(JSON report, flat ``{metric: float}`` results) of the paired images."""


def _ap_metrics(ap_by_kind: dict[str, np.ndarray]) -> dict:
    """The paper's columns from {"seg": AP, "det": AP} vectors (percent) over ``IOU_THRESHOLDS``."""
    metrics, per_iou = {}, {}
    for kind, ap in ap_by_kind.items():
        metrics[f"AP{kind}"] = float(ap.mean())
        for t in _CURVE_THRESHOLDS:
            metrics[f"AP{kind}{round(t * 100)}"] = float(ap[IOU_THRESHOLDS.index(t)])
        per_iou[f"AP{kind}_per_iou"] = {f"{t:.2f}": float(v) for t, v in zip(IOU_THRESHOLDS, ap)}
    return {**metrics, **per_iou}


class PaperAPEvaluator(_InstanceEvaluator):
    """The paper's Table I: VOC2010+ all-point AP of masks (APseg) and boxes (APdet).

    Reports APseg / APdet (mean over IoU 0.50:0.05:0.95), APseg50/75, APdet50/75 and per-IoU
    values, using every prediction (no score threshold); rules in :mod:`.paper_ap`. Writes
    ``paper_metrics.json`` with, per class, the precision-recall curves at IoU 0.5 and 0.75
    (at most 200 points each).
    """

    _task = "paper"
    _json_name = "paper_metrics.json"

    def __init__(
        self, dataset_name: str, output_dir: str | None = None, *, box_source: str = "pred_boxes"
    ):
        """
        Args:
            dataset_name: a name registered in ``DatasetCatalog``.
            output_dir: where ``paper_metrics.json`` goes; None writes nothing.
            box_source: boxes of APdet: "pred_boxes" (the model's boxes) or "mask_tight" (the
                tight boxes of the predicted masks, the authors' choice, which makes APdet
                measure the masks' extent rather than the detector).
        """
        if box_source not in ("pred_boxes", "mask_tight"):
            raise ValueError(f"box_source must be 'pred_boxes' or 'mask_tight', got {box_source!r}")
        super().__init__(dataset_name, output_dir)
        self._box_source = box_source

    def _encode(self, instances) -> dict:
        rles = encode_masks(instances.pred_masks)
        if self._box_source == "mask_tight":
            boxes = rle_boxes(rles)
        else:
            boxes = instances.pred_boxes.tensor.cpu().numpy().astype(np.float64)
        return {
            "rles": rles,
            "boxes": boxes.reshape(-1, 4),
            "scores": instances.scores.cpu().numpy().astype(np.float64),
            "classes": instances.pred_classes.cpu().numpy().astype(np.int64),
        }

    def _compute(self, images, class_ids):
        by_class = {c: self._class_precision_recall(images, c) for c in class_ids}
        in_gt = [c for c in class_ids if by_class[c]["seg"].num_gt > 0]

        def mean_ap(kind):
            if not in_gt:
                return np.full(len(IOU_THRESHOLDS), np.nan)
            return np.mean([by_class[c][kind].ap for c in in_gt], axis=0) * 100

        metrics = _ap_metrics({kind: mean_ap(kind) for kind in ("seg", "det")})
        report = {
            "dataset": self._dataset_name,
            "num_images": len(images),
            "iou_thresholds": list(IOU_THRESHOLDS),
            "box_source": self._box_source,
            "metrics": metrics,
            "per_class": {},
        }
        results = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
        # Counts, so that a table of undefined APs (no ground truth) says why; floats, as every
        # value detectron2's EvalHook logs.
        results["num_gt"] = float(sum(curves["seg"].num_gt for curves in by_class.values()))
        results["num_pred"] = float(sum(len(c["seg"].scores) for c in by_class.values()))
        for kind in ("seg", "det"):
            for t, v in metrics[f"AP{kind}_per_iou"].items():
                results[f"AP{kind}-iou{t}"] = v
        for c, curves in by_class.items():
            name = self._class_name(c)
            class_metrics = _ap_metrics({kind: pr.ap * 100 for kind, pr in curves.items()})
            report["per_class"][name] = {
                "num_gt": curves["seg"].num_gt,
                "num_pred": len(curves["seg"].scores),
                "metrics": class_metrics,
                "pr_curves": {
                    kind: {f"{t:.2f}": pr.curve(t, _MAX_CURVE_POINTS) for t in _CURVE_THRESHOLDS}
                    for kind, pr in curves.items()
                },
            }
            results[f"APseg-{name}"] = class_metrics["APseg"]
            results[f"APdet-{name}"] = class_metrics["APdet"]
        self._log_tables(metrics, report["per_class"])
        return report, results

    @staticmethod
    def _class_precision_recall(images, class_id) -> dict[str, PrecisionRecall]:
        """{"seg": masks, "det": boxes} rankings of one class over the images."""
        seg_inputs, det_inputs = [], []
        for pred, gt in images:
            pred_sel, gt_sel = pred["classes"] == class_id, gt.classes == class_id
            scores = pred["scores"][pred_sel]
            seg_iou = mask_iou(_take(pred["rles"], pred_sel), _take(gt.rles, gt_sel))
            seg_inputs.append((scores, seg_iou))
            det_inputs.append((scores, box_iou(pred["boxes"][pred_sel], gt.boxes[gt_sel])))
        return {
            "seg": pooled_average_precision(seg_inputs),
            "det": pooled_average_precision(det_inputs),
        }

    def _log_tables(self, metrics: dict, per_class: dict):
        main = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
        per_iou = [
            [t, metrics["APseg_per_iou"][t], metrics["APdet_per_iou"][t]]
            for t in metrics["APseg_per_iou"]
        ]
        text = (
            f"Paper-style AP (VOC2010+ all-point, percent) on '{self._dataset_name}':\n"
            f"{create_small_table(main)}\n"
            f"{_table(per_iou, ['IoU', 'APseg', 'APdet'])}"
        )
        if len(per_class) > 1:
            columns = list(main)
            rows = [
                [name, entry["num_gt"], *(entry["metrics"][k] for k in columns)]
                for name, entry in per_class.items()
            ]
            text += "\n" + _table(rows, ["class", "#GT", *columns])
        self._logger.info(text)


class BiologyEvaluator(_InstanceEvaluator):
    """Object-level metrics of biology papers: AJI, PQ/SQ/RQ, precision/recall/F1 at IoU 0.5,
    counting errors (DiC, absDiC) and, for leaf datasets, SBD. Definitions and aggregation in
    :mod:`.bio_metrics`.

    Only predictions scoring at least ``score_threshold`` enter, resolved into a label image per
    class by score-ordered painting. Writes ``bio_metrics.json`` with per-class counts (TP, FP,
    FN) and per-image values.
    """

    _task = "bio"
    _json_name = "bio_metrics.json"

    def __init__(
        self,
        dataset_name: str,
        output_dir: str | None = None,
        *,
        score_threshold: float = 0.5,
        leaf_metrics: bool | None = None,
    ):
        """
        Args:
            dataset_name: a name registered in ``DatasetCatalog``.
            output_dir: where ``bio_metrics.json`` goes; None writes nothing.
            score_threshold: predictions scoring below it are left out.
            leaf_metrics: report SBD (CVPPP leaf segmentation); None: for dataset names that
                start with "plant".
        """
        super().__init__(dataset_name, output_dir)
        self._score_threshold = score_threshold
        self._leaf_metrics = (
            dataset_name.startswith("plant") if leaf_metrics is None else leaf_metrics
        )

    def _encode(self, instances) -> dict:
        instances = instances[instances.scores >= self._score_threshold]
        rles, classes = [], []
        for class_id in instances.pred_classes.unique().tolist():
            selected = instances.pred_classes == class_id
            painted = paint_by_score_rles(
                instances.pred_masks[selected], instances.scores[selected]
            )
            rles.extend(painted)
            classes.extend([class_id] * len(painted))
        return {"rles": rles, "classes": np.array(classes, dtype=np.int64)}

    def _compute(self, images, class_ids):
        per_class, class_metrics = {}, {}
        for c in class_ids:
            stats = [
                ImageStatistics.from_masks(
                    _take(pred["rles"], pred["classes"] == c), _take(gt.rles, gt.classes == c)
                )
                for pred, gt in images
            ]
            metrics = self._percent(summarize(stats, self._leaf_metrics))
            name = self._class_name(c)
            class_metrics[c] = metrics
            per_class[name] = self._class_report(images, stats, metrics)

        in_gt = [c for c in class_ids if per_class[self._class_name(c)]["num_gt"] > 0]
        # summarize() of no images gives every key, in order.
        keys = list(self._percent(summarize([], self._leaf_metrics)))
        metrics = {k: mean_of_defined([class_metrics[c][k] for c in in_gt]) for k in keys}
        results = dict(metrics)
        for c in class_ids:
            for k, v in class_metrics[c].items():
                results[f"{k}-{self._class_name(c)}"] = v
        report = {
            "dataset": self._dataset_name,
            "num_images": len(images),
            "score_threshold": self._score_threshold,
            "leaf_metrics": self._leaf_metrics,
            "metrics": metrics,
            "per_class": per_class,
        }
        self._log_tables(metrics, per_class)
        return report, results

    @staticmethod
    def _percent(metrics: dict) -> dict:
        return {k: v if k in COUNT_METRICS else 100 * v for k, v in metrics.items()}

    def _class_report(self, images, stats: list[ImageStatistics], metrics: dict) -> dict:
        tp = sum(s.true_positives for s in stats)
        num_pred = sum(s.num_pred for s in stats)
        num_gt = sum(s.num_gt for s in stats)
        per_image = []
        for (record, _), s in zip(images, stats):
            entry = {
                "image_id": record["image_id"],
                "file_name": record["file_name"],
                "num_gt": s.num_gt,
                "num_pred": s.num_pred,
                "TP": s.true_positives,
                "AJI": 100 * s.aji,
                "DiC": s.dic,
            }
            if self._leaf_metrics:
                entry["SBD"] = 100 * s.sbd
            per_image.append(entry)
        return {
            "num_gt": num_gt,
            "num_pred": num_pred,
            "TP": tp,
            "FP": num_pred - tp,
            "FN": num_gt - tp,
            "metrics": metrics,
            "per_image": per_image,
        }

    def _log_tables(self, metrics: dict, per_class: dict):
        text = (
            f"Biology metrics (ratios in percent, score >= {self._score_threshold}) on "
            f"'{self._dataset_name}':\n{create_small_table(metrics)}"
        )
        if len(per_class) > 1:
            rows = [
                [name, entry["num_gt"], entry["num_pred"], *entry["metrics"].values()]
                for name, entry in per_class.items()
            ]
            text += "\n" + _table(rows, ["class", "#GT", "#pred", *metrics])
        self._logger.info(text)
