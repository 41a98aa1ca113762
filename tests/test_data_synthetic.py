"""Synthetic neural-like scenes: exact masks (hand-drawn geometry, generated sets), determinism."""

import json

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from scipy import ndimage

from objguided_d2.data import register_synthetic_neural_dataset
from objguided_d2.data.synthetic import (
    NUCLEUS,
    PROTRUSION,
    SOMA,
    Cell,
    Protrusion,
    generate_neural_scene,
    generate_synthetic_neural,
    rasterize_cells,
)

SMALL = {"height": 160, "width": 200}


def line(points, thickness=1):
    return Protrusion(np.array(points, np.int32), thickness)


def test_a_one_pixel_protrusion_is_exactly_its_line():
    cell = Cell(center=(20, 30), axes=(5, 5), angle=0.0, protrusions=(line([(20, 30), (60, 30)]),))
    labels, parts = rasterize_cells([cell], 50, 80)
    assert (labels[30, 20:61] == 1).all() and labels[30, 61] == 0
    assert (labels[29, 26:] == 0).all() and (labels[31, 26:] == 0).all()  # 1 px wide past the soma
    assert (parts[30, 26:61] == PROTRUSION).all()
    assert parts[30, 20] == NUCLEUS and parts[30, 24] == SOMA  # nucleus radius 2 (half of 5)


def test_z_order_later_cells_on_top_and_somas_over_protrusions():
    first = Cell(center=(20, 20), axes=(6, 6), angle=0.0)
    # The second cell's soma overlaps the first; its protrusion passes under the first soma.
    second = Cell(center=(28, 20), axes=(6, 6), angle=0.0, protrusions=(line([(28, 20), (5, 20)]),))
    labels, _ = rasterize_cells([first, second], 40, 40)
    assert labels[20, 24] == 2  # inside both somas: the later one
    assert labels[20, 15] == 1  # inside the first soma only: the protrusion is hidden
    assert (labels[20, 5:14] == 2).all()  # the protrusion beyond the first soma


def test_a_thick_protrusion_is_thicker():
    cell = Cell(center=(5, 20), axes=(3, 3), angle=0.0, protrusions=(line([(5, 20), (45, 20)], 3),))
    labels, _ = rasterize_cells([cell], 40, 50)
    assert (labels[19:22, 15:40] == 1).all() and (labels[17, 15:40] == 0).all()


def decode_masks(annotations) -> np.ndarray:
    return np.moveaxis(mask_util.decode([a["segmentation"] for a in annotations]), 2, 0) > 0


def test_generated_set_is_deterministic_and_depends_on_the_seed(tmp_path):
    first = generate_synthetic_neural(tmp_path / "a", num_images=3, seed=5, **SMALL)
    second = generate_synthetic_neural(tmp_path / "b", num_images=3, seed=5, **SMALL)
    other = generate_synthetic_neural(tmp_path / "c", num_images=3, seed=6, **SMALL)
    for name in ("annotations.json", "images/000000.png", "images/000002.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "images/000001.png").read_bytes() != (
        tmp_path / "c" / "images/000001.png"
    ).read_bytes()
    assert json.loads(open(first).read())["images"] == json.loads(open(second).read())["images"]
    assert json.loads(open(other).read())["info"]["seed"] == 6


def test_a_set_is_reused_while_its_parameters_match(tmp_path):
    json_file = generate_synthetic_neural(tmp_path, num_images=2, seed=0, **SMALL)
    written = (tmp_path / "images" / "000000.png").stat().st_mtime_ns
    generate_synthetic_neural(tmp_path, num_images=2, seed=0, **SMALL)
    assert (tmp_path / "images" / "000000.png").stat().st_mtime_ns == written
    generate_synthetic_neural(tmp_path, num_images=3, seed=0, **SMALL)
    assert len(json.loads(open(json_file).read())["images"]) == 3


@pytest.fixture(scope="module")
def scenes():
    """(image, labels, annotations) of four default-size scenes, as the set generator makes them."""
    from objguided_d2.data.formats import label_image_to_annotations

    out = []
    for index in range(4):
        image, labels = generate_neural_scene(np.random.default_rng([0, index]))
        out.append((image, labels, label_image_to_annotations(labels)))
    return out


def test_default_scene_is_a_512x640_grayscale_image(scenes):
    image, labels, annotations = scenes[0]
    assert image.shape == labels.shape == (512, 640) and image.dtype == np.uint8
    assert 12 <= len(annotations) <= 24 and labels.max() == len(annotations)


def test_masks_are_disjoint_and_reproduce_the_label_image(scenes):
    for _, labels, annotations in scenes:
        masks = decode_masks(annotations)
        assert masks.sum(axis=0).max() == 1
        painted = (masks * np.arange(1, len(masks) + 1)[:, None, None]).sum(axis=0)
        assert (painted == labels).all()


def test_every_instance_is_at_least_2_px_in_both_directions(scenes):
    for _, _, annotations in scenes:
        assert min(min(a["bbox"][2:]) for a in annotations) >= 2


def test_thin_protrusions_exist(scenes):
    """Most cells have parts under 3 px wide (a 3x3 opening removes them) and 1 px wide ones (both
    horizontal or both vertical neighbours outside the mask)."""
    thin_cells = one_pixel_cells = cells = 0
    for _, _, annotations in scenes:
        for mask in decode_masks(annotations):
            opened = ndimage.binary_opening(mask, np.ones((3, 3), bool))
            thin_cells += (mask & ~opened).sum() >= 20
            p = np.pad(mask, 1)
            one_pixel = (~p[1:-1, :-2] & ~p[1:-1, 2:]) | (~p[:-2, 1:-1] & ~p[2:, 1:-1])
            one_pixel_cells += (mask & one_pixel).sum() >= 10
            cells += 1
    assert thin_cells >= 0.8 * cells and one_pixel_cells >= 0.8 * cells


def test_touching_or_overlapping_neighbours_exist(scenes):
    """Instances whose masks are 8-adjacent (touching, or one partly hidden by the other)."""
    for _, labels, _ in scenes:
        dilated = cv2.dilate(labels.astype(np.float32), np.ones((3, 3), np.uint8))
        touching = (labels > 0) & (dilated > 0) & (dilated != labels)
        pairs = {tuple(p) for p in np.stack([labels[touching], dilated[touching]], 1).tolist()}
        assert len(pairs) >= 3


def test_cells_are_brighter_than_their_surroundings(scenes):
    for image, labels, _ in scenes:
        near = cv2.dilate((labels > 0).astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
        assert image[labels > 0].mean() > image[near & (labels == 0)].mean() + 5


def test_registered_synthetic_set_generates_on_first_use(tmp_path):
    name = "test_synthetic_registration"
    register_synthetic_neural_dataset(name, tmp_path / "set", num_images=2, seed=3, **SMALL)
    try:
        assert not (tmp_path / "set").exists()  # registration reads and writes nothing
        records = DatasetCatalog.get(name)
        assert len(records) == 2 and all(r["annotations"] for r in records)
        assert {a["category_id"] for r in records for a in r["annotations"]} == {0}
        metadata = MetadataCatalog.get(name)
        assert metadata.thing_classes == ["cell"]
        assert metadata.json_file == str(tmp_path / "set" / "annotations.json")
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
