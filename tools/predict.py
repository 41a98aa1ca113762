#!/usr/bin/env python
"""Segment images with a trained ObjGuided, Mask R-CNN or PointRend model and export the result.

    tools/predict.py --weights output/neural_objguided/model_final.pth \
        --input "images/*.tif" --output preds/
    tools/predict.py --weights ... --dataset synthetic_neural_val --output preds/ MODEL.DEVICE cpu

The model's config is the run's ``config.yaml`` beside the weights (every override of the
training run is in it) unless ``--config-file`` names another; KEY VALUE overrides follow the
options (or ``--``). Images are resized to the test size as in training, or, with
``--object-size D`` (the objects' diameter in pixels, as Cellpose's), scaled so that their objects
match the training objects' size (``INPUT.OBJECT_SIZE``, recorded by the training run); an
ObjGuided model segments a scaled image larger than its test size in overlapping tiles
(``MODEL.OBJGUIDED.TILE_SIZE``, ``TILE_OVERLAP``), each object once.

Inputs: image files, folders (their images, not recursive) and glob patterns (PNG, JPEG, TIFF of
any bit depth, BMP; read and contrast-normalized as in training), or every image of a registered
dataset. For each image, ``<name>`` being its path relative to the folder holding all inputs,
without suffix (subfolders mirrored, so that no image's outputs overwrite another's), the output
folder receives

* ``<name>_labels.tif``: uint16 instance label image at the image's resolution, 0 = background
  (napari, Fiji and Cellpose read it); where instances overlap, the better-scored one wins (see
  :mod:`objguided_d2.export`);
* ``<name>_overlay.png``: the instances drawn over the image;
* ``<name>_predictions.json``: its predictions in COCO results format (RLE masks of the unresolved
  instances), each with its ``file_name`` and its ``label`` in the label image; written last, so
  it marks the image done;

and ``predictions.json`` gathers every image's results in input order at the end. Images stream
through one at a time (nothing accumulates), so a folder of any length runs in bounded memory;
``--skip-existing`` skips images whose outputs are all there, so an interrupted run resumes where
it stopped; ``--num-gpus N`` spreads the images over N processes through detectron2's ``launch``
(one per GPU, or N sharing the cores of a CPU-only machine over Gloo), each writing its own share.
An image that cannot be read is reported and skipped; the exit status is then 1.
"""

import argparse
import glob
import json
import logging
import os
import re
import sys
from collections import Counter

import cv2
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from objguided_d2.data import BioDatasetMapper, ImageReadError, read_image
from objguided_d2.engine import (
    architecture_name,
    leave_process_group,
    load_config,
    load_trained_weights_or_exit,
    share_cpu_cores,
)
from objguided_d2.export import (
    draw_overlay,
    instances_to_label_image,
    instances_to_results,
    write_label_tiff,
)

_CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PREDICTIONS_FILE = "predictions.json"
# Per-image outputs; the results file is written last and marks the image done.
LABELS_SUFFIX, OVERLAY_SUFFIX, RESULTS_SUFFIX = "_labels.tif", "_overlay.png", "_predictions.json"

logger = logging.getLogger("objguided_d2.predict")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file",
        help="config the model was trained with (default: config.yaml beside --weights, which "
        "train_net.py writes with every override of the run)",
    )
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
        "--object-size",
        type=float,
        help="diameter of the objects in the input images, in pixels: the images are scaled so "
        "that it matches the training objects' size (INPUT.OBJECT_SIZE of the run's config) "
        "instead of being resized to the test size (ObjGuided segments larger ones in tiles); "
        "outputs stay at the images' resolution",
    )
    parser.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--allow-mismatched-weights",
        action="store_true",
        help="run with a checkpoint that lacks some of the model's parameters or has other "
        "shapes for them (those keep random values); refused by default",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip images whose outputs are all in --output (resume an interrupted run)",
    )
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="processes to spread the images over: one per GPU, or sharing the CPU's cores",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides, KEY VALUE pairs (after the options, or after --)",
    )
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    overrides = []
    if "--" in argv:
        argv, overrides = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = parser.parse_args(argv)
    if args.input:
        # --input takes every word up to the next option: config overrides after it are no paths.
        first = next((i for i, word in enumerate(args.input) if _is_config_key(word)), None)
        if first is not None:
            args.input, args.opts = args.input[:first], args.input[first:] + args.opts
        if not args.input:
            parser.error("--input needs at least one image file, folder or glob pattern")
    args.opts += overrides
    if args.config_file is None:
        args.config_file = os.path.join(os.path.dirname(args.weights), "config.yaml")
        if not os.path.isfile(args.config_file):
            parser.error(f"--config-file not given and {args.config_file} does not exist")
    return args


def _is_config_key(word: str) -> bool:
    """Whether a word is a config key (``MODEL.DEVICE``) rather than an input path."""
    return bool(_CONFIG_KEY.fullmatch(word)) and not os.path.exists(word)


def object_scale(cfg, object_size: float) -> float:
    """Test scale that brings objects of ``object_size`` pixels to the size of the training
    objects at test time (``INPUT.OBJECT_SIZE``)."""
    if object_size <= 0:
        raise SystemExit(f"--object-size must be a positive diameter in pixels, got {object_size}")
    if cfg.INPUT.OBJECT_SIZE <= 0:
        raise SystemExit(
            "--object-size needs INPUT.OBJECT_SIZE, the training objects' diameter, which this "
            "config does not record (train_net.py measures it when training starts): set it, or "
            "give the scale as INPUT.TEST_SCALE"
        )
    return cfg.INPUT.OBJECT_SIZE / object_size


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
    """Output name of each image: its path relative to the folder that holds all of them, without
    its suffix (``a/cell.png`` and ``b/cell.png`` -> ``a/cell``, ``b/cell``), or with it where
    that is shared (``cell.png`` and ``cell.tif`` -> ``cell.png``, ``cell.tif``).

    Raises:
        ValueError: if two images still get one name (``x.png`` and ``x.png.tif`` beside ``x.tif``).
    """
    absolute = [os.path.abspath(path) for path in paths]
    root = os.path.commonpath([os.path.dirname(path) for path in absolute]) if paths else ""
    relative = [os.path.relpath(path, root) for path in absolute]
    stems = [os.path.splitext(path)[0] for path in relative]
    stem_counts = Counter(stems)
    names = [path if stem_counts[stem] > 1 else stem for path, stem in zip(relative, stems)]
    name_counts = Counter(names)
    clashes = [path for path, name in zip(paths, names) if name_counts[name] > 1]
    if clashes:
        raise ValueError(f"Images {', '.join(clashes)} would share their output names: rename one")
    return names


def dataset_category_ids(cfg) -> list[int] | None:
    """Dataset category id of each contiguous class, from the training set's metadata (a COCO
    JSON sets it when loaded, so the set is loaded if it has not been); None when unknown."""
    if not cfg.DATASETS.TRAIN:
        return None
    name = cfg.DATASETS.TRAIN[0]
    mapping = MetadataCatalog.get(name).get("thing_dataset_id_to_contiguous_id")
    if mapping is None and name in DatasetCatalog.list():
        try:
            DatasetCatalog.get(name)
        except OSError as err:  # FileNotFoundError, ImageReadError
            logger.warning(f"Category ids of {name} unknown ({err}): writing contiguous ids")
        mapping = MetadataCatalog.get(name).get("thing_dataset_id_to_contiguous_id")
    if mapping is None:
        return None
    return [dataset_id for dataset_id, _ in sorted(mapping.items(), key=lambda item: item[1])]


def image_outputs(output: str, name: str) -> list[str]:
    """Paths of one image's outputs, the results file (written last) at the end."""
    return [
        os.path.join(output, name + suffix)
        for suffix in (LABELS_SUFFIX, OVERLAY_SUFFIX, RESULTS_SUFFIX)
    ]


def predict_share(
    args: argparse.Namespace, images: list[tuple[str, int]], names: list[str]
) -> None:
    """Predict this process's share of the images (every world-size-th from its rank) and write
    their outputs; run by detectron2's ``launch``, in this process when there is one."""
    rank, world_size = comm.get_rank(), comm.get_world_size()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world_size > 1:
        device = f"cuda:{comm.get_local_rank()}"
    cfg = load_config(args.config_file, [*args.opts, "MODEL.DEVICE", device])
    share_cpu_cores(device)
    model = build_model(cfg)
    load_trained_weights_or_exit(model, args.weights, allow_mismatch=args.allow_mismatched_weights)
    model.eval()
    mapper = BioDatasetMapper(cfg, is_train=False)
    category_ids = dataset_category_ids(cfg)

    share = range(rank, len(images), world_size)
    if args.skip_existing:
        done = [i for i in share if all(map(os.path.isfile, image_outputs(args.output, names[i])))]
        if done:
            logger.info(f"Skipping {len(done)} image(s) whose outputs exist")
        share = sorted(set(share) - set(done))
    desc = "predict" if world_size == 1 else f"predict [{rank + 1}/{world_size}]"
    for index in tqdm(share, desc=desc, unit="image", position=rank):
        path, image_id = images[index]
        labels_path, overlay_path, results_path = image_outputs(args.output, names[index])
        os.makedirs(os.path.dirname(labels_path), exist_ok=True)
        # A failure must not leave an earlier run's results standing for this image.
        if os.path.exists(results_path):
            os.remove(results_path)
        try:
            inputs = mapper({"file_name": path, "image_id": image_id})
            rgb = read_image(path, "RGB")
        except (FileNotFoundError, ImageReadError) as err:
            logger.error(str(err))
            continue
        with torch.inference_mode():
            instances = model([inputs])[0]["instances"].to("cpu")
        del inputs  # the network input, as large as the image, is not needed for the outputs
        instances = instances[instances.scores >= args.score_threshold]
        label_image, labels = instances_to_label_image(instances)
        write_label_tiff(labels_path, label_image)
        cv2.imwrite(overlay_path, draw_overlay(rgb, label_image)[:, :, ::-1])
        results = instances_to_results(instances, image_id, path, labels, category_ids)
        with open(results_path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(results_path + ".tmp", results_path)
    leave_process_group()


def merge_results(output: str, names: list[str]) -> tuple[int, list[int]]:
    """Write ``predictions.json``: every image's results in input order, one image in memory at
    a time. Returns the number of results and the indices of the images without results."""
    path, missing, count = os.path.join(output, PREDICTIONS_FILE), [], 0
    with open(path + ".tmp", "w") as merged:
        merged.write("[")
        for index, name in enumerate(names):
            results_path = image_outputs(output, name)[-1]
            if not os.path.isfile(results_path):
                missing.append(index)
                continue
            with open(results_path) as f:
                for result in json.load(f):
                    merged.write((", " if count else "") + json.dumps(result))
                    count += 1
        merged.write("]")
    os.replace(path + ".tmp", path)
    return count, missing


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="objguided_d2")
    if args.num_gpus < 1:
        raise SystemExit(f"--num-gpus must be at least 1, got {args.num_gpus}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise SystemExit(f"--output {args.output} is a file; give a folder for the outputs")
    cfg = load_config(args.config_file, args.opts)
    if args.object_size is not None:
        args.opts += ["INPUT.TEST_SCALE", str(object_scale(cfg, args.object_size))]
        cfg = load_config(args.config_file, args.opts)
        print(f"Objects of {args.object_size:g} px: images scaled by {cfg.INPUT.TEST_SCALE:.4g}")
    try:
        if args.dataset:
            records = DatasetCatalog.get(args.dataset)
            images = [(r["file_name"], r.get("image_id", i)) for i, r in enumerate(records)]
        else:
            images = [(path, index) for index, path in enumerate(collect_images(args.input))]
        names = output_names([path for path, _ in images])
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise SystemExit(str(err)) from None
    os.makedirs(args.output, exist_ok=True)
    if args.num_gpus > 1:
        # Checked here, once: a worker process's error would reach the user as a traceback.
        cpu_cfg = cfg.clone()
        cpu_cfg.defrost()
        cpu_cfg.MODEL.DEVICE = "cpu"
        load_trained_weights_or_exit(
            build_model(cpu_cfg), args.weights, allow_mismatch=args.allow_mismatched_weights
        )

    launch(predict_share, args.num_gpus, dist_url="auto", args=(args, images, names))

    count, missing = merge_results(args.output, names)
    print(
        f"{architecture_name(cfg)}: {count} instances in {len(images) - len(missing)} "
        f"images -> {args.output}/ (<name>{LABELS_SUFFIX}, <name>{OVERLAY_SUFFIX}, "
        f"<name>{RESULTS_SUFFIX}, {PREDICTIONS_FILE})"
    )
    if missing:
        failed = ", ".join(images[index][0] for index in missing)
        print(f"Skipped {len(missing)} unreadable image(s): {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
