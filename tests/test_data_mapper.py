"""The shared dataset mapper: the paper's augmentations, bitmask ground truth, robust input."""

import numpy as np
import pytest
import tifffile
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError
from PIL import Image

from objguided_d2 import add_objguided_config
from objguided_d2.data import BioDatasetMapper, ImageReadError, median_object_size
from objguided_d2.data.formats import label_image_to_annotations, mask_to_annotation
from objguided_d2.data.transforms import RandomSquareCrop, ResizeToInput, ScaleShiftTransform


def make_record(path, image: np.ndarray, annotations=()) -> dict:
    """Write ``image`` (PNG, or TIFF for a .tif path) and return its dataset dict."""
    if str(path).endswith(".tif"):
        tifffile.imwrite(path, image)
    else:
        Image.fromarray(image).save(path)
    return {
        "file_name": str(path),
        "height": image.shape[0],
        "width": image.shape[1],
        "image_id": 7,
        "annotations": list(annotations),
    }


def make_mapper(
    augmentations,
    is_train=True,
    image_format="BGR",
    min_size=2,
    largest_component=False,
    interior_points=False,
    whole_objects=False,
):
    return BioDatasetMapper(
        is_train,
        augmentations=augmentations,
        image_format=image_format,
        min_instance_size=min_size,
        largest_component=largest_component,
        interior_points=interior_points,
        whole_objects=whole_objects,
    )


def box_annotation(height, width, x0, y0, x1, y1, category_id=0) -> dict:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask_to_annotation(mask, category_id=category_id)


def grid_labels(rows: int, columns: int, side: int, pitch: int, size: int) -> np.ndarray:
    """size x size label image of rows x columns squares, id = row * columns + column + 1."""
    labels = np.zeros((size, size), np.int32)
    for r in range(rows):
        for c in range(columns):
            y, x = r * pitch, c * pitch
            labels[y : y + side, x : x + side] = r * columns + c + 1
    return labels


# ---- transforms ----


def test_scale_shift_maps_coordinates():
    transform = ScaleShiftTransform(2.0, 0.5, 3.0, -1.0, 10, 10)
    assert transform.apply_coords(np.array([[1.0, 4.0]])).tolist() == [[5.0, 1.0]]
    boxes = transform.apply_box(np.array([[0.0, 0.0, 2.0, 4.0]]))
    assert boxes.tolist() == [[3.0, -1.0, 7.0, 1.0]]


def test_integer_shift_moves_pixels_and_fills_zeros():
    image = np.arange(1, 121, dtype=np.uint8).reshape(10, 12)
    out = ScaleShiftTransform(1.0, 1.0, 2.0, -3.0, 10, 12).apply_image(image)
    assert out[0, 2] == image[3, 0] and out[6, 11] == image[9, 9]
    assert (out[:, :2] == 0).all() and (out[7:] == 0).all()


def test_upscaling_masks_is_nearest():
    mask = np.array([[1, 0], [0, 0]], np.uint8)
    out = ScaleShiftTransform(2.0, 2.0, 0.0, 0.0, 4, 4).apply_segmentation(mask)
    assert out.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_mask_stacks_of_any_size_and_layout_warp_alike():
    """Over OpenCV's channel limit, C-ordered (chunks) and Fortran-ordered (planes) agree."""
    rng = np.random.default_rng(0)
    masks = rng.random((37, 53, 200)) > 0.5
    transform = ScaleShiftTransform(0.73, 0.81, 1.37, -2.11, 30, 41)
    c_ordered = transform.apply_segmentation(np.ascontiguousarray(masks))
    f_ordered = transform.apply_segmentation(np.asfortranarray(masks))
    single = transform.apply_segmentation(np.ascontiguousarray(masks[:, :, 150]))
    assert c_ordered.shape == f_ordered.shape == (30, 41, 200) and c_ordered.dtype == bool
    assert (c_ordered == f_ordered).all() and (c_ordered[:, :, 150] == single).all()


def test_letterbox_keeps_the_aspect_ratio():
    """Crop disabled: the whole 100 x 200 image, centred in a 50 x 50 square at scale 1/4."""
    image = np.full((100, 200, 3), 9, np.uint8)
    transform = RandomSquareCrop(50, random_center=False).get_transform(image)
    assert (transform.scale_x, transform.scale_y) == (0.25, 0.25)
    assert (transform.shift_x, transform.shift_y) == (0.0, 12.5)
    out = transform.apply_image(image)
    assert (out[:12] == 0).all() and (out[13:37] == 9).all() and (out[38:] == 0).all()


def test_crop_centres_respect_the_margin_on_the_right_axes():
    """On a 100 (H) x 1000 (W) image with margin 128: x in [128, 872]; y's margin halves to 32."""
    image = np.zeros((100, 1000, 3), np.uint8)
    crop = RandomSquareCrop(64, scales=(0.6, 1.3), center_margin=128)
    np.random.seed(0)
    centres, sides = [], set()
    for _ in range(300):
        t = crop.get_transform(image)
        centres.append(((32 - t.shift_x) / t.scale_x, (32 - t.shift_y) / t.scale_y))
        sides.add(round(64 / t.scale_x))
    xs, ys = np.array(centres).T
    assert 128 <= xs.min() < 200 and 800 < xs.max() <= 872
    assert 32 <= ys.min() < 40 and 60 < ys.max() <= 68
    assert sides == {600, 1300}


def test_test_resize_fit_and_stretch():
    image = np.zeros((300, 600, 3), np.uint8)
    fit = ResizeToInput(512, "fit").get_transform(image)
    assert fit.apply_image(image).shape == (256, 512, 3)
    stretch = ResizeToInput(512, "stretch").get_transform(image)
    assert stretch.apply_image(image).shape == (512, 512, 3)
    assert (stretch.scale_x, stretch.scale_y) == (512 / 600, 512 / 300)
    with pytest.raises(ValueError, match="TEST_RESIZE"):
        ResizeToInput(512, "crop")
    scaled = ResizeToInput(512, "stretch", scale=1.5)  # a scale replaces either mode
    assert scaled.get_transform(image).apply_image(image).shape == (450, 900, 3)
    assert scaled.output_hw(3, 5) == (4, 8)  # rounded, aspect kept


def test_median_object_size_is_measured_at_the_test_scale():
    resize = ResizeToInput(512, "fit")
    records = [  # a 256-px image is tested at twice its size, a 1024-px one at half
        {"height": 256, "width": 256, "annotations": [box_annotation(256, 256, 0, 0, 10, 10)]},
        {
            "height": 1024,
            "width": 512,
            "annotations": [
                box_annotation(1024, 512, 0, 0, 40, 90),
                {**box_annotation(1024, 512, 0, 0, 500, 500), "iscrowd": 1},  # left out
            ],
        },
        {"height": 100, "width": 100, "annotations": []},
    ]
    # diameters sqrt(w * h) at the test scale: 20, sqrt(20 * 45) = 30
    assert median_object_size(records, resize) == pytest.approx(25.0)
    assert median_object_size(records[2:], resize) == 0.0


# ---- the mapper ----


def test_test_mode_resizes_and_keeps_the_original_size(tmp_path):
    image = np.zeros((30, 60, 3), np.uint8)
    record = make_record(tmp_path / "a.png", image, [box_annotation(30, 60, 1, 1, 5, 5)])
    out = make_mapper([ResizeToInput(64, "fit")], is_train=False)(record)
    assert out["image"].shape == (3, 32, 64) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"], out["image_id"]) == (30, 60, 7)
    assert "instances" not in out and "annotations" not in out
    assert len(record["annotations"]) == 1  # the caller's dict is left alone


def test_image_without_instances(tmp_path):
    record = make_record(tmp_path / "empty.png", np.zeros((40, 40), np.uint8))
    instances = make_mapper([RandomSquareCrop(32, scales=(0.6, 1.3))])(record)["instances"]
    assert len(instances) == 0 and instances.image_size == (32, 32)
    assert instances.gt_masks.tensor.shape == (0, 32, 32)
    assert instances.gt_boxes.tensor.shape == (0, 4) and instances.gt_classes.dtype == torch.int64


def test_600_instances_pass_unchanged_through_an_identity_warp(tmp_path):
    labels = grid_labels(24, 25, side=8, pitch=10, size=256)
    record = make_record(
        tmp_path / "many.png", np.zeros((256, 256), np.uint8), label_image_to_annotations(labels)
    )
    instances = make_mapper([RandomSquareCrop(256, random_center=False)])(record)["instances"]
    assert len(instances) == 600
    expected = np.stack([labels == k for k in range(1, 601)])
    assert (instances.gt_masks.tensor.numpy() == expected).all()
    r, c = np.divmod(np.arange(600), 25)
    boxes = np.stack([c * 10, r * 10, c * 10 + 8, r * 10 + 8], axis=1)
    assert (instances.gt_boxes.tensor.numpy() == boxes).all()
    assert (instances.gt_classes == 0).all()


def test_600_instances_through_the_paper_augmentations(tmp_path):
    cfg = get_cfg()
    add_objguided_config(cfg)
    cfg.INPUT.IMAGE_SIZE = 128
    labels = grid_labels(24, 25, side=8, pitch=10, size=256)
    record = make_record(
        tmp_path / "many.png", np.zeros((256, 256), np.uint8), label_image_to_annotations(labels)
    )
    mapper = BioDatasetMapper(cfg, is_train=True)
    np.random.seed(1)
    for _ in range(3):
        instances = mapper(record)["instances"]
        assert 0 < len(instances) <= 600
        boxes = instances.gt_boxes.tensor
        assert torch.equal(boxes, instances.gt_masks.get_bounding_boxes().tensor)
        assert (boxes[:, 2:] - boxes[:, :2]).min() >= 2


def test_instances_cut_by_the_crop(tmp_path):
    """Shift left by 30 px: 1 px left of A (dropped), 2 px of B (kept), C outside, D inside."""
    annotations = [
        box_annotation(64, 64, 20, 5, 31, 10, category_id=0),  # A: x in [-10, 1)
        box_annotation(64, 64, 20, 15, 32, 20, category_id=1),  # B: x in [-10, 2)
        box_annotation(64, 64, 0, 25, 20, 30, category_id=2),  # C: x in [-30, -10)
        box_annotation(64, 64, 40, 35, 50, 40, category_id=3),  # D: x in [10, 20)
    ]
    record = make_record(tmp_path / "cut.png", np.zeros((64, 64), np.uint8), annotations)
    shift = ScaleShiftTransform(1.0, 1.0, -30.0, 0.0, 64, 64)
    instances = make_mapper([shift])(record)["instances"]
    assert instances.gt_boxes.tensor.tolist() == [[0, 15, 2, 20], [10, 35, 20, 40]]
    assert instances.gt_classes.tolist() == [1, 3]
    assert instances.gt_masks.tensor.sum(dim=(1, 2)).tolist() == [10, 50]
    flipped = make_mapper([shift, T.HFlipTransform(64)])(record)["instances"]
    assert flipped.gt_boxes.tensor.tolist() == [[62, 15, 64, 20], [44, 35, 54, 40]]


def test_largest_component_of_the_authors_keeps_the_main_fragment(tmp_path):
    """A cell whose protrusion the crop cuts in two (body + a fragment past a gap): by default
    both stay in its mask and box; with the authors' rule only the body stays, and with their
    4 px minimum a 3 px wide object goes."""
    cell = np.zeros((64, 64), bool)
    cell[10:30, 10:30] = True  # body
    cell[18:20, 30:40] = True  # protrusion
    cell[18:20, 44:60] = True  # its far part, apart once the crop hides column 40..43
    hidden = np.ones((64, 64), bool)
    hidden[:, 40:44] = False
    thin = np.zeros((64, 64), bool)
    thin[40:50, 5:8] = True
    annotations = [mask_to_annotation(cell & hidden), mask_to_annotation(thin, category_id=1)]
    record = make_record(tmp_path / "cell.png", np.zeros((64, 64), np.uint8), annotations)
    identity = ScaleShiftTransform(1.0, 1.0, 0.0, 0.0, 64, 64)

    every = make_mapper([identity])(record)["instances"]
    assert every.gt_boxes.tensor.tolist() == [[10, 10, 60, 30], [5, 40, 8, 50]]
    authors = make_mapper([identity], min_size=4, largest_component=True)(record)["instances"]
    assert authors.gt_boxes.tensor.tolist() == [[10, 10, 40, 30]]
    assert authors.gt_masks.tensor[0].sum() == 20 * 20 + 2 * 10


def test_interior_points_lie_in_the_cell_body_not_at_the_box_centre(tmp_path):
    """A body with a long protrusion: its box centre is background, its innermost pixel is the
    body's centre; a cell cut by the canvas edge gets the innermost pixel of what is visible."""
    cell = np.zeros((64, 64), bool)
    cell[10:21, 10:21] = True  # 11 x 11 body centred on pixel (15, 15)
    cell[14:17, 21:60] = True  # protrusion to the right
    edge = np.zeros((64, 64), bool)
    edge[40:64, 40:50] = True  # 10 px wide, runs off the bottom edge
    annotations = [mask_to_annotation(cell), mask_to_annotation(edge)]
    record = make_record(tmp_path / "cell.png", np.zeros((64, 64), np.uint8), annotations)
    identity = ScaleShiftTransform(1.0, 1.0, 0.0, 0.0, 64, 64)

    instances = make_mapper([identity], interior_points=True)(record)["instances"]
    points = instances.gt_interior_points
    assert points[0].tolist() == [15.5, 15.5]  # box centre (35, 15.5) is off the cell
    x, y = points[1].tolist()
    assert 44 <= x <= 46 and y >= 44 and y < 60  # 5 px from the sides and the canvas edge
    assert instances.gt_masks.tensor[1, int(y), int(x)]
    assert not make_mapper([identity])(record)["instances"].has("gt_interior_points")


def test_whole_objects_keep_the_box_and_keypoint_that_the_crop_cuts_off(tmp_path):
    """A crop that cuts off a cell's body: its box and keypoint stay those of the whole cell,
    beyond the canvas (the visible part's keypoint lies on the protrusion); a cell the crop
    keeps whole is unchanged; a flip mirrors the whole boxes and keypoints too."""
    cut = np.zeros((64, 64), bool)
    cut[10:21, 4:15] = True  # 11 x 11 body centred on pixel (9, 15), left of the crop
    cut[14:17, 15:60] = True  # protrusion to the right, 3 px wide, visible from column 20
    kept = np.zeros((64, 64), bool)
    kept[40:51, 30:41] = True
    annotations = [mask_to_annotation(cut), mask_to_annotation(kept)]
    record = make_record(tmp_path / "cells.png", np.zeros((64, 64), np.uint8), annotations)
    crop = ScaleShiftTransform(1.0, 1.0, -20.0, 0.0, 64, 64)  # input columns 20..83

    visible = make_mapper([crop], interior_points=True)(record)["instances"]
    whole = make_mapper([crop], interior_points=True, whole_objects=True)(record)["instances"]
    assert not visible.has("gt_whole_boxes")
    assert torch.equal(whole.gt_boxes.tensor, visible.gt_boxes.tensor)
    assert whole.gt_boxes.tensor.tolist() == [[0, 14, 40, 17], [10, 40, 21, 51]]
    assert whole.gt_whole_boxes.tensor.tolist() == [[-16, 10, 40, 21], [10, 40, 21, 51]]
    assert visible.gt_interior_points[0, 0] >= 0  # on the visible protrusion
    assert whole.gt_interior_points.tolist() == [[-10.5, 15.5], [15.5, 45.5]]  # the body, cut off
    assert visible.gt_interior_points[1].tolist() == [15.5, 45.5]

    flip = make_mapper([crop, T.HFlipTransform(64)], interior_points=True, whole_objects=True)
    flipped = flip(record)["instances"]
    assert flipped.gt_whole_boxes.tensor.tolist() == [[24, 10, 80, 21], [43, 40, 54, 51]]
    assert flipped.gt_interior_points.tolist() == [[74.5, 15.5], [48.5, 45.5]]


def test_crowd_annotations_are_ignored_and_polygons_read(tmp_path):
    crowd = dict(box_annotation(16, 16, 0, 0, 4, 4), iscrowd=1)
    polygon = {"segmentation": [[2, 2, 6, 2, 6, 5, 2, 5]], "category_id": 0, "iscrowd": 0}
    record = make_record(tmp_path / "p.png", np.zeros((16, 16), np.uint8), [crowd, polygon])
    instances = make_mapper([RandomSquareCrop(16, random_center=False)])(record)["instances"]
    assert instances.gt_boxes.tensor.tolist() == [[2, 2, 6, 5]]


@pytest.fixture
def config_mapper():
    """Letterbox to 64 px, no flip: deterministic."""
    cfg = get_cfg()
    add_objguided_config(cfg)
    cfg.INPUT.IMAGE_SIZE = 64
    cfg.INPUT.SQUARE_CROP.ENABLED = False
    cfg.INPUT.HFLIP_TRAIN = False
    return cfg


def test_16bit_tiff_grayscale_through_the_mapper(tmp_path, config_mapper):
    image = np.zeros((32, 64), np.uint16)
    image[:, 32:] = 4000
    record = make_record(tmp_path / "deep.tif", image, [box_annotation(32, 64, 40, 8, 56, 24)])
    out = BioDatasetMapper(config_mapper, is_train=True)(record)
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.uint8
    # The image sits in rows 16..48; its bright right half is 255 after the stretch.
    assert out["image"][:, 20:44, 36:60].min() == 255 and out["image"][:, :15].max() == 0
    assert out["instances"].gt_boxes.tensor.tolist() == [[40, 24, 56, 40]]
    config_mapper.INPUT.FORMAT = "L"
    assert BioDatasetMapper(config_mapper, is_train=True)(record)["image"].shape == (1, 64, 64)


def test_vertical_flip_in_training_only_when_asked(tmp_path, config_mapper):
    box = box_annotation(64, 64, 8, 4, 20, 12)
    record = make_record(tmp_path / "v.png", np.zeros((64, 64), np.uint8), [box])

    def boxes_over_draws():
        np.random.seed(0)
        mapper = BioDatasetMapper(config_mapper, is_train=True)
        return {tuple(mapper(record)["instances"].gt_boxes.tensor[0].tolist()) for _ in range(16)}

    assert boxes_over_draws() == {(8, 4, 20, 12)}
    config_mapper.INPUT.VFLIP_TRAIN = True
    assert boxes_over_draws() == {(8, 4, 20, 12), (8, 52, 20, 60)}  # as is, or upside down


def test_training_crops_and_a_separate_test_size(tmp_path, config_mapper):
    record = make_record(tmp_path / "wide.png", np.zeros((50, 100), np.uint8))
    config_mapper.INPUT.TEST_IMAGE_SIZE = 128
    assert BioDatasetMapper(config_mapper, is_train=True)(record)["image"].shape == (3, 64, 64)
    assert BioDatasetMapper(config_mapper, is_train=False)(record)["image"].shape == (3, 64, 128)
    config_mapper.INPUT.TEST_IMAGE_SIZE = 0  # the training size
    assert BioDatasetMapper(config_mapper, is_train=False)(record)["image"].shape == (3, 32, 64)


def test_rgba_png_through_the_mapper(tmp_path, config_mapper):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 200, 255  # blue, opaque
    out = BioDatasetMapper(config_mapper, is_train=False)(make_record(tmp_path / "c.png", rgba))
    assert out["image"][:, 10, 10].tolist() == [200, 0, 0]  # BGR


def test_missing_corrupt_and_mismatched_images_name_the_file(tmp_path, config_mapper):
    mapper = BioDatasetMapper(config_mapper, is_train=True)
    missing = {"file_name": str(tmp_path / "gone.png"), "height": 4, "width": 4, "image_id": 0}
    with pytest.raises(FileNotFoundError, match="gone.png"):
        mapper(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageReadError, match=str(corrupt)):
        mapper(dict(missing, file_name=str(corrupt)))
    record = make_record(tmp_path / "small.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(SizeMismatchError, match="small.png"):
        mapper(dict(record, height=9))
