"""`make demo` and `make compare` end to end, as the README runs them, on a tiny schedule."""

import json
import os
import subprocess

import cv2
import pytest
from detectron2.data import DatasetCatalog
from helpers import REPO

pytestmark = pytest.mark.slow

# Two iterations, small test images and few detections: the commands, not the accuracy.
TINY = (
    'SOLVER.MAX_ITER 2 SOLVER.STEPS "(1,)" INPUT.TEST_IMAGE_SIZE 128 '
    "MODEL.OBJGUIDED.TOPK_CENTERS 20 MODEL.RPN.POST_NMS_TOPK_TEST 20 TEST.DETECTIONS_PER_IMAGE 20"
)


def make(target: str, tmp_path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    variables = [f"OPTS={TINY}", f"DEMO_DIR={tmp_path}/demo", f"COMPARE_DIR={tmp_path}/compare"]
    result = subprocess.run(
        ["make", "--no-print-directory", target, *variables],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_demo_then_compare(tmp_path):
    names = [os.path.basename(r["file_name"]) for r in DatasetCatalog.get("dsb2018_mini_val")]

    log = make("demo", tmp_path)
    evaluation = json.loads(
        (tmp_path / "demo/inference/dsb2018_mini_val/evaluation.json").read_text()
    )
    assert evaluation["method"] == "ObjGuided"
    assert {"APseg", "APseg50", "APdet"} <= set(evaluation["results"]["paper"])
    assert {"AJI", "PQ"} <= set(evaluation["results"]["bio"])
    predictions = tmp_path / "demo/predictions"
    for name in names:
        stem = os.path.splitext(name)[0]
        assert (predictions / f"{stem}_labels.tif").is_file()
        assert (predictions / f"{stem}_overlay.png").is_file()
    assert (predictions / "predictions.json").is_file()
    assert "Outputs of make demo:" in log

    log = make("compare", tmp_path)
    assert "Reusing the ObjGuided run of make demo" in log
    table = (tmp_path / "compare/comparison.md").read_text()
    methods = [line.split(" | ")[0] for line in table.splitlines()[2:]]
    assert methods == ["| ObjGuided", "| PointRend", "| Mask R-CNN"]
    for name in ("ap_vs_iou.png", "figure.png"):
        assert cv2.imread(str(tmp_path / "compare" / name)) is not None, name
