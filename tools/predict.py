#!/usr/bin/env python
"""Segment images with a trained ObjGuided, Mask R-CNN or PointRend model and export the result.

    tools/predict.py --config-file configs/neural_objguided.yaml \
        --weights output/neural_objguided/model_final.pth --input "images/*.tif" --output preds/
    tools/predict.py ... --dataset synthetic_neural_val --output preds/

Inputs: image files, folders (their images, not recursive) and glob patterns (PNG, JPEG, TIFF of
any bit depth, BMP; read and contrast-normalized as in training), or every image of a registered
dataset. For each image ``<name>.<ext>`` the output folder receives

* ``<name>_labels.tif``: uint16 instance label image at the image's resolution, 0 = background
  (napari, Fiji and Cellpose read it); where instances overlap, the better-scored one wins (see
  :mod:`objguided_d2.export`);
* ``<name>_overlay.png``: the instances drawn over the image;

and ``predictions.json`` holds every prediction in COCO results format (RLE masks of the unresolved
instances) with its ``file_name`` and its ``label`` in the label image. An image that cannot be
read is reported and skipped; the exit status is then 1.
"""

import argparse
import glob
import json
import logging
import os
import sys

import cv2
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from objguided_d2.data import BioDatasetMapper, ImageReadError, read_image
from objguided_d2.engine import architecture_name, load_config
from objguided_d2.export import (
    draw_overlay,
    instances_to_label_image,
    instances_to_results,
    write_label_tiff,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PREDICTIONS_FILE = "predictions.json"

logger = logging.getLogger("objguided_d2.predict")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="config the model was trained with")
    parser.add_argument("--weights", required=True, help="checkpoint (.pth / .pkl) to load")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders or glob patterns")
    source.add_argument("--dataset", help="a registered dataset: predict all of its images")
    parser.add_argument("--output", required=True, help="folder for the outputs (created)")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.0,
        help="drop predictions scoring below this (default 0: keep what the model outputs)",
    )
    parser.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs", default=[]
    )
    return parser.parse_args(argv)


def collect_images(patterns: list[str]) -> list[str]:
    """Image paths of files, folders (their images with known suffixes) and glob patterns, in
    the given order, each pattern's matches sorted, duplicates dropped."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            names = sorted(os.listdir(pattern))
            found = [os.path.join(pattern, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
        elif glob.has_magic(pattern):
            found = [p for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
        else:
            found = [pattern] if os.path.isfile(pattern) else []
        if not found:
            raise FileNotFoundError(f"No image found at '{pattern}'")
        paths.extend(found)
    return list(dict.fromkeys(paths))


def output_names(paths: list[str]) -> list[str]:
    """Output base name of each image: its file name without suffix; a name that repeats gets
    ``_2``, ``_3``, ... in input order."""
    names, seen = [], {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def dataset_category_ids(cfg) -> list[int] | None:
    """Dataset category id of each contiguous class, from the training set's metadata."""
    if not cfg.DATASETS.TRAIN:
        return None
    mapping = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_dataset_id_to_contiguous_id")
    if mapping is None:
        return None
    return [dataset_id for dataset_id, _ in sorted(mapping.items(), key=lambda item: item[1])]


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="objguided_d2")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(args.config_file, [*args.opts, "MODEL.DEVICE", device])

    if args.dataset:
        records = DatasetCatalog.get(args.dataset)
        images = [(r["file_name"], r.get("image_id", i)) for i, r in enumerate(records)]
    else:
        images = [(path, index) for index, path in enumerate(collect_images(args.input))]
    names = output_names([path for path, _ in images])

    model = build_model(cfg)
    DetectionCheckpointer(model).load(args.weights)
    model.eval()
    mapper = BioDatasetMapper(cfg, is_train=False)
    category_ids = dataset_category_ids(cfg)
    os.makedirs(args.output, exist_ok=True)

    results, failed = [], []
    for (path, image_id), name in zip(tqdm(images, desc="predict", unit="image"), names):
        try:
            inputs = mapper({"file_name": path, "image_id": image_id})
            rgb = read_image(path, "RGB")
        except (FileNotFoundError, ImageReadError) as err:
            logger.error(str(err))
            failed.append(path)
            continue
        with torch.inference_mode():
            instances = model([inputs])[0]["instances"].to("cpu")
        instances = instances[instances.scores >= args.score_threshold]
        label_image, labels = instances_to_label_image(instances)
        write_label_tiff(os.path.join(args.output, f"{name}_labels.tif"), label_image)
        overlay = draw_overlay(rgb, label_image)
        cv2.imwrite(os.path.join(args.output, f"{name}_overlay.png"), overlay[:, :, ::-1])
        results.extend(instances_to_results(instances, image_id, path, labels, category_ids))

    predictions_path = os.path.join(args.output, PREDICTIONS_FILE)
    with open(predictions_path, "w") as f:
        json.dump(results, f)
    print(
        f"{architecture_name(cfg)}: {len(results)} instances in {len(images) - len(failed)} "
        f"images -> {args.output}/ (<name>_labels.tif, <name>_overlay.png, {PREDICTIONS_FILE})"
    )
    if failed:
        print(f"Skipped {len(failed)} unreadable image(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
