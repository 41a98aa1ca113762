#!/usr/bin/env python
"""Diagnose a trained ObjGuided model's center-keypoint detector on a registered dataset.

    tools/diagnose_detector.py --config-file configs/compact/dsb2018_objguided.yaml \
        --weights output/compact/dsb2018_objguided/model_final.pth --dataset dsb2018_val

Prints, and writes as JSON with ``--output``: detections and objects per image, the share of
objects whose center the heatmap finds (center recall), how the sizes of the detections that
match an object (box IoU > 0.5) compare with the object's, how the sizes that the size head
predicts at every object's keypoint do, in all and per object size, and the share of objects
whose box centre lies on the object (see
:mod:`objguided_d2.evaluation.detector_diagnostics`). A detection counts from
``--score-thresh`` (default: the model's MODEL.OBJGUIDED.SCORE_THRESH_TEST). With
``--masks-on-true-boxes``, also the mask branch alone: the IoU of each object's mask predicted
from its ground-truth box with its true mask, and the shares of the objects' thin parts
(protrusions a few pixels wide) and of the rest that those masks miss.
"""

import argparse
import json

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from objguided_d2.data import BioDatasetMapper
from objguided_d2.engine import load_config, load_trained_weights_or_exit
from objguided_d2.evaluation import diagnose_detector, masks_on_true_boxes
from objguided_d2.evaluation.detector_diagnostics import THIN_PART_WIDTH


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="an ObjGuided config")
    parser.add_argument("--weights", required=True, help="checkpoint to load")
    parser.add_argument("--dataset", required=True, help="a registered dataset with annotations")
    parser.add_argument("--score-thresh", type=float, default=None, help="detection threshold")
    parser.add_argument(
        "--masks-on-true-boxes",
        action="store_true",
        help="also measure the mask branch on the ground-truth boxes",
    )
    parser.add_argument("--output", default=None, help="JSON file for the summary")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu"])
    if cfg.MODEL.META_ARCHITECTURE != "ObjGuidedSegmentor":
        raise SystemExit(f"{args.config_file} is not an ObjGuided config")
    model = build_model(cfg)
    load_trained_weights_or_exit(model, args.weights)
    model.eval()
    mapper = BioDatasetMapper(cfg, is_train=False)
    records = DatasetCatalog.get(args.dataset)
    thresh = (
        cfg.MODEL.OBJGUIDED.SCORE_THRESH_TEST if args.score_thresh is None else args.score_thresh
    )
    summary = diagnose_detector(model, ((r, mapper(r)) for r in records), thresh)
    print(
        f"{args.dataset}: {summary['images']} images, {summary['objects_per_image']:.1f} objects "
        f"and {summary['detections_per_image']:.1f} detections (score >= {thresh}) per image; "
        f"center recall {summary['center_recall']:.3f}; box centre on the object for "
        f"{summary['box_center_on_object']:.3f} of the objects"
    )
    print_by_size(
        summary,
        {"objects": "objects", "center_recall": "center recall", "matched": "matched",
         "median_width_ratio": "median pred/true width", "median_height_ratio": "height",
         "median_head_width_ratio": "median size-head/true width",
         "median_head_height_ratio": "height"},
    )  # fmt: skip
    if args.masks_on_true_boxes:
        masks = masks_on_true_boxes(model, ((r, mapper(r)) for r in records))
        summary["masks_on_true_boxes"] = masks
        print(
            "masks predicted from the ground-truth boxes: IoU with the true masks; "
            f"{masks['on_other_objects']:.3f} of their pixels lie on other objects; they miss "
            f"{masks['thin_missed']:.3f} of the objects' thin parts (under {THIN_PART_WIDTH} px "
            f"wide, {masks['thin_share']:.3f} of their pixels) and {masks['core_missed']:.3f} of "
            "the rest"
        )
        print_by_size(
            masks,
            {"objects": "objects", "mean_iou": "mean IoU", "iou_0.5": "IoU >= 0.5",
             "iou_0.75": "IoU >= 0.75"},
        )  # fmt: skip
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return summary


def print_by_size(summary: dict, columns: dict[str, str]) -> None:
    """One row for all objects and one per size bin of ``summary``: ``columns`` maps its keys to
    their titles; counts print as they are, fractions with three decimals."""
    print(" | ".join(["object size (px)", *columns.values()]))
    for row in [{"size": ("all", ""), **summary}] + summary["by_size"]:
        lo, hi = row["size"]
        cells = [v if isinstance(v, int) else f"{v:.3f}" for v in map(row.get, columns)]
        print(" | ".join([f"{lo}-{hi}", *map(str, cells)]))


if __name__ == "__main__":
    main()
