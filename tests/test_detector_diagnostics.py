"""Detector diagnostics: center recall and size ratios on a model whose maps are the targets; the
mask branch on the true boxes with logits that are its targets, empty, or fill whole ROIs."""

import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from helpers import load_tool, objguided_cfg, render
from PIL import Image

from objguided_d2.data import BioDatasetMapper
from objguided_d2.data.formats import mask_to_annotation
from objguided_d2.data.transforms import ScaleShiftTransform
from objguided_d2.evaluation import diagnose_detector, masks_on_true_boxes, summarize_detections
from objguided_d2.evaluation.detector_diagnostics import _object_masks, _object_points, thin_parts
from objguided_d2.modeling.roi_crops import crop_masks

pytestmark = pytest.mark.usefixtures("single_thread")


def squares_record(tmp_path, sides) -> dict:
    """A 128 x 128 image of squares of the given sides on a row, as a dataset record."""
    masks = np.zeros((len(sides), 128, 128), bool)
    x = 4
    for mask, side in zip(masks, sides):
        mask[40 : 40 + side, x : x + side] = True
        x += side + 6
    path = tmp_path / "squares.png"
    Image.fromarray(render(masks, [200] * len(sides), seed=0)[0].numpy()).save(path)
    annotations = [mask_to_annotation(m) for m in masks]
    return {"file_name": str(path), "height": 128, "width": 128, "image_id": 0,
            "annotations": annotations}  # fmt: skip


@pytest.mark.parametrize("center_point", ["box", "interior"])
def test_a_detector_that_predicts_its_targets_finds_every_object_at_its_size(
    tmp_path, center_point
):
    opts = ["INPUT.IMAGE_SIZE", 128, "MODEL.OBJGUIDED.CENTER_POINT", center_point]
    cfg = objguided_cfg(compact=True, opts=opts)
    model = build_model(cfg).eval()
    record = squares_record(tmp_path, [10, 16, 30, 50])
    generator = model.proposal_generator
    identity = ScaleShiftTransform(1.0, 1.0, 0.0, 0.0, 128, 128)
    instances = BioDatasetMapper(cfg, is_train=True, augmentations=[identity])(record)["instances"]
    targets = generator.encode([instances], (1, 1, 32, 32))
    maps = []
    for values in (generator.wh_target(targets.sizes), targets.offset):
        dense = torch.zeros(32 * 32, values.shape[1])
        dense[targets.index] = values
        maps.append(dense.view(1, 32, 32, -1).permute(0, 3, 1, 2))
    heat = torch.logit(targets.heatmap.clamp(1e-4, 1 - 1e-4))
    generator.predict_maps = lambda features: (heat, *maps)
    mapper = BioDatasetMapper(cfg, is_train=False)

    summary = diagnose_detector(model, [(record, mapper(record))], score_thresh=0.3)

    assert summary["images"] == 1 and summary["objects"] == 4 and summary["matched"] == 4
    assert summary["detections_per_image"] == 4 and summary["center_recall"] == 1.0
    assert summary["median_width_ratio"] == pytest.approx(1.0)
    assert summary["median_head_width_ratio"] == pytest.approx(1.0)
    assert summary["median_head_height_ratio"] == pytest.approx(1.0)
    assert [row["objects"] for row in summary["by_size"]] == [2, 1, 1, 0]
    assert summary["box_center_on_object"] == 1.0


@pytest.mark.parametrize(
    "perfect, confidence_score",
    [(True, False), (True, True), (False, False)],
    ids=["cropped-ground-truth", "cropped-ground-truth-ranked-by-mask-confidence", "empty"],
)
def test_masks_on_true_boxes_score_each_object_by_its_own_box(tmp_path, perfect, confidence_score):
    """A mask branch whose logits are the ground truth cropped on each ROI's grid (the training
    target) recovers every object from its own box, whatever its neighbours and whether the
    config ranks detections by their masks' confidence; one that predicts nothing scores 0 for
    each."""
    opts = ["INPUT.IMAGE_SIZE", 128, "MODEL.OBJGUIDED.MASK_CONFIDENCE_SCORE", confidence_score]
    cfg = objguided_cfg(compact=True, opts=opts)
    model = build_model(cfg).eval()
    heads = model.roi_heads
    nms_thresh = heads.mask_nms_thresh
    record = squares_record(tmp_path, [10, 16, 30, 50])
    truth = BioDatasetMapper(cfg, is_train=False)(record)  # 128 px: the input is the image
    masks = torch.stack(
        [torch.from_numpy(mask_util.decode(a["segmentation"])) for a in record["annotations"]]
    ).float()
    segment = heads.segment

    def segment_as_the_targets(level_maps, batch_index, pyramid, groups, keypoints=None):
        outputs = segment(level_maps, batch_index, pyramid, groups, keypoints)
        for index, (group, out) in enumerate(zip(groups, outputs)):
            soft = crop_masks(masks, pyramid[group.indices], out.logits.shape[-2:], group.indices)
            logits = torch.logit(soft.clamp(1e-4, 1 - 1e-4)) if perfect else soft - 20
            outputs[index] = out._replace(logits=logits)
        return outputs

    heads.segment = segment_as_the_targets

    summary = masks_on_true_boxes(model, [(record, truth)])

    assert summary["objects"] == 4
    assert [row["objects"] for row in summary["by_size"]] == [2, 1, 1, 0]
    assert summary["mean_iou"] == (1.0 if perfect else 0.0)
    assert summary["iou_0.75"] == (1.0 if perfect else 0.0)
    assert 0 < summary["thin_share"] < 0.5  # the squares' corners
    if perfect:
        assert summary["on_other_objects"] == 0.0
        assert summary["thin_missed"] == summary["core_missed"] == 0.0
    else:  # no mask at all
        assert math.isnan(summary["on_other_objects"])
        assert summary["thin_missed"] == summary["core_missed"] == 1.0
    assert heads.mask_nms_thresh == nms_thresh  # restored
    assert heads.mask_confidence_score == confidence_score


def test_thin_parts_are_the_protrusions_of_an_object():
    """A 20 px square with a 2 px wide, 30 px long protrusion: the protrusion is thin, the
    square's interior is not."""
    mask = np.zeros((40, 70), bool)
    mask[10:30, 10:30] = True
    mask[19:21, 30:60] = True

    thin = thin_parts(mask)

    assert thin[19:21, 31:60].all()
    assert not thin[12:28, 12:28].any()
    assert not (thin & ~mask).any()


def test_masks_on_true_boxes_count_the_pixels_that_lie_on_neighbours(tmp_path):
    """ROIs of twice the boxes filled by the seg head reach the neighbouring squares (6 px
    apart): part of each mask lies on other objects."""
    opts = ["INPUT.IMAGE_SIZE", 128, "MODEL.OBJGUIDED.BOX_ENLARGE_TEST", 2.0]
    cfg = objguided_cfg(compact=True, opts=opts)
    model = build_model(cfg).eval()
    model.roi_heads.seg_head = lambda e1, valid=None: (
        torch.full_like(e1[:, :1], 20.0) * (1 if valid is None else valid)
    )
    record = squares_record(tmp_path, [10, 16, 30, 50])

    summary = masks_on_true_boxes(model, [(record, BioDatasetMapper(cfg, is_train=False)(record))])

    assert 0 < summary["on_other_objects"] < 0.5
    assert summary["iou_0.5"] < 1


def test_masks_on_true_boxes_segment_from_the_true_boxes_whatever_the_box_refinement(tmp_path):
    """A config that refines boxes from the masks at inference does not change what is measured:
    each mask comes from its object's own box (the ROIs of twice the boxes, filled by the seg
    head, would otherwise grow into their neighbours)."""
    record = squares_record(tmp_path, [10, 16, 30, 50])
    summaries = []
    for steps in (0, 1):
        opts = ["INPUT.IMAGE_SIZE", 128, "MODEL.OBJGUIDED.BOX_ENLARGE_TEST", 2.0]
        cfg = objguided_cfg(compact=True, opts=opts + ["MODEL.OBJGUIDED.BOX_REFINE_STEPS", steps])
        model = build_model(cfg).eval()
        model.roi_heads.seg_head = lambda e1, valid=None: (
            torch.full_like(e1[:, :1], 20.0) * (1 if valid is None else valid)
        )
        mapped = BioDatasetMapper(cfg, is_train=False)(record)
        summaries.append(masks_on_true_boxes(model, [(record, mapped)]))
        assert model.roi_heads.box_refine_steps == steps  # restored
    refined, plain = ({k: v for k, v in s.items() if k != "by_size"} for s in summaries[::-1])
    assert refined == plain
    assert summaries[1]["by_size"][:3] == summaries[0]["by_size"][:3]  # the last bin is empty


def test_the_tool_reports_the_masks_on_true_boxes(tmp_path, capsys):
    """tools/diagnose_detector.py with --masks-on-true-boxes on a registered dataset and a
    checkpoint: both summaries printed and written."""
    cfg = objguided_cfg(compact=True, opts=["INPUT.IMAGE_SIZE", 128])
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model")
    record = squares_record(tmp_path, [10, 16, 30, 50])
    name = "diagnose_detector_squares"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [record])
    output = tmp_path / "summary.json"

    load_tool("diagnose_detector").main(
        ["--config-file", str(config), "--weights", str(tmp_path / "model.pth"),
         "--dataset", name, "--masks-on-true-boxes", "--output", str(output)]
    )  # fmt: skip

    assert "masks predicted from the ground-truth boxes" in capsys.readouterr().out
    summary = json.loads(output.read_text())
    assert summary["objects"] == 4 and summary["masks_on_true_boxes"]["objects"] == 4
    assert 0 <= summary["masks_on_true_boxes"]["mean_iou"] <= 1


def test_summary_of_undersized_and_missed_objects():
    peaks = torch.tensor([0.9, 0.5, 0.1, 0.4])
    gt_sizes = torch.tensor([[10.0, 10.0], [30.0, 20.0], [50.0, 50.0], [100.0, 100.0]])
    nan = float("nan")
    pred_sizes = torch.tensor([[9.0, 8.0], [27.0, 18.0], [nan, nan], [90.0, 95.0]])
    # the size head regresses to the mean: too large for small objects, too small for large ones
    head_sizes = torch.tensor([[20.0, 30.0], [45.0, 40.0], [50.0, 40.0], [60.0, 50.0]])
    summary = summarize_detections(
        peaks, gt_sizes, pred_sizes, head_sizes, [3, 1], score_thresh=0.3
    )
    assert summary["center_recall"] == 0.75
    assert (summary["objects"], summary["matched"]) == (4, 3)
    assert summary["objects_per_image"] == 2 and summary["detections_per_image"] == 2
    assert summary["median_width_ratio"] == pytest.approx(0.9)
    assert summary["median_height_ratio"] == pytest.approx(0.9)
    by_size = {row["size"]: row for row in summary["by_size"]}
    assert by_size[(0, 20)]["median_height_ratio"] == pytest.approx(0.8)
    assert by_size[(40, 80)]["matched"] == 0 and by_size[(40, 80)]["center_recall"] == 0
    assert by_size[(80, float("inf"))]["center_recall"] == 1
    # over every object, detected or not
    assert summary["median_head_width_ratio"] == pytest.approx((1.5 + 1.0) / 2)
    assert by_size[(0, 20)]["median_head_height_ratio"] == pytest.approx(3.0)
    assert by_size[(40, 80)]["median_head_width_ratio"] == pytest.approx(1.0)
    assert by_size[(80, float("inf"))]["median_head_width_ratio"] == pytest.approx(0.6)


def test_object_points_of_a_cell_with_a_protrusion():
    """A 9 x 9 body with a long arm: the box centre is background, the innermost pixel is the
    body's centre; points are scaled to the network input."""
    cell = np.zeros((40, 80), bool)
    cell[0:9, 0:9] = True
    cell[0:3, 9:80] = True  # along the top: the box centre (40, 4.5) misses it
    square = np.zeros((40, 80), bool)
    square[20:30, 20:30] = True
    record = {"height": 40, "width": 80,
              "annotations": [mask_to_annotation(cell), mask_to_annotation(square)]}  # fmt: skip
    points, on_object = _object_points(_object_masks(record), (80, 160))
    assert on_object.tolist() == [False, True]
    assert points[0].tolist() == [9.0, 9.0]  # pixel (4, 4), centre (4.5, 4.5), scaled by 2
