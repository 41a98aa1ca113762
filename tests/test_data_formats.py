"""Label images <-> RLE annotations <-> COCO JSON, and converter round trips for every layout."""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import tifffile
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from PIL import Image

from objguided_d2.data.convert import (
    convert_cvppp,
    convert_label_folder,
    convert_phase_folders,
    pair_images_with_labels,
)
from objguided_d2.data.formats import (
    annotations_to_label_image,
    decode_color_labels,
    encode_mask,
    label_image_to_annotations,
    mask_to_annotation,
    read_label_image,
    save_coco_json,
    split_components,
)
from objguided_d2.data.image_io import ImageReadError


def random_labels(seed: int, num: int, shape=(48, 64)) -> np.ndarray:
    """Label image of ``num`` disjoint random rectangles with ids 1..num in raster order of their
    first pixel, some touching, plus one single-pixel and one 1-px-wide instance."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for instance_id in range(1, num + 1):
        y, x = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
        labels[y : y + rng.integers(1, 9), x : x + rng.integers(1, 9)] = instance_id
    labels[0, 0] = num + 1
    labels[5:20, shape[1] - 1] = num + 2
    return relabel_in_raster_order(labels)


def relabel_in_raster_order(labels: np.ndarray) -> np.ndarray:
    values, first = np.unique(labels, return_index=True)
    order = values[values != 0][np.argsort(first[values != 0])]
    lookup = np.zeros(labels.max() + 1, np.int32)
    lookup[order] = np.arange(1, len(order) + 1)
    return lookup[labels]


def test_encode_mask_equals_pycocotools_on_the_full_image():
    rng = np.random.default_rng(0)
    full = np.zeros((37, 53), bool)
    full[5:30, 7:40] = rng.random((25, 33)) > 0.4
    expected = mask_util.encode(np.asfortranarray(full.astype(np.uint8)))
    assert encode_mask(full)["counts"] == expected["counts"].decode()
    local = encode_mask(full[5:30, 7:40], offset=(5, 7), image_size=(37, 53))
    assert local == {"size": [37, 53], "counts": expected["counts"].decode()}
    assert (
        encode_mask(np.zeros((4, 5), bool))["counts"]
        == mask_util.encode(np.zeros((4, 5), np.uint8, order="F"))["counts"].decode()
    )


def test_encode_mask_refuses_a_mask_outside_the_image():
    with pytest.raises(ValueError, match="exceeds"):
        encode_mask(np.ones((3, 3), bool), offset=(8, 0), image_size=(10, 10))


def test_label_image_to_annotations_hand_computed():
    labels = np.zeros((6, 8), np.uint16)
    labels[1:3, 2:5] = 7  # 2 x 3 at (x=2, y=1)
    labels[4, 0:8] = 300  # a full row
    first, second = label_image_to_annotations(labels, category_id=2)
    assert first["bbox"] == [2.0, 1.0, 3.0, 2.0] and second["bbox"] == [0.0, 4.0, 8.0, 1.0]
    assert first["bbox_mode"] == BoxMode.XYWH_ABS and first["category_id"] == 2
    assert first["iscrowd"] == 0 and isinstance(first["segmentation"]["counts"], str)
    assert mask_util.area(first["segmentation"]) == 6
    assert (mask_util.decode(second["segmentation"]) == (labels == 300)).all()


def test_label_image_without_background_and_empty_label_image():
    assert len(label_image_to_annotations(np.full((3, 3), 5))) == 1
    assert label_image_to_annotations(np.zeros((3, 3), np.uint8)) == []
    assert mask_to_annotation(np.zeros((2, 2), bool)) is None


def test_annotations_to_label_image_paints_later_over_earlier():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True
    b = np.zeros((4, 4), bool)
    b[1:3, 1:3] = True
    labels = annotations_to_label_image([mask_to_annotation(a), mask_to_annotation(b)], 4, 4)
    assert labels.tolist() == [[1, 1, 0, 0], [1, 2, 2, 0], [0, 2, 2, 0], [0, 0, 0, 0]]


def test_polygon_and_uncompressed_segmentations_are_read():
    # The square with corners (1, 1) and (3, 3) covers pixels 1 and 2 of both axes.
    polygon = {"segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]}
    # Column-major runs: 5 background, 2 foreground (pixels (y=1, x=1), (y=2, x=1)), 9 background.
    uncompressed = {"segmentation": {"size": [4, 4], "counts": [5, 2, 9]}}
    labels = annotations_to_label_image([polygon, uncompressed], 4, 4)
    assert labels.tolist() == [[0, 0, 0, 0], [0, 2, 1, 0], [0, 2, 1, 0], [0, 0, 0, 0]]


def test_colour_labels_skip_grey_and_number_by_first_appearance():
    color = np.zeros((3, 4, 3), np.uint8)
    color[0, 0] = (255, 255, 255)  # white: background
    color[0, 1] = (90, 90, 90)  # grey: background
    color[0, 2:4] = (0, 200, 10)
    color[1, 0] = (200, 0, 10)
    color[2, 3] = (0, 200, 10)  # the same colour: the same instance
    assert decode_color_labels(color).tolist() == [[0, 0, 1, 1], [2, 0, 0, 0], [0, 0, 0, 1]]


def test_label_image_errors_name_the_file(tmp_path):
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, np.array([[0.0, 1.5]], np.float32))
    with pytest.raises(ImageReadError, match=str(path)):
        read_label_image(path)
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(path)
    with pytest.raises(ImageReadError, match=str(path)):
        read_label_image(path, "index")


def test_lossy_label_images_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "labels.jpg"
    Image.fromarray(random_labels(0, 5).astype(np.uint8) * 40).save(path, quality=90)
    with pytest.raises(ImageReadError, match=f"{path}.*JPEG"):
        read_label_image(path)


def test_grey_labels_saved_as_rgb_are_read_as_ids(tmp_path):
    labels = random_labels(0, 5)
    path = tmp_path / "grey_rgb.png"
    Image.fromarray(np.repeat(labels.astype(np.uint8)[:, :, None], 3, axis=2)).save(path)
    assert (read_label_image(path) == labels).all()
    assert (read_label_image(path, "color") == 0).all()  # asked for colours: grey is background


def two_blob_folder(tmp_path) -> tuple:
    """images/a.png with masks/a.png where id 7 is two separate blobs and id 3 one."""
    labels = np.zeros((20, 30), np.uint16)
    labels[2:6, 2:8] = 7
    labels[12:18, 20:28] = 7  # the larger blob
    labels[12:15, 2:5] = 3
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    write_image(tmp_path / "images" / "a.png", labels.shape)
    Image.fromarray(labels).save(tmp_path / "masks" / "a.png")
    return tmp_path / "images", tmp_path / "masks"


def test_ids_of_several_regions_are_reported_or_split(tmp_path, caplog):
    images, masks = two_blob_folder(tmp_path)
    with caplog.at_level("WARNING", logger="objguided_d2.data.convert"):
        counts = convert_label_folder(images, masks, tmp_path / "joined.json")
    assert counts["instances"] == 2
    assert f"{masks / 'a.png'}: 7" in caplog.text and "--split-components" in caplog.text
    counts = convert_label_folder(images, masks, tmp_path / "split.json", split=True)
    assert counts["instances"] == 3
    record = load_coco_json(str(tmp_path / "split.json"), str(tmp_path))[0]
    assert sorted(a["bbox"] for a in record["annotations"]) == [
        [2.0, 2.0, 6.0, 4.0],
        [2.0, 12.0, 3.0, 3.0],
        [20.0, 12.0, 8.0, 6.0],
    ]


def test_split_components_keeps_the_largest_region_and_corner_contacts():
    labels = np.zeros((6, 8), np.int32)
    labels[0, 0] = labels[1, 1] = 2  # corner contact: one region
    labels[4:6, 4:8] = 5
    labels[0:2, 6:8] = 5
    split, fragmented = split_components(labels)
    assert fragmented == [5]
    assert (split[4:6, 4:8] == 5).all() and (split[0:2, 6:8] == 6).all()
    assert split[0, 0] == split[1, 1] == 2


def test_label_image_of_another_size_than_its_image_is_refused(tmp_path):
    images, masks = two_blob_folder(tmp_path)
    write_image(images / "a.png", (20, 31))
    with pytest.raises(ImageReadError, match=rf"{masks / 'a.png'} is 30x20 but .*a.png is 31x20"):
        convert_label_folder(images, masks, tmp_path / "out.json")


def assert_same_partition(a: np.ndarray, b: np.ndarray) -> None:
    """Equal label images up to a renumbering of the instances (0 stays background)."""
    assert ((a == 0) == (b == 0)).all()
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))


def decoded_labels(json_file, image_root) -> list:
    """Label images of a COCO JSON, as a dataset loads it."""
    records = load_coco_json(str(json_file), str(image_root))
    return [annotations_to_label_image(r["annotations"], r["height"], r["width"]) for r in records]


def write_image(path, shape=(48, 64)) -> None:
    Image.fromarray(np.full(shape, 128, np.uint8)).save(path)


@pytest.mark.parametrize("suffix, dtype, num", [(".tif", np.uint16, 300), (".png", np.uint8, 40)])
def test_label_folder_round_trip(tmp_path, suffix, dtype, num):
    """StarDist layout: images/x.png with masks/x.<tif|png>; the TIFFs hold over 255 instances."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    originals = [random_labels(seed, num, shape=(96, 128)) for seed in range(3)]
    for index, labels in enumerate(originals):
        write_image(tmp_path / "images" / f"img{index}.png", labels.shape)
        if suffix == ".tif":
            tifffile.imwrite(tmp_path / "masks" / f"img{index}.tif", labels.astype(dtype))
        else:
            Image.fromarray(labels.astype(dtype)).save(tmp_path / "masks" / f"img{index}.png")
    json_file = tmp_path / "out" / "labels.json"
    counts = convert_label_folder(tmp_path / "images", tmp_path / "masks", json_file)
    assert dtype == np.uint8 or min(int(o.max()) for o in originals) > 255
    assert counts == {"images": 3, "instances": sum(int(o.max()) for o in originals)}
    for original, decoded in zip(originals, decoded_labels(json_file, json_file.parent)):
        assert (decoded == original).all()


def test_cellpose_naming_in_one_folder(tmp_path):
    labels = random_labels(1, 5)
    write_image(tmp_path / "a.png")
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "a_masks.png")
    pairs = pair_images_with_labels(tmp_path, tmp_path, label_suffix="_masks")
    assert pairs == [("a", str(tmp_path / "a.png"), str(tmp_path / "a_masks.png"))]


def test_image_without_label_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_image(tmp_path / "images" / "lonely.png")
    with pytest.raises(FileNotFoundError, match="lonely.png"):
        pair_images_with_labels(tmp_path / "images", tmp_path / "masks")


def test_neural_layout_colour_coded_round_trip(tmp_path):
    """The authors' layout: <split>/<name>.png with colour-coded mask/<name>.png."""
    rng = np.random.default_rng(3)
    originals = {}
    for split in ("train", "val"):
        (tmp_path / "src" / split).mkdir(parents=True)
        labels = random_labels(len(originals), 30)
        colours = rng.integers(0, 256, (labels.max() + 1, 3)).astype(np.uint8)
        colours[:, 0] = np.arange(len(colours))  # distinct, never grey (R differs from G or B)
        colours[:, 1] = 255 - colours[:, 0]
        colours[0] = (0, 0, 0)
        write_image(tmp_path / "src" / split / f"{split}_cells.png")
        (tmp_path / "src" / "mask").mkdir(exist_ok=True)
        Image.fromarray(colours[labels]).save(tmp_path / "src" / "mask" / f"{split}_cells.png")
        originals[split] = labels
    output = tmp_path / "neural"
    report = convert_phase_folders(tmp_path / "src", "mask", output, "neural")
    assert set(report) == {"train", "val"}
    for split, labels in originals.items():
        json_file = output / f"neural_{split}.json"
        (decoded,) = decoded_labels(json_file, output)
        assert (decoded == labels).all()  # colours are numbered in raster order, as made here
        assert json.loads(json_file.read_text())["categories"] == [{"id": 1, "name": "cell"}]


def test_cvppp_palette_round_trip_and_default_split(tmp_path):
    """CVPPP: A1/plantNNN_rgb.png with palette plantNNN_label.png; 5 images split 3/1/1."""
    (tmp_path / "A1").mkdir()
    originals = {}
    for index in range(5):
        labels = random_labels(10 + index, 12)
        labels[labels == 3] = 40  # palette indices need not be consecutive
        label_image = Image.frombytes("P", labels.shape[::-1], labels.astype(np.uint8).tobytes())
        label_image.putpalette(list(np.random.default_rng(index).integers(0, 256, 768)))
        label_image.save(tmp_path / "A1" / f"plant{index:03d}_label.png")
        Image.fromarray(np.zeros((*labels.shape, 4), np.uint8)).save(
            tmp_path / "A1" / f"plant{index:03d}_rgb.png"
        )
        Image.fromarray(labels > 0).save(tmp_path / "A1" / f"plant{index:03d}_fg.png")  # ignored
        originals[f"A1/plant{index:03d}"] = labels
    output = tmp_path / "plant"
    report = convert_cvppp(tmp_path, output)
    assert [report[s]["images"] for s in ("train", "val", "test")] == [3, 1, 1]
    for split in ("train", "val", "test"):
        names = (output / "splits" / f"{split}.txt").read_text().split()
        decoded = decoded_labels(output / f"plant_{split}.json", output)
        for name, labels in zip(names, decoded):
            assert_same_partition(labels, originals[name])
    again = tmp_path / "again"
    convert_cvppp(tmp_path, again, splits_dir=output / "splits")
    assert (again / "plant_val.json").read_bytes() == (output / "plant_val.json").read_bytes()


def test_save_coco_json_paths_relative_inside_absolute_outside(tmp_path):
    inside, outside = tmp_path / "data" / "img" / "a.png", tmp_path / "b.png"
    records = [
        {"file_name": str(p), "height": 2, "width": 2, "annotations": []} for p in (inside, outside)
    ]
    json_file = tmp_path / "data" / "x.json"
    save_coco_json(records, json_file, ["thing"])
    images = json.loads(json_file.read_text())["images"]
    assert [i["file_name"] for i in images] == ["img/a.png", str(outside)]
