#!/usr/bin/env python
"""Draw training samples as the network sees them, through the shared dataset mapper, to PNGs.

    python tools/visualize_data.py --dataset synthetic_neural_train --num 4 --output output/vis
    python tools/visualize_data.py --config-file configs/dsb2018_objguided.yaml --num 8 \
        --output output/vis_dsb2018

Each PNG shows, left, the original image with its annotated masks (letterboxed to the input size)
and, right, one augmented sample from BioDatasetMapper (random square crop, flip, resize) with its
gt_masks (tinted, outlined) and, with --boxes, its gt_boxes.
"""

import argparse
import os

import cv2
import numpy as np
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from objguided_d2 import add_objguided_config
from objguided_d2.data import BioDatasetMapper, annotations_to_label_image, read_image
from objguided_d2.export import draw_overlay


def masks_to_labels(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (H, W) int32 label image, later masks over earlier ones."""
    labels = np.zeros(masks.shape[1:], np.int32)
    for instance_id, mask in enumerate(masks, start=1):
        labels[mask] = instance_id
    return labels


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Scale the longest side to ``size`` and pad to a size x size square with black."""
    height, width = image.shape[:2]
    factor = size / max(height, width)
    resized = cv2.resize(image, (round(width * factor), round(height * factor)))
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[: resized.shape[0], : resized.shape[1]] = resized
    return canvas


def to_rgb(image_chw: np.ndarray, image_format: str) -> np.ndarray:
    image = image_chw.transpose(1, 2, 0)
    if image_format == "L":
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, ::-1] if image_format == "BGR" else image)


def draw_sample(record: dict, sample: dict, cfg, draw_boxes: bool) -> np.ndarray:
    """(S, 2S + gap, 3) RGB panel: original with annotations | augmented sample with gt."""
    size = cfg.INPUT.IMAGE_SIZE
    original = read_image(record["file_name"], "RGB")
    labels = annotations_to_label_image(record["annotations"], record["height"], record["width"])
    left = letterbox(draw_overlay(original, labels), size)
    instances = sample["instances"]
    augmented = to_rgb(sample["image"].numpy(), cfg.INPUT.FORMAT)
    right = draw_overlay(augmented, masks_to_labels(instances.gt_masks.tensor.numpy()))
    if draw_boxes:
        for x0, y0, x1, y1 in instances.gt_boxes.tensor.round().int().tolist():
            cv2.rectangle(right, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 0), 1)
    captions = (f"{len(record['annotations'])} annotated", f"{len(instances)} after the mapper")
    for panel, caption in zip((left, right), captions):
        cv2.putText(panel, caption, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
    gap = np.full((size, 8, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default="", help="config (default: the plugin defaults)")
    parser.add_argument("--dataset", default="", help="dataset name (default: DATASETS.TRAIN[0])")
    parser.add_argument("--num", type=int, default=4, help="number of samples to draw")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random augmentations")
    parser.add_argument("--boxes", action="store_true", help="also draw gt_boxes")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()

    cfg = get_cfg()
    add_objguided_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    dataset = args.dataset or cfg.DATASETS.TRAIN[0]
    records = DatasetCatalog.get(dataset)
    mapper = BioDatasetMapper(cfg, is_train=True)
    np.random.seed(args.seed)  # detectron2's augmentations draw from numpy's global generator
    os.makedirs(args.output, exist_ok=True)
    for index in range(args.num):
        record = records[index % len(records)]
        panel = draw_sample(record, mapper(record), cfg, args.boxes)
        path = os.path.join(args.output, f"{dataset}_{index:03d}.png")
        cv2.imwrite(path, panel[:, :, ::-1])
        print(f"{path}: {os.path.basename(record['file_name'])}")


if __name__ == "__main__":
    main()
