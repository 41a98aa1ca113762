"""Dataset registration: standard names, clear errors for missing data, a user's own datasets."""

import csv
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from helpers import REPO
from PIL import Image

from objguided_d2.data import (
    annotations_to_label_image,
    read_image,
    read_label_image,
    register_builtin_datasets,
    register_coco_instances_dataset,
    register_dataset_specs,
    register_label_folder_dataset,
    register_synthetic_neural_dataset,
    save_coco_json,
)
from objguided_d2.data.builtin import BUNDLED_DSB2018_MINI
from objguided_d2.data.formats import label_image_to_annotations
from objguided_d2.engine import Trainer, load_config

STANDARD_NAMES = [
    *(f"{d}_{s}" for d in ("dsb2018", "plant", "neural") for s in ("train", "val", "test")),
    "synthetic_neural_train",
    "synthetic_neural_val",
    "dsb2018_mini_train",
    "dsb2018_mini_val",
]


@pytest.fixture
def empty_root(tmp_path):
    """The standard names registered from an empty data root, restored afterwards."""
    register_builtin_datasets(tmp_path)
    yield tmp_path
    register_builtin_datasets()


@pytest.fixture
def registered():
    """Names registered by a test, removed afterwards."""
    names = []
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_standard_names_are_registered_on_import():
    assert set(STANDARD_NAMES) <= set(DatasetCatalog.list())
    assert MetadataCatalog.get("dsb2018_val").thing_classes == ["nucleus"]
    assert MetadataCatalog.get("plant_train").thing_classes == ["leaf"]


def test_registration_reads_nothing(empty_root):
    assert set(STANDARD_NAMES) <= set(DatasetCatalog.list())
    assert list(empty_root.iterdir()) == []


@pytest.mark.parametrize(
    "name, layout, command",
    [
        ("dsb2018_val", "stage1_train/<id>/masks/", "python datasets/prepare_dsb2018.py"),
        ("plant_train", "<name>_label.png", "python datasets/prepare_plant.py"),
        ("neural_test", "<source>/mask/<name>.png", "python datasets/prepare_neural.py"),
    ],
)
def test_missing_dataset_names_its_layout_and_command(empty_root, name, layout, command):
    dataset = name.rsplit("_", 1)[0]
    with pytest.raises(FileNotFoundError) as error:
        DatasetCatalog.get(name)
    message = str(error.value)
    assert f"'{name}'" in message and layout in message and command in message
    assert str(empty_root / dataset / f"{name}.json") in message


def write_labelled_images(folder: Path, count: int) -> list:
    """``count`` images with label images in ``folder``; their dataset dicts."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        labels = np.zeros((24, 32), np.uint16)
        labels[2:6, 3 : 5 + index] = 1
        labels[10:20, 10:30] = 2
        Image.fromarray(np.full((24, 32), 50, np.uint8)).save(folder / f"im{index}.png")
        Image.fromarray(labels).save(folder / f"im{index}_masks.png")
        records.append(
            {
                "file_name": str(folder / f"im{index}.png"),
                "height": 24,
                "width": 32,
                "annotations": label_image_to_annotations(labels),
            }
        )
    return records


def test_prepared_standard_dataset_loads(empty_root):
    records = write_labelled_images(empty_root / "dsb2018" / "images", 2)
    save_coco_json(records, empty_root / "dsb2018" / "dsb2018_val.json", ["nucleus"])
    loaded = DatasetCatalog.get("dsb2018_val")
    assert [r["file_name"] for r in loaded] == [r["file_name"] for r in records]
    assert [len(r["annotations"]) for r in loaded] == [2, 2]
    assert loaded[0]["annotations"][0]["category_id"] == 0


def test_custom_coco_json_and_a_missing_image(tmp_path, registered):
    records = write_labelled_images(tmp_path / "data", 2)
    save_coco_json(records, tmp_path / "data" / "mine.json", ["nucleus", "cell"])
    register_coco_instances_dataset("test_mine", tmp_path / "data" / "mine.json")
    registered.append("test_mine")
    loaded = DatasetCatalog.get("test_mine")
    assert len(loaded) == 2 and loaded[1]["annotations"][1]["bbox"] == [10.0, 10.0, 20.0, 10.0]
    assert MetadataCatalog.get("test_mine").thing_classes == ["nucleus", "cell"]
    assert MetadataCatalog.get("test_mine").evaluator_type == "coco"
    (tmp_path / "data" / "im1.png").unlink()
    with pytest.raises(FileNotFoundError, match="im1.png"):
        DatasetCatalog.get("test_mine")


def test_empty_segmentations_are_dropped_naming_them_and_evaluation_runs(
    tmp_path, registered, caplog
):
    """A COCO annotation with "segmentation": [] is dropped at load time; training and the COCO
    evaluation then see the same ground truth."""
    records = write_labelled_images(tmp_path / "data", 2)
    json_file = tmp_path / "data" / "mine.json"
    save_coco_json(records, json_file, ["nucleus"])
    coco = json.loads(json_file.read_text())
    coco["annotations"][1]["segmentation"] = []
    json_file.write_text(json.dumps(coco))
    register_coco_instances_dataset("test_unsegmented", json_file)
    registered.append("test_unsegmented")
    with caplog.at_level("WARNING", logger="objguided_d2.data.builtin"):
        loaded = DatasetCatalog.get("test_unsegmented")
    assert [len(r["annotations"]) for r in loaded] == [1, 2]
    annotation_id, image = coco["annotations"][1]["id"], Path(loaded[0]["file_name"])
    assert f"1 annotation(s) with an empty segmentation, e.g. id {annotation_id}" in caplog.text
    assert str(image) in caplog.text

    cfg = load_config(str(REPO / "configs/compact/dsb2018_objguided.yaml"))
    evaluator = Trainer.build_evaluator(cfg, "test_unsegmented", str(tmp_path / "eval"))
    evaluator.reset()
    for record in loaded:  # the loaded ground truth as predictions: a perfect score
        masks = [mask_util.decode(a["segmentation"]) for a in record["annotations"]]
        instances = Instances((record["height"], record["width"]))
        instances.pred_masks = torch.as_tensor(np.stack(masks)).bool()
        boxes = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in record["annotations"]
        ]
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.ones(len(masks))
        instances.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
        evaluator.process([record], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_datasets_registered_from_the_config(tmp_path, registered):
    """DATASETS.REGISTER: a COCO JSON and a Cellpose-style label folder, by name from a config."""
    records = write_labelled_images(tmp_path / "data", 2)
    save_coco_json(records, tmp_path / "data" / "mine.json", ["nucleus"])
    specs = [
        f"spec_coco={tmp_path / 'data' / 'mine.json'}",
        f"spec_folder={tmp_path / 'data'},{tmp_path / 'data'},_masks",
    ]
    registered.extend(["spec_coco", "spec_folder"])
    cfg = load_config(
        str(REPO / "configs/compact/dsb2018_objguided.yaml"),
        ["DATASETS.REGISTER", repr(specs), "DATASETS.TRAIN", "('spec_coco',)"],
    )
    assert list(cfg.DATASETS.REGISTER) == specs
    assert [len(r["annotations"]) for r in DatasetCatalog.get("spec_coco")] == [2, 2]
    assert [len(r["annotations"]) for r in DatasetCatalog.get("spec_folder")] == [2, 2]
    register_dataset_specs(specs)  # the same specs again (a run's config.yaml): nothing happens
    with pytest.raises(ValueError, match="'spec_coco' is already registered"):
        register_dataset_specs([f"spec_coco={tmp_path / 'other.json'}"])
    with pytest.raises(ValueError, match="DATASETS.REGISTER entry 'broken': expected NAME="):
        register_dataset_specs(["broken"])
    with pytest.raises(ValueError, match="'dsb2018_val' is already registered"):
        register_dataset_specs([f"dsb2018_val={tmp_path / 'data' / 'mine.json'}"])


def test_custom_label_folder(tmp_path, registered):
    write_labelled_images(tmp_path / "cellpose", 3)
    register_label_folder_dataset(
        "test_folder",
        tmp_path / "cellpose",
        tmp_path / "cellpose",
        label_suffix="_masks",
        thing_class="cell",
    )
    registered.append("test_folder")
    loaded = DatasetCatalog.get("test_folder")
    assert [Path(r["file_name"]).name for r in loaded] == ["im0.png", "im1.png", "im2.png"]
    assert [r["annotations"][0]["bbox"][2] for r in loaded] == [2.0, 3.0, 4.0]
    assert MetadataCatalog.get("test_folder").thing_classes == ["cell"]


def test_visualize_data_draws_augmented_samples(tmp_path, registered, monkeypatch):
    register_synthetic_neural_dataset(
        "test_vis", tmp_path / "synthetic", num_images=2, height=96, width=128
    )
    registered.append("test_vis")
    argv = ["visualize_data.py", "--dataset", "test_vis", "--num", "3"]
    argv += ["--output", str(tmp_path / "vis"), "--boxes", "INPUT.IMAGE_SIZE", "96"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "tools" / "visualize_data.py"), run_name="__main__")
    drawn = sorted((tmp_path / "vis").iterdir())
    assert [p.name for p in drawn] == [f"test_vis_{i:03d}.png" for i in range(3)]
    assert np.asarray(Image.open(drawn[0])).shape == (96, 2 * 96 + 8, 3)


# ---- the bundled nuclei set ----


def bundled_manifest() -> list[dict]:
    with open(BUNDLED_DSB2018_MINI / "manifest.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("split", ["train", "val"])
def test_bundled_nuclei_are_registered_and_match_their_label_images(split):
    records = DatasetCatalog.get(f"dsb2018_mini_{split}")
    manifest = {row["id"]: row for row in bundled_manifest() if row["split"] == split}
    assert MetadataCatalog.get(f"dsb2018_mini_{split}").thing_classes == ["nucleus"]
    assert sorted(Path(r["file_name"]).stem for r in records) == sorted(manifest)
    for record in records:
        row = manifest[Path(record["file_name"]).stem]
        labels = read_label_image(BUNDLED_DSB2018_MINI / split / "labels" / f"{row['id']}.png")
        image = read_image(record["file_name"], "BGR")
        assert image.shape[:2] == labels.shape == (int(row["height"]), int(row["width"]))
        assert len(record["annotations"]) == int(row["nuclei"]) == len(np.unique(labels)) - 1
        painted = annotations_to_label_image(record["annotations"], *labels.shape)
        assert np.array_equal(painted > 0, labels > 0)
        # one annotation per label id, in id order
        assert np.array_equal(np.unique(painted), np.unique(labels))


def test_bundled_nuclei_come_from_the_paper_lists_and_stay_small():
    splits = REPO / "datasets" / "splits" / "dsb2018"
    for split in ("train", "val"):
        listed = set((splits / f"{split}.txt").read_text().split())
        ids = {row["id"] for row in bundled_manifest() if row["split"] == split}
        assert ids and ids <= listed
    kinds = {row["kind"] for row in bundled_manifest() if row["split"] == "val"}
    assert {"histology", "brightfield"} < kinds
    size = sum(p.stat().st_size for p in BUNDLED_DSB2018_MINI.rglob("*") if p.is_file())
    assert size < 15 * 2**20
