"""Prediction export: label images, COCO results and overlays (objguided_d2.export), and
tools/predict.py, whose label TIFFs hold exactly the predicted instances."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import tifffile
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from helpers import REPO, load_tool

from objguided_d2.data import BioDatasetMapper
from objguided_d2.engine import load_config
from objguided_d2.export import (
    MAX_LABEL,
    draw_overlay,
    instance_labels,
    instances_to_label_image,
    instances_to_results,
    label_colors,
)
from objguided_d2.modeling.mask_windows import MaskWindows


def make_instances(masks, scores, classes=None) -> Instances:
    masks = torch.as_tensor(np.asarray(masks, dtype=bool))
    instances = Instances(tuple(masks.shape[1:]))
    instances.pred_masks = masks
    instances.scores = torch.tensor(scores, dtype=torch.float32)
    instances.pred_classes = torch.as_tensor(classes or [0] * len(scores), dtype=torch.int64)
    boxes = torch.zeros(len(scores), 4)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            boxes[i] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
    instances.pred_boxes = Boxes(boxes)
    return instances


def box_mask(shape, y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_instance_labels_rank_by_descending_score_ties_in_order():
    assert instance_labels([0.2, 0.9, 0.5, 0.9]).tolist() == [4, 1, 3, 2]
    assert instance_labels([]).tolist() == []


def test_label_image_gives_overlaps_to_the_better_scored_instance():
    shape = (4, 6)
    masks = [
        box_mask(shape, 0, 2, 0, 3),  # score 0.5 -> label 2
        box_mask(shape, 1, 3, 2, 5),  # score 0.9 -> label 1, wins the overlap at (1, 2)
        box_mask(shape, 1, 2, 3, 4),  # score 0.1 -> label 4, entirely under label 1
        box_mask(shape, 3, 4, 5, 6),  # score 0.3 -> label 3
    ]
    image, labels = instances_to_label_image(make_instances(masks, [0.5, 0.9, 0.1, 0.3]))
    assert labels.tolist() == [2, 1, 4, 3]
    assert image.dtype == np.uint16
    assert image.tolist() == [
        [2, 2, 2, 0, 0, 0],
        [2, 2, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 3],
    ]


def test_label_image_of_no_instances_is_background():
    image, labels = instances_to_label_image(make_instances(np.zeros((0, 3, 4)), []))
    assert image.shape == (3, 4) and image.dtype == np.uint16 and not image.any()
    assert labels.tolist() == []


def test_label_image_refuses_more_instances_than_uint16_holds():
    too_many = make_instances(np.zeros((MAX_LABEL + 1, 1, 1)), [0.5] * (MAX_LABEL + 1))
    with pytest.raises(ValueError, match="uint16"):
        instances_to_label_image(too_many)


def test_results_are_coco_rle_with_file_name_label_and_dataset_category_ids():
    shape = (5, 7)
    masks = [box_mask(shape, 1, 4, 2, 6), box_mask(shape, 0, 1, 0, 1)]
    instances = make_instances(masks, [0.25, 0.75], classes=[1, 0])
    results = instances_to_results(instances, 7, "a/b.png", np.array([2, 1]), [10, 20])
    assert [r["category_id"] for r in results] == [20, 10]
    assert [r["label"] for r in results] == [2, 1]
    assert {r["file_name"] for r in results} == {"a/b.png"} and {
        r["image_id"] for r in results
    } == {7}
    assert results[0]["bbox"] == [2.0, 1.0, 4.0, 3.0]
    assert results[0]["score"] == pytest.approx(0.25)
    for result, mask in zip(results, masks):
        assert isinstance(result["segmentation"]["counts"], str)
        assert (mask_util.decode(result["segmentation"]) == mask).all()
    json.dumps(results)  # serializable as is


def test_exports_of_mask_windows_equal_those_of_full_masks():
    generator = torch.Generator().manual_seed(4)
    masks = torch.rand(7, 15, 13, generator=generator) > 0.8
    masks[3] = False
    dense = make_instances(masks.numpy(), torch.rand(7, generator=generator).tolist())
    windowed = Instances(dense.image_size, **dense.get_fields())
    windowed.pred_masks = MaskWindows.from_masks(masks).tight()
    image, labels = instances_to_label_image(dense)
    windowed_image, windowed_labels = instances_to_label_image(windowed)
    np.testing.assert_array_equal(windowed_image, image)
    np.testing.assert_array_equal(windowed_labels, labels)
    results = instances_to_results(dense, 1, "a.png", labels)
    assert instances_to_results(windowed, 1, "a.png", labels) == results
    # detectron2's own encoding reads the windows as full masks and agrees
    assert instances_to_coco_json(windowed, 1) == instances_to_coco_json(dense, 1)


def test_label_colors_are_distinct_with_black_background():
    colors = label_colors(50)
    assert colors.shape == (51, 3) and colors.dtype == np.uint8
    assert colors[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in colors[1:]}) == 50


def test_overlay_tints_regions_outlines_them_and_keeps_the_background():
    image = np.full((5, 5), 100, dtype=np.uint8)  # grayscale input
    labels = np.zeros((5, 5), dtype=np.uint16)
    labels[1:4, 1:4] = 1
    overlay = draw_overlay(image, labels, alpha=0.25)
    color = label_colors(1)[1].astype(float)
    assert overlay.shape == (5, 5, 3)
    assert overlay[2, 2].tolist() == np.round(0.75 * 100 + 0.25 * color).astype(int).tolist()
    ring = labels.astype(bool)
    ring[2, 2] = False
    assert (overlay[ring] == color).all()
    assert (overlay[labels == 0] == 100).all()
    # blended a band of rows at a time, outlines across band borders included: the same
    for band_rows in (1, 2, 3):
        assert np.array_equal(draw_overlay(image, labels, alpha=0.25, band_rows=band_rows), overlay)


class StubModel(torch.nn.Module):
    """Predicts the same crafted instances on every image, at its original size."""

    SCORES = [0.4, 0.9, 0.2]

    def forward(self, batched_inputs):
        outputs = []
        for inputs in batched_inputs:
            shape = (inputs["height"], inputs["width"])
            masks = [
                box_mask(shape, 2, 9, 1, 8),
                box_mask(shape, 5, 12, 5, 14),
                box_mask(shape, 0, 3, 10, 16),
            ]
            outputs.append({"instances": make_instances(masks, self.SCORES)})
        return outputs


def painted(results: list[dict], shape) -> np.ndarray:
    """Reference painting: each result's mask, best score first, onto pixels still free."""
    image = np.zeros(shape, dtype=np.int64)
    for result in sorted(results, key=lambda r: -r["score"]):
        mask = mask_util.decode(result["segmentation"]).astype(bool)
        image[mask & (image == 0)] = result["label"]
    return image


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder of a 8-bit PNG, a 16-bit TIFF and an RGB JPEG of different sizes."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "gray8.png"), rng.integers(0, 256, (20, 18), dtype=np.uint8))
    tifffile.imwrite(folder / "deep16.tif", rng.integers(0, 65536, (16, 24), dtype=np.uint16))
    cv2.imwrite(str(folder / "color.jpg"), rng.integers(0, 256, (17, 19, 3), dtype=np.uint8))
    return folder


@pytest.fixture
def stub_predict(monkeypatch, tmp_path):
    """tools/predict.py's main with the stub model, loaded from a checkpoint."""
    predict = load_tool("predict")
    DetectionCheckpointer(StubModel(), save_dir=str(tmp_path)).save("stub")
    monkeypatch.setattr(predict, "build_model", lambda cfg: StubModel())

    def run(*args):
        return predict.main(
            [
                "--config-file", str(REPO / "configs/compact/synthetic_neural_objguided.yaml"),
                "--weights", str(tmp_path / "stub.pth"),
                "--device", "cpu",
                *map(str, args),
            ]
        )  # fmt: skip

    return run


def test_predict_writes_label_tiffs_that_hold_exactly_the_predicted_instances(
    stub_predict, images, tmp_path
):
    output = tmp_path / "out"
    assert stub_predict("--input", images, "--output", output) == 0
    predictions = json.loads((output / "predictions.json").read_text())
    sizes = {"color": (17, 19), "deep16": (16, 24), "gray8": (20, 18)}
    assert sorted(r["file_name"] for r in predictions) == sorted(
        str(images / name) for name in ("color.jpg", "deep16.tif", "gray8.png") for _ in range(3)
    )
    for image_id, name in enumerate(sorted(sizes)):  # a folder is read in sorted order
        label_image = tifffile.imread(output / f"{name}_labels.tif")
        assert label_image.dtype == np.uint16 and label_image.shape == sizes[name]
        results = [r for r in predictions if r["image_id"] == image_id]
        assert [r["label"] for r in results] == [2, 1, 3]  # 1 + rank by descending score
        assert [r["score"] for r in results] == pytest.approx(StubModel.SCORES)
        assert (label_image == painted(results, sizes[name])).all()
        assert set(np.unique(label_image)) == {0, 1, 2, 3}
        overlay = cv2.imread(str(output / f"{name}_overlay.png"))
        assert overlay.shape == (*sizes[name], 3)


def test_object_size_scales_the_images_to_the_training_objects_size(
    stub_predict, images, tmp_path, monkeypatch
):
    seen = []

    class SizeRecordingStub(StubModel):
        def forward(self, batched_inputs):
            seen.extend(tuple(inputs["image"].shape[-2:]) for inputs in batched_inputs)
            return super().forward(batched_inputs)

    predict = load_tool("predict")
    monkeypatch.setattr(predict, "build_model", lambda cfg: SizeRecordingStub())
    output = tmp_path / "out"
    gray8 = images / "gray8.png"  # 20 x 18
    args = ["--config-file", REPO / "configs/compact/synthetic_neural_objguided.yaml"]
    args += ["--weights", tmp_path / "stub.pth", "--input", gray8, "--output", output]
    assert predict.main([*args, "--object-size", "10", "INPUT.OBJECT_SIZE", "25.0"]) == 0
    assert seen == [(50, 45)]  # scaled by 25 / 10, not resized to the test size
    assert tifffile.imread(output / "gray8_labels.tif").shape == (20, 18)
    with pytest.raises(SystemExit, match="INPUT.OBJECT_SIZE"):
        predict.main([*args, "--object-size", "10"])  # the config records no object size
    with pytest.raises(SystemExit, match="positive diameter"):
        predict.main([*args, "--object-size", "0", "INPUT.OBJECT_SIZE", "25.0"])


def test_predict_score_threshold_drops_instances_from_every_output(stub_predict, images, tmp_path):
    output = tmp_path / "out"
    pattern = str(images / "*.png")
    assert stub_predict("--input", pattern, "--output", output, "--score-threshold", 0.3) == 0
    predictions = json.loads((output / "predictions.json").read_text())
    assert [r["score"] for r in predictions] == pytest.approx([0.4, 0.9])
    assert [r["label"] for r in predictions] == [2, 1]
    label_image = tifffile.imread(output / "gray8_labels.tif")
    assert (label_image == painted(predictions, (20, 18))).all()
    assert sorted(os.listdir(output)) == [
        "gray8_labels.tif",
        "gray8_overlay.png",
        "gray8_predictions.json",
        "predictions.json",
    ]
    assert json.loads((output / "gray8_predictions.json").read_text()) == predictions


def test_predict_skips_an_unreadable_image_and_reports_it(stub_predict, images, tmp_path, capsys):
    (images / "broken.png").write_bytes(b"not a png")
    output = tmp_path / "out"
    output.mkdir()
    # an earlier run's results for the image must not stand for it now
    (output / "broken_predictions.json").write_text('[{"image_id": 0, "score": 1.0}]')
    assert stub_predict("--input", images, "--output", output) == 1
    assert "broken.png" in capsys.readouterr().err
    assert (output / "gray8_labels.tif").is_file() and not (output / "broken_labels.tif").exists()
    assert not (output / "broken_predictions.json").exists()
    predictions = json.loads((output / "predictions.json").read_text())
    assert len(predictions) == 9 and str(images / "broken.png") not in {
        r["file_name"] for r in predictions
    }


def test_output_names_never_collide(stub_predict, tmp_path):
    """a/cell.png, b/cell.png and cell_2.png in one glob: three sets of outputs."""
    for folder in ("a", "b", "."):
        (tmp_path / "in" / folder).mkdir(parents=True, exist_ok=True)
    for path, size in (
        ("a/cell.png", (10, 12)),
        ("b/cell.png", (14, 16)),
        ("cell_2.png", (18, 20)),
    ):
        cv2.imwrite(str(tmp_path / "in" / path), np.full(size, 90, np.uint8))
    output = tmp_path / "out"
    pattern = str(tmp_path / "in" / "**" / "*.png")
    assert stub_predict("--input", pattern, "--output", output) == 0
    for name, size in (("a/cell", (10, 12)), ("b/cell", (14, 16)), ("cell_2", (18, 20))):
        assert tifffile.imread(output / f"{name}_labels.tif").shape == size
    predict = load_tool("predict")
    assert predict.output_names(["x/c.png", "x/c.tif", "y/c.png"]) == ["x/c.png", "x/c.tif", "y/c"]
    with pytest.raises(ValueError, match="x.png, x.png.tif would share"):
        predict.output_names(["x.png", "x.tif", "x.png.tif"])


def test_command_line_overrides_inputs_and_default_config(tmp_path):
    predict = load_tool("predict")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("")
    weights = str(tmp_path / "run" / "model_final.pth")
    common = ["--weights", weights, "--output", "out"]
    args = predict.parse_args([*common, "--input", "a.png", "b/*.tif", "MODEL.DEVICE", "cpu"])
    assert args.input == ["a.png", "b/*.tif"] and args.opts == ["MODEL.DEVICE", "cpu"]
    assert args.config_file == str(tmp_path / "run" / "config.yaml")  # the run's own config
    args = predict.parse_args([*common, "--input", "a.png", "--", "INPUT.IMAGE_SIZE", "256"])
    assert args.input == ["a.png"] and args.opts == ["INPUT.IMAGE_SIZE", "256"]
    with pytest.raises(SystemExit):
        predict.parse_args(["--weights", str(tmp_path / "model.pth"), "--input", "a.png"])


def test_missing_inputs_and_an_output_file_are_refused_before_any_work(
    stub_predict, images, tmp_path
):
    with pytest.raises(SystemExit, match="No image found at '.*missing.png'"):
        stub_predict("--input", images / "missing.png", "--output", tmp_path / "out")
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit, match="--output .*taken is a file"):
        stub_predict("--input", images, "--output", tmp_path / "taken")
    with pytest.raises(SystemExit, match="not registered"):
        stub_predict("--dataset", "no_such_dataset", "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_predict_skip_existing_resumes_an_interrupted_run(
    stub_predict, images, tmp_path, monkeypatch
):
    output = tmp_path / "out"
    assert stub_predict("--input", images, "--output", output) == 0
    complete = (output / "predictions.json").read_text()
    # interrupted: one image without its results file, one whose overlay was never written
    (output / "color_predictions.json").unlink()
    (output / "gray8_overlay.png").unlink()
    (output / "predictions.json").unlink()
    predicted = []
    mapper_call = BioDatasetMapper.__call__
    monkeypatch.setattr(
        BioDatasetMapper,
        "__call__",
        lambda self, record: predicted.append(record["file_name"]) or mapper_call(self, record),
    )
    assert stub_predict("--input", images, "--output", output, "--skip-existing") == 0
    assert predicted == [str(images / "color.jpg"), str(images / "gray8.png")]
    assert (output / "predictions.json").read_text() == complete
    assert (output / "gray8_overlay.png").is_file()


def test_collect_images_and_output_names(tmp_path):
    predict = load_tool("predict")
    for name in ("b.png", "a.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"")
    found = predict.collect_images(
        [str(tmp_path), str(tmp_path / "**" / "a.*"), str(tmp_path / "b.png")]
    )
    assert found == [
        str(tmp_path / "a.tif"),
        str(tmp_path / "b.png"),
        str(tmp_path / "sub" / "a.png"),
    ]
    assert predict.output_names(found) == ["a", "b", "sub/a"]
    with pytest.raises(FileNotFoundError, match="missing"):
        predict.collect_images([str(tmp_path / "missing*.png")])


@pytest.mark.slow
def test_predict_script_round_trips_a_real_architecture(tmp_path):
    """Mask R-CNN (random weights, every detection kept) through the script as users run it."""
    opts = ["INPUT.IMAGE_SIZE", "128", "TEST.DETECTIONS_PER_IMAGE", "15"]
    opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    config = REPO / "configs/compact/synthetic_neural_mask_rcnn.yaml"
    torch.manual_seed(0)
    model = build_model(load_config(str(config), opts))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("random")
    rng = np.random.default_rng(1)
    image_path = tmp_path / "cells.tif"
    tifffile.imwrite(image_path, rng.integers(0, 4096, (90, 120), dtype=np.uint16))
    output = tmp_path / "out"
    process = subprocess.run(
        [
            sys.executable, "tools/predict.py", "--config-file", str(config),
            "--weights", str(tmp_path / "random.pth"), "--input", str(image_path),
            "--output", str(output), "--device", "cpu", *opts,
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    predictions = json.loads((output / "predictions.json").read_text())
    assert len(predictions) == 15
    assert f"Mask R-CNN: 15 instances in 1 images -> {output}/" in process.stdout
    label_image = tifffile.imread(output / "cells_labels.tif")
    assert label_image.dtype == np.uint16 and label_image.shape == (90, 120)
    assert len(np.unique(label_image)) > 2  # overlapping instances, not an empty image
    assert (label_image == painted(predictions, (90, 120))).all()


@pytest.mark.slow
def test_predict_on_two_processes_writes_what_one_process_writes(tmp_path):
    """Images spread over 2 CPU processes (detectron2's launch, Gloo): the same files."""
    opts = ["INPUT.IMAGE_SIZE", "96", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    config = REPO / "configs/compact/synthetic_neural_mask_rcnn.yaml"
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(load_config(str(config), opts)), save_dir=str(tmp_path)).save(
        "random"
    )
    rng = np.random.default_rng(2)
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        tifffile.imwrite(
            folder / f"cells{k}.tif", rng.integers(0, 4096, (70, 80 + 5 * k), np.uint16)
        )
    outputs = {}
    for processes in (1, 2):
        outputs[processes] = tmp_path / f"out{processes}"
        process = subprocess.run(
            [
                sys.executable, "tools/predict.py", "--config-file", str(config),
                "--weights", str(tmp_path / "random.pth"), "--input", str(folder),
                "--output", str(outputs[processes]), "--device", "cpu",
                "--num-gpus", str(processes), *opts,
            ],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert process.returncode == 0, process.stderr[-3000:]
    files = sorted(os.listdir(outputs[1]))
    assert files == sorted(os.listdir(outputs[2])) and len(files) == 10
    predictions = json.loads((outputs[1] / "predictions.json").read_text())
    assert [r["image_id"] for r in predictions] == sorted(r["image_id"] for r in predictions)
    assert {r["image_id"] for r in predictions} == {0, 1, 2}
    for name in files:
        assert (outputs[1] / name).read_bytes() == (outputs[2] / name).read_bytes(), name


def test_predict_writes_the_category_ids_of_a_users_dataset(stub_predict, images, tmp_path):
    """A model trained on a user's COCO JSON (category id 7, registered by the config): its
    predictions carry id 7, as pycocotools needs to match them."""
    coco = {
        "images": [{"id": 1, "file_name": "gray8.png", "height": 20, "width": 18}],
        "annotations": [],
        "categories": [{"id": 7, "name": "nucleus"}],
    }
    (images / "mine.json").write_text(json.dumps(coco))
    output = tmp_path / "out"
    spec = f"['users_cells_{tmp_path.name}={images / 'mine.json'}']"
    opts = ["DATASETS.REGISTER", spec, "DATASETS.TRAIN", f"('users_cells_{tmp_path.name}',)"]
    try:
        assert stub_predict("--input", images / "gray8.png", "--output", output, *opts) == 0
    finally:
        DatasetCatalog.remove(f"users_cells_{tmp_path.name}")
    predictions = json.loads((output / "predictions.json").read_text())
    assert {r["category_id"] for r in predictions} == {7}


def test_predict_a_registered_dataset_keeps_its_image_ids(stub_predict, images, tmp_path):
    name = "test_predict_tiny_set"
    records = [{"file_name": str(images / "gray8.png"), "image_id": 42}]
    DatasetCatalog.register(name, lambda: records)
    try:
        assert stub_predict("--dataset", name, "--output", tmp_path / "out") == 0
    finally:
        DatasetCatalog.remove(name)
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {r["image_id"] for r in predictions} == {42} and len(predictions) == 3
