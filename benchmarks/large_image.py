"""Time and peak memory of ``tools/predict.py`` on large images of synthetic neural-like cells.

Each image is a mosaic of synthetic scenes (``objguided_d2.data.synthetic``), tiles x tiles scenes
of 512 x 512 each (``--tiles``, one image per value); the model is the compact synthetic-neural
ObjGuided trained for a few iterations (``--train-iters``, once, cached under the work folder)
unless ``--weights`` is given. Each measurement is one fresh ``predict.py`` process: its wall
time and its peak resident memory (the kernel's high-water mark of that process, ``wait4``;
model and libraries included).

    .venv/bin/python benchmarks/large_image.py --tiles 4 INPUT.TEST_IMAGE_SIZE 1024
    .venv/bin/python benchmarks/large_image.py --tiles 4 8 16 INPUT.TEST_SCALE 1.0

The first resizes a 2048-px image to 1024 and segments it whole; the second segments 2048-,
4096- and 8192-px images at the scale of the training scenes, in tiles of the test size. Prints
one line per image and writes ``large_image_<tag>.{json,md}`` to ``benchmarks/results/``
(``--output-dir``). Trailing ``KEY VALUE`` pairs go to ``predict.py`` as config overrides.
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

from objguided_d2.benchmark.report import write_results  # noqa: E402
from objguided_d2.data.synthetic import generate_neural_scene  # noqa: E402

SCENE_SIDE = 512
TRAIN_CONFIG = "configs/compact/synthetic_neural_objguided.yaml"


def mosaic(tiles: int, seed: int) -> tuple[np.ndarray, int]:
    """A (tiles * 512)-px square image of tiles x tiles scenes and its number of cells."""
    rng = np.random.default_rng(seed)
    rows, cells = [], 0
    for _ in range(tiles):
        row = []
        for _ in range(tiles):
            image, labels = generate_neural_scene(rng, SCENE_SIDE, SCENE_SIDE)
            row.append(image)
            cells += len(np.unique(labels)) - 1
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0), cells


def train_model(output: Path, iterations: int, threads: int) -> Path:
    """Weights of the compact synthetic-neural ObjGuided after ``iterations`` (cached)."""
    weights = output / "model" / "model_final.pth"
    if not weights.exists():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tools/train_net.py"),
                "--config-file",
                str(REPO / TRAIN_CONFIG),
                "SOLVER.MAX_ITER",
                str(iterations),
                "SOLVER.STEPS",
                "()",
                "TEST.EVAL_PERIOD",
                "0",
                "DATASETS.TEST",
                "()",
                "OUTPUT_DIR",
                str(weights.parent),
            ],
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
    return weights


def predict(image_path: Path, weights: Path, output: Path, threads: int, overrides: list[str]):
    """Wall seconds, peak RSS (MB) and instances of one predict.py process."""
    command = [
        sys.executable,
        str(REPO / "tools/predict.py"),
        "--weights",
        str(weights),
        "--input",
        str(image_path),
        "--output",
        str(output),
        "--score-threshold",
        "0",
        "--",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    # this child's own resource usage (ru_maxrss: its peak resident set, kB on Linux)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"predict.py failed: {' '.join(command)}")
    peak_mb = usage.ru_maxrss / 1024
    results = json.loads((output / "predictions.json").read_text())
    return seconds, peak_mb, len(results)


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it is inside it."""
    path = Path(os.path.abspath(path))  # as given: links not followed
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiles", type=int, nargs="+", default=[4], help="mosaic sides in 512-px scenes"
    )
    parser.add_argument("--weights", help="trained ObjGuided weights (default: train one)")
    parser.add_argument("--train-iters", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks/results"))
    parser.add_argument("--work-dir", default=str(REPO / "output/large_image"))
    parser.add_argument("--tag", default=f"{datetime.date.today()}_cpu")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="predict.py config overrides")
    args = parser.parse_args(argv)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    weights = Path(args.weights) if args.weights else train_model(work, args.train_iters, 2)
    rows = []
    for tiles in args.tiles:
        image, cells = mosaic(tiles, args.seed)
        image_path = work / f"mosaic_{image.shape[0]}.png"
        cv2.imwrite(str(image_path), image)
        del image
        seconds, peak_mb, instances = predict(
            image_path, weights, work / "predictions", args.threads, args.overrides
        )
        side = tiles * SCENE_SIDE
        rows.append(
            {
                "image_side": side,
                "cells": cells,
                "instances": instances,
                "seconds": round(seconds, 2),
                "peak_rss_mb": round(peak_mb, 1),
            }
        )
        print(
            f"{side} x {side} px, {cells} cells: {instances} instances in {seconds:.1f} s, "
            f"peak RSS {peak_mb:.0f} MB"
        )
    record = {
        "threads": args.threads,
        "overrides": args.overrides,
        "weights": _shown(weights),
        "command": " ".join(["benchmarks/large_image.py", *(argv or sys.argv[1:])]),
        "images": rows,
    }
    lines = [
        f"`{record['command']}` (weights: `{record['weights']}`, {args.threads} thread(s))",
        "",
        "| image | cells | instances | seconds | s per megapixel | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        megapixels = row["image_side"] ** 2 / 1e6
        lines.append(
            f"| {row['image_side']} x {row['image_side']} | {row['cells']} | {row['instances']} "
            f"| {row['seconds']:.1f} | {row['seconds'] / megapixels:.2f} "
            f"| {row['peak_rss_mb']:.0f} |"
        )
    write_results(args.output_dir, f"large_image_{args.tag}", record, "\n".join(lines) + "\n")
    return record


if __name__ == "__main__":
    main()
