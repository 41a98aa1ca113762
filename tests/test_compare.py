"""tools/compare.py on crafted evaluation outputs: the markdown table, run lookup and the plots."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from helpers import load_tool

from objguided_d2.data import annotations_to_label_image

IOUS = [f"{0.5 + 0.05 * i:.2f}" for i in range(10)]


def write_run(output_dir: Path, dataset: str, method: str, results: dict, ap_top: float) -> Path:
    """An OUTPUT_DIR as tools/train_net.py leaves it: evaluation.json and paper_metrics.json."""
    folder = output_dir / "inference" / dataset
    folder.mkdir(parents=True)
    evaluation = {"method": method, "dataset": dataset, "results": results}
    (folder / "evaluation.json").write_text(json.dumps(evaluation))
    per_iou = {t: ap_top - 5 * i for i, t in enumerate(IOUS)}
    curve = {"precision": [1.0, 0.8, 0.5], "recall": [0.1, 0.5, 0.7], "score": [0.9, 0.6, 0.2]}
    paper = {
        "metrics": {"APseg_per_iou": per_iou, "APdet_per_iou": per_iou},
        "per_class": {"cell": {"pr_curves": {"seg": {"0.50": curve, "0.75": curve}}}},
    }
    (folder / "paper_metrics.json").write_text(json.dumps(paper))
    return folder


OBJGUIDED = {
    "segm": {"AP": 40.0, "AP-cell": 40.0},
    "bbox": {"AP": 35.5},
    "paper": {"APseg": 50.0, "APseg50": 80.0, "APseg75": 55.25, "APdet": 45.0, "APdet50": 70.0},
    "bio": {"AJI": 60.0, "PQ": 50.0, "SQ": 80.0, "RQ": 62.5, "P@0.5": 70.0, "R@0.5": 56.25,
            "F1@0.5": 62.5, "DiC": -1.0, "absDiC": 2.0},
}  # fmt: skip
# No bio metrics and an undefined AP (null), as a run with a missing evaluator would have.
MASK_RCNN = {
    "segm": {"AP": 30.125},
    "bbox": {"AP": None},
    "paper": {"APseg": 41.0, "APseg50": 71.0, "APseg75": 40.0, "APdet": 39.5},
}


@pytest.fixture
def runs(tmp_path):
    write_run(tmp_path / "og", "neural_val", "ObjGuided", OBJGUIDED, 80.0)
    write_run(tmp_path / "mrcnn", "neural_val", "Mask R-CNN", MASK_RCNN, 70.0)
    return tmp_path


def test_table_has_a_row_per_run_and_the_metrics_any_run_has(runs, capsys):
    compare = load_tool("compare")
    output = runs / "cmp"
    specs = [str(runs / "og"), f"R-CNN 1x={runs / 'mrcnn' / 'inference' / 'neural_val'}"]
    assert compare.main([*specs, "--output", str(output)]) == 0
    expected = (
        "| method | dataset | APseg | APseg50 | APseg75 | APdet | COCO mask AP | COCO box AP "
        "| AJI | PQ | SQ | RQ | P@0.5 | R@0.5 | F1@0.5 | \\|DiC\\| |\n"
        "|---|---|" + "---:|" * 14 + "\n"
        "| ObjGuided | neural_val | 50.00 | 80.00 | 55.25 | 45.00 | 40.00 | 35.50 | 60.00 | 50.00 "
        "| 80.00 | 62.50 | 70.00 | 56.25 | 62.50 | 2.00 |\n"
        "| R-CNN 1x | neural_val | 41.00 | 71.00 | 40.00 | 39.50 | 30.12 | - | - | - | - | - | - "
        "| - | - | - |\n"
    )
    assert (output / "comparison.md").read_text() == expected
    assert expected in capsys.readouterr().out
    for name in ("ap_vs_iou.png", "pr_curves.png"):
        image = cv2.imread(str(output / name))
        assert image is not None and image.shape[1] == 1200, name  # 10 inches at 120 dpi


def test_runs_are_found_from_output_dir_folder_or_file_and_same_methods_told_apart(runs):
    compare = load_tool("compare")
    evaluation = runs / "og" / "inference" / "neural_val" / "evaluation.json"
    for path in (runs / "og", evaluation.parent, evaluation):
        assert compare.find_evaluation(str(path), None) == str(evaluation)
    output = runs / "cmp"
    assert compare.main([str(runs / "og"), str(evaluation), "--output", str(output)]) == 0
    rows = (output / "comparison.md").read_text().splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [
        f"| ObjGuided ({runs / 'og'})",
        f"| ObjGuided ({evaluation})",
    ]


def test_an_output_dir_with_several_datasets_needs_dataset(runs):
    compare = load_tool("compare")
    write_run(runs / "og", "neural_test", "ObjGuided", OBJGUIDED, 75.0)
    with pytest.raises(FileNotFoundError, match="neural_test, neural_val"):
        compare.find_evaluation(str(runs / "og"), None)
    found = compare.find_evaluation(str(runs / "og"), "neural_test")
    assert found == str(runs / "og" / "inference" / "neural_test" / "evaluation.json")


def test_a_path_with_an_equals_sign_is_not_split_into_a_name(tmp_path):
    compare = load_tool("compare")
    write_run(tmp_path / "lr=0.001", "neural_val", "ObjGuided", OBJGUIDED, 80.0)
    run = compare.load_run(str(tmp_path / "lr=0.001"), None)
    assert run["name"] == "ObjGuided" and run["paper"]["metrics"]["APseg_per_iou"]["0.50"] == 80.0


def test_runs_of_one_name_are_repetitions_summarized_by_mean_and_spread(tmp_path):
    compare = load_tool("compare")
    for seed, (apseg, aji) in enumerate([(50.0, 60.0), (54.0, 62.0), (46.0, 58.0)]):
        results = {"paper": {"APseg": apseg}, "bio": {"AJI": aji}}
        write_run(tmp_path / f"og{seed}", "neural_val", "ObjGuided", results, 80.0 + seed)
    write_run(tmp_path / "pr", "neural_val", "PointRend", {"paper": {"APseg": 40.0}}, 60.0)
    output = tmp_path / "cmp"
    specs = [f"ObjGuided={tmp_path / f'og{seed}'}" for seed in range(3)] + [str(tmp_path / "pr")]
    assert compare.main([*specs, "--output", str(output)]) == 0
    lines = (output / "comparison.md").read_text().splitlines()
    assert lines[0] == "| method | dataset | runs | APseg | AJI |"
    assert lines[2] == "| ObjGuided | neural_val | 3 | 50.00 ± 4.00 | 60.00 ± 2.00 |"
    assert lines[3] == "| PointRend | neural_val | 1 | 40.00 | - |"
    # and every run below
    second = f"| ObjGuided ({specs[1]}) | neural_val | 54.00 | 62.00 |"
    assert lines[lines.index("Every run:") + 5] == second
    assert cv2.imread(str(output / "ap_vs_iou.png")) is not None


def test_figure_draws_each_methods_predictions_above_its_score_threshold(tmp_path):
    """Two methods on a bundled validation image: one predicts the ground truth, the other the
    same masks below its threshold plus one above it."""
    compare = load_tool("compare")
    record = DatasetCatalog.get("dsb2018_mini_val")[0]
    name = Path(record["file_name"]).stem
    truth = [a["segmentation"] for a in record["annotations"]]
    image_id = record["image_id"]
    perfect = [{"image_id": image_id, "segmentation": s, "score": 0.9} for s in truth]
    faint = [{"image_id": image_id, "segmentation": s, "score": 0.2} for s in truth]
    faint[3]["score"] = 0.6
    specs = []
    for method, predictions in (("ObjGuided", perfect), ("PointRend", faint)):
        folder = write_run(tmp_path / method, "dsb2018_mini_val", method, OBJGUIDED, 80.0)
        (folder / "bio_metrics.json").write_text(json.dumps({"score_threshold": 0.5}))
        (folder / "coco_instances_results.json").write_text(json.dumps(predictions))
        specs.append(str(tmp_path / method))

    runs = [compare.load_run(spec, None) for spec in specs]
    height, width = record["height"], record["width"]
    by_image = [compare.evaluated_predictions(run) for run in runs]
    labels = [compare.predicted_labels(p[image_id], height, width) for p in by_image]
    expected = annotations_to_label_image(record["annotations"], height, width)
    assert np.array_equal(labels[0] > 0, expected > 0)
    assert len(np.unique(labels[0])) == len(truth) + 1
    assert np.array_equal(labels[1] > 0, expected == 4)

    output = tmp_path / "cmp"
    assert compare.main([*specs, "--output", str(output), "--figure-images", name]) == 0
    figure = cv2.imread(str(output / "figure.png"))
    assert figure is not None and figure.shape[1] > 2 * figure.shape[0]  # one row, four panels
    assert compare.main([*specs, "--output", str(output), "--figure-images", name[:12]]) == 0
    with pytest.raises(SystemExit, match="nothing names no image of dataset dsb2018_mini_val"):
        compare.main([*specs, "--output", str(output), "--figure-images", "nothing"])
