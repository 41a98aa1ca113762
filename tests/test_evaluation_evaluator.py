"""PaperAPEvaluator and BiologyEvaluator end to end on a registered tiny dataset and fake outputs.

The scene (20 x 24 images, class "cell"):

* image 1: GT g1 rows 2-9 cols 2-9 (64 px), g2 rows 12-17 cols 12-19 (48 px). Predictions:
  a = g1 (score 0.9); b rows 12-17 cols 14-21 (0.8; mask IoU with g2 36/60 = 0.6, but its box is
  g2's box); e, 4 px inside a (0.6); c rows 2-9 cols 4-11 (0.3; IoU 0.6 with g1, taken by a).
* image 2: GT g3 (25 px), no prediction.
* image 3: no GT, prediction d (0.7).
* image 4: no GT, no prediction, and an input without "image_id" (paired by file name).

Paper AP (all predictions), ranking a b d e c:
  masks, IoU <= 0.6: TP TP FP FP FP -> 2/3; IoU > 0.6: TP FP FP FP FP -> 1/3;
  APseg = (3 * 2/3 + 7 * 1/3) / 10 = 13/30. Boxes (pred_boxes): a and b exact -> 2/3 everywhere.
Biology (score >= 0.5, so a, b, e, d; e is painted over by a): TP a-g1 (IoU 1), b-g2 (0.6);
  FP d; FN g3. AJI per image 100/124, 0, 0, undefined; SBD (1 + 0.75)/2, 0, 0, undefined.
"""

import json
import math
import os
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import launch
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluators,
    inference_on_dataset,
    print_csv_format,
)
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.structures import Boxes, BoxMode, Instances
from helpers import CONFIG_DIR
from torch import nn

from objguided_d2.engine import Trainer, leave_process_group, load_config
from objguided_d2.evaluation import BiologyEvaluator, PaperAPEvaluator, WindowCOCOEvaluator
from objguided_d2.evaluation.matching import encode_masks
from objguided_d2.modeling.mask_windows import MaskWindows

HEIGHT, WIDTH = 20, 24


def _mask(rows, cols, height=HEIGHT, width=WIDTH):
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def _annotation(rows, cols, category_id=0):
    rle = encode_masks(_mask(rows, cols)[None])[0]
    return {
        "bbox": [cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0]],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": category_id,
        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
        "iscrowd": 0,
    }


def _instances(predictions, height=HEIGHT, width=WIDTH):
    """Instances from [(rows, cols, score, box XYXY, class)]."""
    instances = Instances((height, width))
    masks = [_mask(rows, cols, height, width) for rows, cols, *_ in predictions]
    instances.pred_masks = torch.stack(masks) if masks else torch.zeros(0, height, width) > 0
    instances.scores = torch.tensor([p[2] for p in predictions], dtype=torch.float32)
    instances.pred_boxes = Boxes(torch.tensor([p[3] for p in predictions]).reshape(-1, 4).float())
    instances.pred_classes = torch.tensor([p[4] for p in predictions], dtype=torch.int64)
    return instances


def _scene():
    """(dataset dicts, model inputs, model outputs) of the module docstring's scene."""
    gt = {
        1: [_annotation((2, 10), (2, 10)), _annotation((12, 18), (12, 20))],
        2: [_annotation((0, 5), (0, 5))],
        3: [],
        4: [],
    }
    predictions = {
        1: [
            ((2, 10), (2, 10), 0.9, [2, 2, 10, 10], 0),
            ((12, 18), (14, 22), 0.8, [12, 12, 20, 18], 0),
            ((4, 6), (4, 6), 0.6, [4, 4, 6, 6], 0),
            ((2, 10), (4, 12), 0.3, [4, 2, 12, 10], 0),
        ],
        2: [],
        3: [((10, 14), (10, 14), 0.7, [10, 10, 14, 14], 0)],
        4: [],
    }
    dicts = [
        {
            "file_name": f"image_{i}.png",
            "image_id": i,
            "height": HEIGHT,
            "width": WIDTH,
            "annotations": gt[i],
        }
        for i in gt
    ]
    inputs = [{k: d[k] for k in ("file_name", "image_id", "height", "width")} for d in dicts]
    del inputs[3]["image_id"]
    outputs = [{"instances": _instances(predictions[i])} for i in gt]
    return dicts, inputs, outputs


def _register(name, dicts, thing_classes=("cell",)):
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=list(thing_classes))


def _unregister(name):
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


@pytest.fixture
def registered():
    """Registers the scene under a name per prefix; yields (register(prefix) -> name, scene)."""
    names = []
    scene = _scene()

    def register(prefix="objguided_test_eval"):
        names.append(f"{prefix}_{uuid.uuid4().hex[:8]}")
        _register(names[-1], scene[0])
        return names[-1]

    yield register, scene
    for name in names:
        _unregister(name)


class _ReplayModel(nn.Module):
    """Returns the prepared outputs of each input image, as a detectron2 model would."""

    def __init__(self, outputs_by_file):
        super().__init__()
        self.outputs_by_file = outputs_by_file

    def forward(self, batched_inputs):
        return [self.outputs_by_file[x["file_name"]] for x in batched_inputs]


EXPECTED_PAPER = {
    "APseg": 100 * 13 / 30,
    "APseg50": 100 * 2 / 3,
    "APseg75": 100 / 3,
    "APdet": 100 * 2 / 3,
    "APdet50": 100 * 2 / 3,
    "APdet75": 100 * 2 / 3,
}
EXPECTED_BIO = {
    "AJI": 100 * (100 / 124) / 3,
    "PQ": 100 * 0.8 * 2 / 3,
    "SQ": 80.0,
    "RQ": 100 * 2 / 3,
    "P@0.5": 100 * 2 / 3,
    "R@0.5": 100 * 2 / 3,
    "F1@0.5": 100 * 2 / 3,
    "DiC": 0.0,
    "absDiC": 0.5,
}


def _check_metrics(actual, expected):
    assert set(expected) <= set(actual)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value), key


@pytest.mark.parametrize("masks", ["full", "windows"])
def test_evaluators_end_to_end_through_inference_on_dataset(registered, tmp_path, masks):
    """The same with full-image masks and with ObjGuided's mask windows."""
    register, (_, inputs, outputs) = registered
    name = register()
    if masks == "windows":
        for output in outputs:
            instances = output["instances"]
            instances.pred_masks = MaskWindows.from_masks(instances.pred_masks).tight()
    evaluator = DatasetEvaluators(
        [PaperAPEvaluator(name, str(tmp_path)), BiologyEvaluator(name, str(tmp_path))]
    )
    model = _ReplayModel({x["file_name"]: out for x, out in zip(inputs, outputs)})
    batches = [inputs[:2], inputs[2:]]
    results = inference_on_dataset(model, batches, evaluator)

    _check_metrics(results["paper"], EXPECTED_PAPER)
    assert (results["paper"]["num_gt"], results["paper"]["num_pred"]) == (3, 5)
    assert results["paper"]["APseg-cell"] == pytest.approx(100 * 13 / 30)
    assert results["paper"]["APdet-cell"] == pytest.approx(100 * 2 / 3)
    assert results["paper"]["APseg-iou0.60"] == pytest.approx(100 * 2 / 3)
    assert results["paper"]["APseg-iou0.65"] == pytest.approx(100 / 3)
    _check_metrics(results["bio"], EXPECTED_BIO)
    assert "SBD" not in results["bio"]
    assert results["bio"]["AJI-cell"] == pytest.approx(EXPECTED_BIO["AJI"])
    # What DefaultTrainer.test and EvalHook do with the results.
    print_csv_format(results)
    assert all(isinstance(v, float) for v in flatten_results_dict(results).values())

    paper = json.loads((tmp_path / "paper_metrics.json").read_text())
    assert paper["num_images"] == 4 and paper["box_source"] == "pred_boxes"
    _check_metrics(paper["metrics"], EXPECTED_PAPER)
    assert paper["metrics"]["APseg_per_iou"]["0.95"] == pytest.approx(100 / 3)
    cell = paper["per_class"]["cell"]
    assert (cell["num_gt"], cell["num_pred"]) == (3, 5)
    curve = cell["pr_curves"]["seg"]["0.50"]
    np.testing.assert_allclose(curve["precision"], [1, 1, 2 / 3, 1 / 2, 2 / 5])
    np.testing.assert_allclose(curve["recall"], [1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(curve["score"], [0.9, 0.8, 0.7, 0.6, 0.3], rtol=1e-6)
    np.testing.assert_allclose(cell["pr_curves"]["seg"]["0.75"]["precision"][:2], [1, 1 / 2])
    assert set(cell["pr_curves"]) == {"seg", "det"}

    bio = json.loads((tmp_path / "bio_metrics.json").read_text())
    assert bio["score_threshold"] == 0.5 and bio["leaf_metrics"] is False
    _check_metrics(bio["metrics"], EXPECTED_BIO)
    cell = bio["per_class"]["cell"]
    # e is painted over by a: two predictions left in image 1.
    assert [cell[k] for k in ("num_gt", "num_pred", "TP", "FP", "FN")] == [3, 3, 2, 1, 1]
    per_image = cell["per_image"]
    assert [p["num_pred"] for p in per_image] == [2, 0, 1, 0]
    assert [p["DiC"] for p in per_image] == [0, -1, 1, 0]
    assert per_image[0]["AJI"] == pytest.approx(100 * 100 / 124)
    assert per_image[3]["AJI"] is None  # undefined: written as null
    assert per_image[3]["image_id"] is None and per_image[3]["file_name"] == "image_4.png"


def test_coco_evaluation_of_windows_equals_detectrons_of_full_masks(registered, tmp_path):
    """WindowCOCOEvaluator, encoding the windows, writes and scores what detectron2's
    COCOEvaluator does with the full-image masks."""
    register, (_, inputs, outputs) = registered
    name = register()
    windowed = []
    for output in outputs:
        instances = Instances(output["instances"].image_size, **output["instances"].get_fields())
        instances.pred_masks = MaskWindows.from_masks(instances.pred_masks).tight()
        windowed.append({"instances": instances})
    results = {}
    for label, evaluator_class, replayed in (
        ("detectron2", COCOEvaluator, outputs),
        ("windows", WindowCOCOEvaluator, windowed),
    ):
        folder = tmp_path / label
        evaluator = evaluator_class(name, output_dir=str(folder), allow_cached_coco=False)
        model = _ReplayModel({x["file_name"]: out for x, out in zip(inputs, replayed)})
        # (detectron2's COCOEvaluator needs every image's id: the images that have one)
        results[label] = inference_on_dataset(model, [inputs[:3]], evaluator)
        results[label + " file"] = json.loads((folder / "coco_instances_results.json").read_text())
    np.testing.assert_equal(results["windows"], results["detectron2"])  # NaN equals NaN
    assert len(results["windows file"]) == 5
    assert results["windows file"] == results["detectron2 file"]


def test_a_set_without_ground_truth_says_so_beside_its_undefined_metrics(
    registered, tmp_path, caplog
):
    """Only the images without ground truth (3: one prediction, 4: none), through the trainer's
    evaluation as --eval-only runs it."""
    register, (dicts, inputs, outputs) = registered
    name = f"objguided_test_no_gt_{uuid.uuid4().hex[:8]}"
    records = []
    for record in dicts[2:]:
        path = tmp_path / record["file_name"]
        cv2.imwrite(str(path), np.zeros((HEIGHT, WIDTH), np.uint8))
        records.append({**record, "file_name": str(path)})
    _register(name, records)
    try:
        cfg = load_config(
            str(CONFIG_DIR / "compact/dsb2018_objguided.yaml"),
            [
                "DATASETS.TEST",
                f"('{name}',)",
                "OUTPUT_DIR",
                str(tmp_path),
                "INPUT.TEST_IMAGE_SIZE",
                "24",
            ],
        )
        replay = _ReplayModel({r["file_name"]: out for r, out in zip(records, outputs[2:])})
        with caplog.at_level("WARNING", logger="objguided_d2.engine.trainer"):
            results = Trainer.test(cfg, replay)
    finally:
        _unregister(name)
    assert math.isnan(results["paper"]["APseg"]) and math.isnan(results["bio"]["AJI"])
    assert (results["paper"]["num_gt"], results["paper"]["num_pred"]) == (0, 1)
    assert f"{name} has no ground-truth instances" in caplog.text
    assert "all 1 predictions are false positives" in caplog.text


def _evaluate(evaluator, inputs, outputs):
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def test_det_ap_from_the_tight_boxes_of_the_masks(registered):
    register, (_, inputs, outputs) = registered
    results = _evaluate(PaperAPEvaluator(register(), box_source="mask_tight"), inputs, outputs)
    # b's tight box overlaps g2's box as its mask does (IoU 0.6): APdet equals APseg.
    assert results["paper"]["APdet"] == pytest.approx(100 * 13 / 30)
    with pytest.raises(ValueError, match="box_source"):
        PaperAPEvaluator("unused", box_source="boxes")


def test_leaf_metrics_are_on_for_plant_datasets_and_on_request(registered):
    register, (_, inputs, outputs) = registered
    sbd = 100 * 0.875 / 3  # images 2 and 3 have SBD 0, image 4 none
    plant = _evaluate(BiologyEvaluator(register("plant_leaves")), inputs, outputs)
    assert plant["bio"]["SBD"] == pytest.approx(sbd)
    requested = _evaluate(BiologyEvaluator(register(), leaf_metrics=True), inputs, outputs)
    assert requested["bio"]["SBD"] == pytest.approx(sbd)
    declined = _evaluate(BiologyEvaluator(register("plant_x"), leaf_metrics=False), inputs, outputs)
    assert "SBD" not in declined["bio"]


def test_score_threshold_selects_the_biology_predictions(registered):
    register, (_, inputs, outputs) = registered
    # At 0.75 only a and b are left: d is no longer a false positive.
    results = _evaluate(BiologyEvaluator(register(), score_threshold=0.75), inputs, outputs)
    assert results["bio"]["P@0.5"] == 100.0
    assert results["bio"]["DiC"] == pytest.approx(-1 / 4)


def test_multi_class_metrics_average_the_classes_present_in_the_ground_truth(tmp_path):
    # Class "a": one GT, found (0.9), plus a false positive on class b's object (0.8): AP 1.
    # Class "b": one GT, never predicted: AP 0. Class "c": a prediction, no GT: left out.
    name = f"objguided_test_eval_classes_{uuid.uuid4().hex[:8]}"
    dicts = [
        {
            "file_name": "multi.png",
            "image_id": 7,
            "height": HEIGHT,
            "width": WIDTH,
            "annotations": [_annotation((0, 4), (0, 4), 0), _annotation((10, 14), (10, 14), 1)],
        }
    ]
    _register(name, dicts, thing_classes=("a", "b", "c"))
    outputs = [
        {
            "instances": _instances(
                [
                    ((0, 4), (0, 4), 0.9, [0, 0, 4, 4], 0),
                    ((10, 14), (10, 14), 0.8, [10, 10, 14, 14], 0),
                    ((16, 20), (0, 4), 0.7, [0, 16, 4, 20], 2),
                ]
            )
        }
    ]
    inputs = [{"file_name": "multi.png", "image_id": 7}]
    try:
        paper = _evaluate(PaperAPEvaluator(name, str(tmp_path)), inputs, outputs)["paper"]
        bio = _evaluate(BiologyEvaluator(name), inputs, outputs)["bio"]
    finally:
        _unregister(name)
    assert (paper["APseg-a"], paper["APseg-b"]) == (100.0, 0.0)
    assert math.isnan(paper["APseg-c"])
    assert paper["APseg"] == 50.0 and paper["APdet"] == 50.0
    # F1: class a TP 1, FP 1 -> 2/3; class b FN 1 -> 0; class c (no GT) left out.
    assert bio["F1@0.5-a"] == pytest.approx(100 * 2 / 3) and bio["F1@0.5-b"] == 0.0
    assert bio["F1@0.5-c"] == 0.0
    assert bio["F1@0.5"] == pytest.approx(100 / 3)
    report = json.loads((tmp_path / "paper_metrics.json").read_text())
    assert report["per_class"]["c"]["metrics"]["APseg"] is None
    assert report["per_class"]["c"]["num_pred"] == 1


def test_outputs_at_the_wrong_resolution_and_unknown_images_are_errors(registered):
    register, (_, inputs, outputs) = registered
    name = register()
    resized = [{"instances": _instances([], height=512, width=512)}]
    with pytest.raises(ValueError, match=r"image_1\.png.*original resolution"):
        _evaluate(PaperAPEvaluator(name), inputs[:1], resized)
    unknown = [{"file_name": "elsewhere.png", "image_id": 99}]
    with pytest.raises(KeyError, match="elsewhere.png"):
        _evaluate(BiologyEvaluator(name), unknown, outputs[:1])
    assert _evaluate(PaperAPEvaluator(name), [], []) == {}


def _evaluate_shard(output_dir):
    """Runs in each of two processes: evaluates the images of its rank, the main one writes."""
    from detectron2.utils import comm

    torch.set_num_threads(1)  # a process spawned by launch: the setting ends with it
    dicts, inputs, outputs = _scene()
    name = "objguided_test_eval_distributed"
    _register(name, dicts)
    rank, world = comm.get_rank(), comm.get_world_size()
    evaluator = DatasetEvaluators(
        [PaperAPEvaluator(name, output_dir), BiologyEvaluator(name, output_dir)]
    )
    evaluator.reset()
    for i in range(rank, len(inputs), world):
        evaluator.process(inputs[i : i + 1], outputs[i : i + 1])
    results = evaluator.evaluate()
    assert bool(results) == comm.is_main_process()
    assert _process_group_threads()
    leave_process_group()
    assert not torch.distributed.is_initialized()
    # Exiting with these threads alive can abort the process in their teardown.
    assert not _process_group_threads()


def _process_group_threads() -> list[str]:
    """Names of this process's threads that belong to Gloo or to the TCP store (Linux)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as f:
            names.append(f.read().strip())
    return [name for name in names if "gloo" in name or "tcpstore" in name]


@pytest.mark.slow
def test_predictions_are_gathered_from_every_process(tmp_path):
    launch(_evaluate_shard, 2, dist_url="auto", args=(str(tmp_path),))
    with open(os.path.join(tmp_path, "paper_metrics.json")) as f:
        _check_metrics(json.load(f)["metrics"], EXPECTED_PAPER)
    with open(os.path.join(tmp_path, "bio_metrics.json")) as f:
        bio = json.load(f)
    _check_metrics(bio["metrics"], EXPECTED_BIO)
    # Dataset order is restored whatever process handled an image.
    assert [p["file_name"] for p in bio["per_class"]["cell"]["per_image"]] == [
        f"image_{i}.png" for i in range(1, 5)
    ]
