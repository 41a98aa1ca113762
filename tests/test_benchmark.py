"""tools/benchmark.py end to end on a tiny setting: its report's structure, and the equal-N
protocol giving every architecture exactly the N boxes of the scene."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from objguided_d2.benchmark.flops import EXTRA_FLOP_FORMULAS
from objguided_d2.modeling.roi_geometry import conv1x1_concat

REPO = Path(__file__).resolve().parents[1]
COMPACT = "configs/compact/synthetic_neural_{}.yaml"
LABELS = [
    "objguided[synthetic_neural_objguided]",
    "objguided[synthetic_neural_objguided_fast]",
    "mask_rcnn",
    "pointrend",
]
NUM_OBJECTS = 5
TINY = [
    "--objguided-configs", COMPACT.format("objguided"), COMPACT.format("objguided_fast"),
    "--mask-rcnn-config", COMPACT.format("mask_rcnn"),
    "--pointrend-config", COMPACT.format("pointrend"),
    "--size", "64",
    "--synthetic-counts", str(NUM_OBJECTS),
    "--dataset", "none",
    "--warmup", "0", "--repeats", "1",
    "--train-iters", "1", "--train-warmup", "0", "--train-batch", "1",
    "--train-instances", str(NUM_OBJECTS),
    "--threads", "1",
]  # fmt: skip


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "benchmark.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("benchmark")
    process = run_benchmark(*TINY, "--no-memory", "--output-dir", str(output_dir), "--tag", "t")
    report = json.loads((output_dir / "benchmark_t.json").read_text())
    markdown = (output_dir / "benchmark_t.md").read_text()
    return report, markdown, process.stdout.strip().splitlines()


@pytest.mark.slow
def test_every_architecture_segments_exactly_the_n_boxes(report):
    report, _, _ = report
    assert list(report["inference"]) == LABELS
    for label, per_input in report["inference"].items():
        (entry,) = per_input.values()
        (counts,) = entry["instances"]
        assert counts["boxes"] == counts["segmented"] == NUM_OBJECTS, label
        if not label.startswith("objguided"):
            # The baselines keep every given box; ObjGuided's mask NMS may drop empty masks.
            assert counts["returned"] == NUM_OBJECTS, label
        assert 0 <= counts["returned"] <= NUM_OBJECTS
        assert entry["samples"] == 1
        assert entry["ms_per_image"] >= entry["dense_ms"] > 0
        assert entry["per_instance_ms"] > 0
        assert 0 < entry["per_instance_share"] < 1


@pytest.mark.slow
def test_report_holds_training_and_model_size_and_no_targets(report):
    report, markdown, stdout = report
    assert report["environment"]["torch_threads"] == 1
    assert [s["name"] for s in report["inputs"]] == [f"synthetic_n{NUM_OBJECTS}"]
    for label in LABELS:
        assert report["training"][label]["s_per_iter"] > 0
        size = report["model_size"][label]
        assert size["parameters"] > 0 and size["boxes"] == NUM_OBJECTS
        assert size["total_gmac"] == pytest.approx(size["dense_gmac"] + size["per_instance_gmac"])
        assert size["dense_gmac"] > 0 and size["per_instance_gmac"] > 0
    # the dense-only step of ObjGuided: the mask branch is what the full step adds
    default = report["training"][LABELS[0]]
    assert default["mask_branch_s_per_iter"] == pytest.approx(
        default["s_per_iter"] - default["dense_only_s_per_iter"]
    )
    # measured numbers only: no pass/fail targets
    assert "targets" not in report and "target" not in markdown.lower()
    ratio = (
        report["inference"][LABELS[0]][f"synthetic_n{NUM_OBJECTS}"]["ms_per_image"]
        / (report["inference"]["pointrend"][f"synthetic_n{NUM_OBJECTS}"]["ms_per_image"])
    )
    assert stdout[-1] == report["ratio_line"] == f"ratio objguided/pointrend = {ratio:.2f}"
    assert "## Inference" in markdown and report["ratio_line"] in markdown


@pytest.mark.slow
def test_memory_probe_reports_the_peak_of_one_inference():
    process = run_benchmark("--memory-probe", "mask_rcnn", f"synthetic_n{NUM_OBJECTS}", *TINY)
    probe = json.loads(process.stdout.strip().splitlines()[-1])
    assert probe["process_peak_mb"] >= probe["peak_mb"] >= 0


def test_gmac_count_of_the_concatenation_free_1x1_conv_equals_the_convs():
    skip, up = torch.randn(2, 5, 6, 7), torch.randn(2, 3, 6, 7)
    weight, bias = torch.randn(4, 8, 1, 1), torch.randn(4)
    counts = []
    for run in (
        lambda: conv1x1_concat([skip, up], weight, bias),
        lambda: F.conv2d(torch.cat([skip, up], dim=1), weight, bias),
    ):
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as c:
            run()
        counts.append(c.get_total_flops())
    assert counts[0] == counts[1] == 2 * 2 * 6 * 7 * 8 * 4
