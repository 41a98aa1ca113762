"""tools/train_net.py end to end on the CPU, run as users run it (a subprocess): every architecture
trains and evaluates, --eval-only reproduces the metrics of the run that saved the checkpoint, a
killed run resumes from its last checkpoint, and two Gloo processes train together.

Tiny settings: 128 px inputs, batch 2, two iterations, the synthetic neural-like sets (generated
once per session into a temporary $OBJGUIDED_DATASETS, see conftest.py). The barely trained
ObjGuided gets low center and mask thresholds so that it predicts something to evaluate. Each
process computes on one thread: on a small machine shared with other work, two OpenMP threads per
process can run an order of magnitude slower.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.data import DatasetCatalog
from helpers import ARCHITECTURES, REPO

from objguided_d2.data import (
    DATASETS_ROOT_ENV,
    build_bio_augmentations,
    median_object_size,
    register_builtin_datasets,
)
from objguided_d2.engine import load_config

TINY = [
    "INPUT.IMAGE_SIZE", "128",
    # ObjGuided's synthetic-neural config tests at the images' own 640 px: 512 like the others'
    # keeps its evaluations (and the tiled benchmark's, at the objects' scale) small.
    "INPUT.TEST_IMAGE_SIZE", "512",
    "SOLVER.IMS_PER_BATCH", "2",
    "TEST.DETECTIONS_PER_IMAGE", "20",
    "TEST.BIO_SCORE_THRESH", "0.0",
]  # fmt: skip
EXTRA = {
    "objguided": [
        "MODEL.OBJGUIDED.SCORE_THRESH_TEST", "0.01",
        "MODEL.OBJGUIDED.TOPK_CENTERS", "20",
        "MODEL.OBJGUIDED.MASK_THRESH_TEST", "0.25",
    ],
    "mask_rcnn": [],
    "pointrend": [],
}  # fmt: skip
EVALUATION = Path("inference/synthetic_neural_val/evaluation.json")

pytestmark = pytest.mark.slow


def subprocess_env(datasets_root) -> dict:
    return {**os.environ, DATASETS_ROOT_ENV: str(datasets_root), "OMP_NUM_THREADS": "1"}


def train_net(datasets_root, *args) -> subprocess.CompletedProcess:
    process = subprocess.run(
        [sys.executable, "tools/train_net.py", *map(str, args)],
        cwd=REPO,
        env=subprocess_env(datasets_root),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process


def config(arch: str) -> str:
    return f"configs/compact/synthetic_neural_{arch}.yaml"


def checkpoint_iteration(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["iteration"]


@pytest.fixture(scope="module")
def trained(datasets_root, tmp_path_factory):
    """{arch: (OUTPUT_DIR, stdout)} of a two-iteration training run of each architecture."""
    runs = {}
    for arch in ARCHITECTURES:
        output_dir = tmp_path_factory.mktemp(f"train_{arch}")
        process = train_net(
            datasets_root,
            "--config-file", config(arch),
            *TINY, *EXTRA[arch],
            "SOLVER.MAX_ITER", 2,
            "OUTPUT_DIR", output_dir,
        )  # fmt: skip
        runs[arch] = (output_dir, process.stdout)
    return runs


def test_training_records_the_size_of_its_objects(trained, datasets_root):
    """INPUT.OBJECT_SIZE, 0 in the configs, is measured on the training set at each config's
    test resize and recorded."""
    register_builtin_datasets(datasets_root)
    try:
        records = DatasetCatalog.get("synthetic_neural_train")
    finally:
        register_builtin_datasets()
    for arch, (output_dir, _) in trained.items():
        recorded = yaml.safe_load((output_dir / "config.yaml").read_text())["INPUT"]["OBJECT_SIZE"]
        (resize,) = build_bio_augmentations(
            load_config(str(output_dir / "config.yaml")), is_train=False
        )
        expected = round(median_object_size(records, resize), 2)
        assert expected > 0 and recorded == expected, arch


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_trains_two_iterations_and_evaluates(trained, arch):
    output_dir, stdout = trained[arch]
    assert checkpoint_iteration(output_dir / "model_final.pth") == 1
    assert (output_dir / "config.yaml").is_file()
    assert list(output_dir.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert "iter: 1 " in (output_dir / "log.txt").read_text()
    records = [json.loads(line) for line in open(output_dir / "metrics.json")]
    losses = [r for r in records if "total_loss" in r]
    assert losses[-1]["iteration"] == 1 and torch.isfinite(torch.tensor(losses[-1]["total_loss"]))
    # The evaluation is logged with the training scalars (and so in TensorBoard).
    assert {"segm/AP", "paper/APseg", "bio/AJI"} <= set(records[-1])

    evaluation = json.loads((output_dir / EVALUATION).read_text())
    assert evaluation["method"] == ARCHITECTURES[arch]
    assert evaluation["dataset"] == "synthetic_neural_val"
    results = evaluation["results"]
    assert {"AP", "AP50", "AP75"} <= set(results["segm"]) & set(results["bbox"])
    assert {"APseg", "APseg50", "APseg75", "APdet", "APdet50", "APdet75"} <= set(results["paper"])
    assert {"AJI", "PQ", "SQ", "RQ", "P@0.5", "R@0.5", "F1@0.5", "absDiC"} <= set(results["bio"])
    for name in ("coco_instances_results.json", "paper_metrics.json", "bio_metrics.json"):
        assert (output_dir / EVALUATION.parent / name).is_file(), name
    # The table is printed, one row per metric.
    assert f"Evaluation of {ARCHITECTURES[arch]} on synthetic_neural_val" in stdout
    assert "| paper  | APseg" in stdout and "| bio    | AJI" in stdout


def test_a_diverging_run_stops_without_a_final_checkpoint(datasets_root, tmp_path):
    """Adam at a learning rate of 1e6 carries the loss to 1e20 and more, all finite."""
    process = subprocess.run(
        [
            sys.executable, "tools/train_net.py", "--config-file", config("objguided"),
            *TINY, *EXTRA["objguided"],
            "SOLVER.BASE_LR", "1e6", "SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER", "20",
            "OUTPUT_DIR", str(tmp_path),
        ],
        cwd=REPO, env=subprocess_env(datasets_root), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert process.returncode != 0
    assert "FloatingPointError: Training diverged at iteration" in process.stderr
    assert "SOLVER.DIVERGENCE_RATIO" in process.stderr
    assert not list(tmp_path.glob("*.pth"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eval_only_reproduces_the_metrics_of_the_run_that_saved_the_checkpoint(
    datasets_root, trained, arch, tmp_path
):
    output_dir, _ = trained[arch]
    train_net(
        datasets_root,
        "--config-file", config(arch),
        "--eval-only",
        *TINY, *EXTRA[arch],
        "MODEL.WEIGHTS", output_dir / "model_final.pth",
        "OUTPUT_DIR", tmp_path,
    )  # fmt: skip
    during_training = json.loads((output_dir / EVALUATION).read_text())
    eval_only = json.loads((tmp_path / EVALUATION).read_text())
    assert eval_only == during_training
    # Not a vacuous match for the baselines: they predicted objects on the validation images.
    # ObjGuided's width-height head starts at zero, so after two iterations its boxes are under the
    # 2-px ROI limit and it predicts nothing; its predictions are covered by tests/test_model.py.
    coco_results = json.loads(
        (tmp_path / EVALUATION.parent / "coco_instances_results.json").read_text()
    )
    if arch != "objguided":
        assert coco_results


def test_run_killed_after_a_checkpoint_resumes_from_it(datasets_root, tmp_path):
    # A long run that checkpoints every 2 iterations and evaluates nothing, killed (SIGKILL) once
    # a checkpoint is on disk.
    long_run = subprocess.Popen(
        [
            sys.executable, "tools/train_net.py", "--config-file", config("objguided"), *TINY,
            "SOLVER.MAX_ITER", "1000", "SOLVER.CHECKPOINT_PERIOD", "2",
            "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path),
        ],
        cwd=REPO, env=subprocess_env(datasets_root),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    last_checkpoint = tmp_path / "last_checkpoint"
    try:
        deadline = time.monotonic() + 600
        while not last_checkpoint.is_file() and long_run.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after 600 s"
            time.sleep(0.5)
    finally:
        long_run.send_signal(signal.SIGKILL)
        long_run.wait()
    assert long_run.returncode == -signal.SIGKILL
    saved = tmp_path / last_checkpoint.read_text().strip()
    saved_iteration = checkpoint_iteration(saved)
    assert saved_iteration % 2 == 1 and saved_iteration < 999

    process = train_net(
        datasets_root,
        "--config-file", config("objguided"), "--resume", *TINY,
        "SOLVER.MAX_ITER", saved_iteration + 3, "SOLVER.CHECKPOINT_PERIOD", 2,
        "DATASETS.TEST", "()", "OUTPUT_DIR", tmp_path,
    )  # fmt: skip
    assert f"Loading from {saved}" in process.stdout
    assert f"Starting training from iteration {saved_iteration + 1}" in process.stdout
    assert checkpoint_iteration(tmp_path / "model_final.pth") == saved_iteration + 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, launch uses NCCL and the GPUs")
def test_two_gloo_processes_train_and_evaluate_together(datasets_root, tmp_path):
    process = train_net(
        datasets_root,
        "--config-file", config("objguided"),
        "--num-gpus", 2, "--dist-url", "auto",
        *TINY, *EXTRA["objguided"],
        "SOLVER.MAX_ITER", 5,
        "OUTPUT_DIR", tmp_path,
    )  # fmt: skip
    assert "World size: 2" in process.stdout
    assert "is deprecated" not in process.stdout + process.stderr
    # Progress with an ETA once the first iterations are timed.
    assert "eta: 0:00:00  iter: 4 " in process.stdout
    assert checkpoint_iteration(tmp_path / "model_final.pth") == 4
    evaluation = json.loads((tmp_path / EVALUATION).read_text())
    assert set(evaluation["results"]) == {"bbox", "segm", "paper", "bio"}


def test_tiled_inference_benchmark_evaluates_four_ways(trained, datasets_root, tmp_path):
    """benchmarks/tiled_inference.py on a trained run: upscaled copies written, four evaluations
    (tiles forced by a small tile size), and a report of what it measured."""
    output_dir, _ = trained["objguided"]
    process = subprocess.run(
        [
            sys.executable, "benchmarks/tiled_inference.py", "--run", output_dir,
            "--dataset", "synthetic_neural_val", "--factor", "2", "--tag", "test",
            "--work-dir", tmp_path / "work", "--output-dir", tmp_path / "results",
            "MODEL.OBJGUIDED.TILE_SIZE", "256",
            # one pass per tile: the config's flipped pass would double this test's time
            "MODEL.OBJGUIDED.MASK_TEST_FLIPS", "[]",
        ],
        cwd=REPO,
        env=subprocess_env(datasets_root),
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    record = json.loads((tmp_path / "results/tiled_inference_test.json").read_text())
    upscaled = json.loads((tmp_path / "work/synthetic_neural_val_x2.json").read_text())
    register_builtin_datasets(datasets_root)
    try:
        originals = DatasetCatalog.get("synthetic_neural_val")
    finally:
        register_builtin_datasets()
    assert len(upscaled["images"]) == record["images"] == len(originals) == 20
    assert [(image["height"], image["width"]) for image in upscaled["images"]] == [
        (2 * r["height"], 2 * r["width"]) for r in originals
    ]
    assert len(upscaled["annotations"]) == sum(len(r["annotations"]) for r in originals)
    # every upscaled image at the objects' scale is larger than a 256-px tile
    assert record["images_tiled"] == 20 and record["tile_size"] == 256
    assert record["object_size"] > 0 and record["test_scale"] > 0
    rows = {row["evaluation"]: row for row in record["rows"]}
    assert list(rows) == [
        "originals, test size", "originals, whole", "upscaled, tiled", "upscaled, whole",
    ]  # fmt: skip
    for label, row in rows.items():
        assert 0 <= row["APseg"] <= 100 and row["seconds"] > 0, label
        assert f"{label}: APseg {row['APseg']}" in process.stdout
    report = (tmp_path / "results/tiled_inference_test.md").read_text()
    assert report.count("\n| ") == 5  # table header and four rows
