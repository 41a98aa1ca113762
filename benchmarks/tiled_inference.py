"""Tiled inference on upscaled images against whole-image inference on the originals.

Every image of a dataset (default ``dsb2018_val``) and its instance masks are upscaled by
``--factor`` (images bilinearly, masks by nearest neighbour) and written once, with a COCO JSON,
under ``--work-dir``. A trained ObjGuided run is then evaluated (``tools/train_net.py
--eval-only``, paper-style and biology metrics) four ways:

* ``originals, test size``: the dataset as the run's config tests it (each image whole, resized
  to the test size);
* ``originals, whole``: the originals at the training objects' scale, ``INPUT.TEST_SCALE =
  INPUT.OBJECT_SIZE / D`` with D their objects' median diameter (what ``predict.py --object-size
  D`` sets), each image whole (``MODEL.OBJGUIDED.TILE_SIZE`` above any image);
* ``upscaled, tiled``: the upscaled images at the same objects' scale (``TEST_SCALE`` divided
  by the factor), segmented in tiles of the test size where larger: against ``originals,
  whole``, what upscaling and tiling change together;
* ``upscaled, whole``: the same, every image whole: what tiling alone changes.

    .venv/bin/python benchmarks/tiled_inference.py --run output/compact/dsb2018_objguided

prints one line per evaluation and writes ``tiled_inference_<tag>.{json,md}`` to
``benchmarks/results/`` (``--output-dir``). Trailing ``KEY VALUE`` pairs go to every evaluation
as config overrides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detectron2.data import DatasetCatalog  # noqa: E402

from objguided_d2.benchmark.report import write_results  # noqa: E402
from objguided_d2.data.formats import (  # noqa: E402
    annotations_to_label_image,
    label_image_to_annotations,
    save_coco_json,
)
from objguided_d2.data.image_io import read_image  # noqa: E402
from objguided_d2.data.mapper import median_object_size  # noqa: E402
from objguided_d2.data.transforms import ResizeToInput  # noqa: E402
from objguided_d2.engine.trainer import load_config  # noqa: E402

METRICS = ("APseg", "APseg50", "APseg75", "APdet", "AJI", "PQ")


def upscale_dataset(name: str, factor: int, work: Path) -> Path:
    """COCO JSON of ``name``'s images and masks upscaled by ``factor`` (written once)."""
    json_file = work / f"{name}_x{factor}.json"
    if json_file.exists():
        return json_file
    image_dir = work / f"{name}_x{factor}"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for record in DatasetCatalog.get(name):
        height, width = record["height"], record["width"]
        size = (width * factor, height * factor)
        image = cv2.resize(read_image(record["file_name"], "BGR"), size, cv2.INTER_LINEAR)
        path = image_dir / f"{record['image_id']}.png"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        labels = annotations_to_label_image(record["annotations"], height, width)
        labels = cv2.resize(labels.astype(np.float32), size, interpolation=cv2.INTER_NEAREST)
        records.append(
            {
                "file_name": str(path),
                "height": height * factor,
                "width": width * factor,
                "annotations": label_image_to_annotations(labels.astype(np.int32)),
            }
        )
    save_coco_json(records, json_file, ["nucleus"])
    return json_file


def evaluate(run: Path, output: Path, overrides: list[str]) -> tuple[dict, float]:
    """Paper-style and biology metrics of ``run``'s weights with ``overrides``, and seconds."""
    command = [
        sys.executable,
        str(REPO / "tools/train_net.py"),
        "--eval-only",
        "--config-file",
        str(run / "config.yaml"),
        "MODEL.WEIGHTS",
        str(run / "model_final.pth"),
        "OUTPUT_DIR",
        str(output),
        *overrides,
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    (evaluation,) = output.glob("inference/*/evaluation.json")
    results = json.loads(evaluation.read_text())["results"]
    metrics = {**results["paper"], **results["bio"]}
    return {key: round(metrics[key], 2) for key in METRICS}, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="OUTPUT_DIR of a trained ObjGuided run")
    parser.add_argument("--dataset", default="dsb2018_val")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks/results"))
    parser.add_argument("--work-dir", default=str(REPO / "output/tiled_inference"))
    parser.add_argument("--tag", default=f"{datetime.date.today()}_cpu")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)

    run, work = Path(args.run), Path(args.work_dir)
    cfg = load_config(str(run / "config.yaml"), args.overrides)
    test_size = cfg.INPUT.TEST_IMAGE_SIZE or cfg.INPUT.IMAGE_SIZE
    tile_size = cfg.MODEL.OBJGUIDED.TILE_SIZE or test_size
    object_size = cfg.INPUT.OBJECT_SIZE or median_object_size(
        [r for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)],
        ResizeToInput(test_size, cfg.INPUT.TEST_RESIZE),
    )
    upscaled = f"{args.dataset}_x{args.factor}"
    json_file = upscale_dataset(args.dataset, args.factor, work)
    registered = [
        "DATASETS.REGISTER", f"['{upscaled}={json_file},{json_file.parent}']",
        "DATASETS.TEST", f"('{upscaled}',)",
    ]  # fmt: skip
    records = DatasetCatalog.get(args.dataset)
    diameter = median_object_size(records, ResizeToInput(0, scale=1.0))
    scale = object_size / diameter
    resize = ResizeToInput(test_size, scale=scale / args.factor)
    tiled_images = sum(
        max(resize.output_hw(r["height"] * args.factor, r["width"] * args.factor)) > tile_size
        for r in records
    )
    whole = ["MODEL.OBJGUIDED.TILE_SIZE", "100000"]
    originals = ["DATASETS.TEST", f"('{args.dataset}',)"]
    upscaled_scale = [*registered, "INPUT.TEST_SCALE", str(scale / args.factor)]
    settings = {
        "originals, test size": originals,
        "originals, whole": [*originals, "INPUT.TEST_SCALE", str(scale), *whole],
        "upscaled, tiled": upscaled_scale,
        "upscaled, whole": [*upscaled_scale, *whole],
    }
    rows = []
    for label, overrides in settings.items():
        folder = work / "evaluations" / label.replace(", ", "_").replace(" ", "_")
        metrics, seconds = evaluate(run, folder, [*args.overrides, *overrides])
        rows.append({"evaluation": label, **metrics, "seconds": round(seconds, 1)})
        shown = ", ".join(f"{key} {value}" for key, value in metrics.items())
        print(f"{label}: {shown} ({seconds:.0f} s)")

    record = {
        "run": str(run),
        "dataset": args.dataset,
        "factor": args.factor,
        "object_size": round(object_size, 2),
        "median_diameter": round(diameter, 2),
        "test_scale": round(scale, 4),
        "tile_size": tile_size,
        "tile_overlap": cfg.MODEL.OBJGUIDED.TILE_OVERLAP or tile_size // 4,
        "images": len(records),
        "images_tiled": int(tiled_images),
        "threads": os.environ.get("OMP_NUM_THREADS", "all"),
        "overrides": args.overrides,
        "command": " ".join(["benchmarks/tiled_inference.py", *(argv or sys.argv[1:])]),
        "rows": rows,
    }
    lines = [
        f"`{record['command']}`",
        "",
        f"{args.dataset} ({len(records)} images, objects {diameter:.1f} px) and its images "
        f"upscaled {args.factor}x, tested at the training objects' size ({object_size:.1f} px: "
        f"scale {scale:.4g} for the originals, {scale / args.factor:.4g} for the upscaled "
        f"images); {tiled_images} upscaled images are larger than the {tile_size}-px tiles "
        f"(overlap {record['tile_overlap']} px).",
        "",
        "| evaluation | " + " | ".join(METRICS) + " | seconds |",
        "|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for row in rows:
        values = " | ".join(f"{row[k]:.2f}" for k in METRICS)
        lines.append(f"| {row['evaluation']} | {values} | {row['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    write_results(args.output_dir, f"tiled_inference_{args.tag}", record, text)
    return record


if __name__ == "__main__":
    main()
