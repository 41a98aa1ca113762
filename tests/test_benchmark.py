"""The benchmark: its MAC counter on plain PyTorch code against hand counts, its ratio line, and
tools/benchmark.py end to end on a tiny setting (the report's structure, and the equal-N protocol
giving every architecture exactly the N boxes of the scene)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from objguided_d2.benchmark.flops import EXTRA_FLOP_FORMULAS, count_macs
from objguided_d2.benchmark.inputs import Sample
from objguided_d2.benchmark.report import ratio_line

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


class GatherRunner:
    """A runner of plain PyTorch code: a 3 x 3 conv, 1 -> 8 channels, as the dense part; 16
    bilinear samples per box (4 taps each, an embedding-bag sum over the conv's pixels) as the
    per-instance part."""

    device = torch.device("cpu")

    def __init__(self):
        self.conv = nn.Conv2d(1, 8, 3, padding=1)

    def dense(self, inputs):
        return self.conv(inputs["image"][None].float())  # (1, 8, H, W)

    def instances(self, features, inputs, boxes):
        pixels = features[0].flatten(1).T  # (H * W, 8)
        taps = torch.randint(len(pixels), (len(boxes) * 16, 4))
        weights = torch.rand(taps.shape)
        return F.embedding_bag(taps, pixels, per_sample_weights=weights, mode="sum")


def test_mac_count_of_a_conv_and_a_gather_is_the_hand_count():
    image = torch.zeros(1, 6, 7, dtype=torch.uint8)
    sample = Sample({"image": image, "height": 6, "width": 7}, boxes=torch.zeros(3, 4))
    macs = count_macs(GatherRunner(), sample)
    conv = 6 * 7 * 8 * (1 * 3 * 3)  # output pixels x output channels x (input channels x taps)
    gather = 3 * 16 * 4 * 8  # boxes x samples x taps x channels
    assert macs["dense_gmac"] == pytest.approx(conv / 1e9)
    assert macs["per_instance_gmac"] == pytest.approx(gather / 1e9)
    assert macs["total_gmac"] == pytest.approx((conv + gather) / 1e9)
    assert macs["boxes"] == 3 and macs["not_counted_ops"] == {}


def test_roi_align_macs_follow_the_adaptive_sampling_grid():
    image = torch.randn(1, 5, 10, 10)
    boxes = torch.tensor([[0, 1.0, 1, 7, 7], [0, 2, 2, 8, 5]])  # 6 x 6 and 6 wide x 3 high
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        torchvision.ops.roi_align(image, boxes, (3, 3), 1.0, sampling_ratio=0, aligned=True)
    # ceil(side / 3 bins) samples per bin and axis: 2 x 2 and 2 x 1; 4 taps and 5 channels each.
    samples = 9 * (2 * 2 + 2 * 1)
    assert counter.get_total_flops() == 2 * samples * 4 * 5


def test_ratio_line_is_the_first_config_over_pointrend_on_the_first_synthetic_input():
    times = {"dsb2018_val": {"ms_per_image": 1.0}, "synthetic_n100": {"ms_per_image": 3.0}}
    report = {
        "configs": {"objguided[fast]": "", "objguided[default]": "", "pointrend": ""},
        "inputs": [{"name": "dsb2018_val"}, {"name": "synthetic_n100"}],
        "inference": {
            "objguided[fast]": times,
            "objguided[default]": {"synthetic_n100": {"ms_per_image": 9.0}},
            "pointrend": {"synthetic_n100": {"ms_per_image": 4.0}},
        },
    }
    assert ratio_line(report) == "ratio objguided/pointrend = 0.75"
    del report["inference"]["pointrend"]
    assert ratio_line(report) == "ratio objguided/pointrend = nan"


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


LARGE_IMAGE_TINY = [
    "--tiles", "1", "--train-iters", "1", "--threads", "1", "--tag", "test",
    "MODEL.OBJGUIDED.SCORE_THRESH_TEST", "0.01", "MODEL.OBJGUIDED.MASK_THRESH_TEST", "0.25",
]  # fmt: skip


@pytest.mark.slow
def test_large_image_benchmark_trains_predicts_and_reports(datasets_root, tmp_path):
    """benchmarks/large_image.py on one 512-px scene with a one-iteration model: the instances
    it reports are those predict.py wrote, and its report holds the measured time and memory."""
    outputs = ["--output-dir", tmp_path / "results", "--work-dir", tmp_path / "work"]
    process = subprocess.run(
        [sys.executable, "benchmarks/large_image.py", *outputs, *LARGE_IMAGE_TINY],
        cwd=REPO,
        env={**os.environ, "OBJGUIDED_DATASETS": str(datasets_root)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    (image,) = json.loads((tmp_path / "results/large_image_test.json").read_text())["images"]
    predictions = json.loads((tmp_path / "work/predictions/predictions.json").read_text())
    assert image["image_side"] == 512 and image["cells"] > 0
    assert image["instances"] == len(predictions) > 0
    assert image["seconds"] > 0 and image["peak_rss_mb"] > 100
    assert f"{image['instances']} instances" in process.stdout
    assert (tmp_path / "results/large_image_test.md").read_text().count("\n") == 5
