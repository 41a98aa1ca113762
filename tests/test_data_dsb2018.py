"""DSB2018 conversion from the Kaggle layout: a hand-made copy, and the real data of the project.

The real-data test reads ``$OBJGUIDED_DSB2018_SOURCE`` (default ``../shared/data/dsb2018`` beside
the repository): 530 images, 23,385 mask files, about half a minute.
"""

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from detectron2.data.datasets import load_coco_json
from helpers import REPO
from PIL import Image

from objguided_d2.data.convert import convert_dsb2018, read_split_list
from objguided_d2.data.formats import annotations_to_label_image

SHIPPED_SPLITS = REPO / "datasets" / "splits" / "dsb2018"
REAL_SOURCE = Path(
    os.environ.get("OBJGUIDED_DSB2018_SOURCE", REPO.parent / "shared" / "data" / "dsb2018")
)


def write_kaggle_image(stage1_train: Path, image_id: str, masks: list) -> None:
    (stage1_train / image_id / "images").mkdir(parents=True)
    (stage1_train / image_id / "masks").mkdir()
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(stage1_train / image_id / "images" / f"{image_id}.png")
    for index, mask in enumerate(masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            stage1_train / image_id / "masks" / f"m{index}.png"
        )


def box(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((20, 30), bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture
def kaggle_copy(tmp_path):
    """ids a (train), b (val), c (test: in no list); b holds an empty mask file."""
    stage1_train = tmp_path / "kaggle" / "stage1_train"
    write_kaggle_image(stage1_train, "a", [box(1, 4, 2, 6), box(10, 12, 0, 30)])
    write_kaggle_image(stage1_train, "b", [box(0, 20, 29, 30), np.zeros((20, 30), bool)])
    write_kaggle_image(stage1_train, "c", [box(5, 6, 5, 6)])
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("a\n")
    (tmp_path / "splits" / "val.txt").write_text("b\n\n")
    return tmp_path


def test_kaggle_layout_converts_with_test_as_the_remainder(kaggle_copy):
    output = kaggle_copy / "out"
    report = convert_dsb2018(kaggle_copy / "kaggle", kaggle_copy / "splits", output)
    assert {s: report[s]["images"] for s in ("train", "val", "test")} == {
        "train": 1,
        "val": 1,
        "test": 1,
    }
    assert {s: report[s]["instances"] for s in ("train", "val", "test")} == {
        "train": 2,
        "val": 1,
        "test": 1,
    }
    assert report["empty_masks"] == [str(kaggle_copy / "kaggle/stage1_train/b/masks/m1.png")]
    (train,) = load_coco_json(str(output / "dsb2018_train.json"), str(output))
    assert train["file_name"] == str(kaggle_copy / "kaggle/stage1_train/a/images/a.png")
    labels = annotations_to_label_image(train["annotations"], 20, 30)
    assert (labels == box(1, 4, 2, 6) + 2 * box(10, 12, 0, 30)).all()
    assert [a["bbox"] for a in train["annotations"]] == [[2, 1, 4, 3], [0, 10, 30, 2]]


def test_split_id_missing_on_disk_is_named(kaggle_copy):
    (kaggle_copy / "splits" / "val.txt").write_text("b\nzz-missing\n")
    with pytest.raises(FileNotFoundError, match="zz-missing"):
        convert_dsb2018(kaggle_copy / "kaggle", kaggle_copy / "splits", kaggle_copy / "out")


def test_shipped_splits_are_the_papers_lists():
    train, val = (read_split_list(SHIPPED_SPLITS / f"{s}.txt") for s in ("train", "val"))
    assert len(train) == len(set(train)) == 397 and len(val) == len(set(val)) == 133
    assert not set(train) & set(val)


@pytest.fixture(scope="module")
def converted_real(tmp_path_factory):
    if not (REAL_SOURCE / "stage1_train").is_dir():
        pytest.skip(f"no DSB2018 copy at {REAL_SOURCE} (set OBJGUIDED_DSB2018_SOURCE)")
    output = tmp_path_factory.mktemp("dsb2018")
    return output, convert_dsb2018(REAL_SOURCE, SHIPPED_SPLITS, output)


@pytest.mark.slow
def test_real_dsb2018_counts_equal_the_mask_files(converted_real):
    """397 train and 133 val images; every image has one instance per non-empty mask file."""
    output, report = converted_real
    assert (report["train"]["images"], report["val"]["images"], report["test"]["images"]) == (
        397,
        133,
        0,
    )
    empty = Counter(Path(p).parents[1].name for p in report["empty_masks"])
    for split in ("train", "val"):
        records = load_coco_json(str(output / f"dsb2018_{split}.json"), str(output))
        assert [Path(r["file_name"]).stem for r in records] == read_split_list(
            SHIPPED_SPLITS / f"{split}.txt"
        )
        for record in records:
            image_id = Path(record["file_name"]).stem
            mask_files = list((REAL_SOURCE / "stage1_train" / image_id / "masks").glob("*.png"))
            assert len(record["annotations"]) == len(mask_files) - empty[image_id]
        assert sum(len(r["annotations"]) for r in records) == report[split]["instances"]
