"""Center-keypoint proposal generator: targets, losses and decoding against hand computations."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, ImageList, Instances

from objguided_d2 import add_objguided_config
from objguided_d2.modeling.backbone import build_objguided_resnet_backbone
from objguided_d2.modeling.center_head import (
    CenterKeypointProposalGenerator,
    center_focal_loss,
    encode_center_targets,
    gaussian_radius,
)


def make_head(**kwargs) -> CenterKeypointProposalGenerator:
    args = dict(in_feature="dec4", in_channels=8, stride=4, num_classes=2, head_channels=8)
    args.update(kwargs)
    return CenterKeypointProposalGenerator(**args)


def gt(image_size, boxes, classes) -> Instances:
    instances = Instances(image_size)
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return instances


def encode_one(boxes, classes, shape=(1, 2, 16, 16)):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    batch_index = torch.zeros(len(boxes), dtype=torch.int64)
    return encode_center_targets(boxes, torch.tensor(classes), batch_index, shape, 4, 0.7)


def test_gaussian_radius_of_square_boxes():
    sides = torch.tensor([3.0, 4.0, 8.0, 16.0, 32.0])
    radii = gaussian_radius(sides, sides, 0.7)
    # For squares of side a the third quadratic wins: r = a (sqrt(11.2) - 2.8) / 2.
    expected = sides.double() * (math.sqrt(11.2) - 2.8) / 2
    torch.testing.assert_close(radii, expected)
    assert radii.long().tolist() == [0, 1, 2, 4, 8]


def test_gaussian_radius_of_a_wide_box():
    # h = 4, w = 12: r1 = 15.45, r2 = 30.09, r3 = (-22.4 + sqrt(663.04)) / 2 = 1.6748.
    radius = gaussian_radius(torch.tensor([4.0]), torch.tensor([12.0]), 0.7)
    torch.testing.assert_close(radius, torch.tensor([(math.sqrt(663.04) - 22.4) / 2]).double())


def test_heatmap_is_the_exact_gaussian_around_the_centre():
    # 32 px box -> 8 cells -> r = 2, sigma = 5/6, 2 sigma^2 = 25/18; centre cell (8, 8).
    targets = encode_one([[16, 16, 48, 48]], [1])
    heat = targets.heatmap[0, 1]
    expected = {
        (0, 0): 1.0,
        (1, 0): math.exp(-18 / 25),
        (1, 1): math.exp(-36 / 25),
        (2, 0): math.exp(-72 / 25),
        (2, 2): math.exp(-144 / 25),
        (-2, 1): math.exp(-90 / 25),
    }
    for (dx, dy), value in expected.items():
        assert heat[8 + dy, 8 + dx].item() == pytest.approx(value, rel=1e-6), (dx, dy)
    assert heat[8, 11] == 0 and heat[5, 8] == 0  # outside the 5x5 window
    assert (heat > 0).sum() == 25
    assert targets.heatmap[0, 0].count_nonzero() == 0  # other class untouched


def test_overlapping_gaussians_merge_by_max_per_class():
    # r = 1 (16 px, sigma 1/2) at cell (5, 5); r = 2 (32 px, sigma 5/6) at cell (8, 5).
    targets = encode_one([[12, 12, 28, 28], [16, 4, 48, 36]], [0, 0])
    heat = targets.heatmap[0, 0]
    assert heat[5, 5] == 1 and heat[5, 8] == 1
    # cell (6, 5): exp(-1 / 0.5) from the first, exp(-4 / (50/36)) from the second.
    assert heat[5, 6].item() == pytest.approx(max(math.exp(-2), math.exp(-2.88)), rel=1e-6)
    assert heat[5, 7].item() == pytest.approx(max(math.exp(-2), math.exp(-0.72)), rel=1e-6)


def test_radius_uses_the_ceiled_box_size():
    # 13 px = 3.25 cells: ceil -> 4 -> r = 1 (3.25 itself would give r = 0).
    heat = encode_one([[20, 20, 33, 33]], [0]).heatmap[0, 0]
    assert heat.count_nonzero() == 9


def test_size_and_offset_targets_follow_the_documented_convention():
    targets = encode_one([[17, 18, 47, 50]], [0])
    # ct = (32, 34) / 4 = (8, 8.5) -> cell (8, 8), offset (0, 0.5); wh = (30, 32) / 4.
    assert targets.index.tolist() == [8 * 16 + 8]
    assert targets.sizes.tolist() == [[7.5, 8.0]]
    assert targets.offset.tolist() == [[0.0, 0.5]]
    assert targets.heatmap[0, 0, 8, 8] == 1


def test_interior_keypoints_carry_the_heatmap_peak_and_the_distances_to_the_sides():
    # Box (16, 16, 48, 48): 8 cells, r = 2; keypoint (21.5, 42.5) px = (5.375, 10.625) cells.
    boxes = torch.tensor([[16.0, 16.0, 48.0, 48.0]])
    points = torch.tensor([[21.5, 42.5]])
    zero = torch.zeros(1, dtype=torch.int64)
    targets = encode_center_targets(boxes, zero, zero, (1, 1, 16, 16), 4, 0.7, points)
    assert targets.index.tolist() == [10 * 16 + 5]
    assert targets.offset.tolist() == [[0.375, 0.625]]
    assert targets.sizes.tolist() == [[1.375, 6.625, 6.625, 1.375]]
    heat = targets.heatmap[0, 0]
    assert heat[10, 5] == 1 and (heat > 0).sum() == 25  # the box's radius, around the keypoint


def test_interior_keypoint_heads_predict_four_sides():
    assert make_head(center_point="interior").wh_head[-1].out_channels == 4
    with pytest.raises(ValueError, match="CENTER_POINT.*'middle'"):
        make_head(center_point="middle")


def test_boxes_centred_outside_the_map_get_no_target():
    targets = encode_one([[60, 60, 80, 80], [8, 8, 24, 24]], [0, 0])
    assert targets.index.tolist() == [4 * 16 + 4]
    assert targets.heatmap.count_nonzero() == 9


def test_sizes_that_a_cut_side_enters_are_not_regressed():
    boxes = torch.tensor([[-8.0, 16.0, 24.0, 48.0], [16.0, 16.0, 48.0, 72.0]])
    cut = torch.tensor([[True, False, False, False], [False, False, False, True]])
    zero = torch.zeros(2, dtype=torch.int64)
    points = torch.tensor([[4.5, 30.5], [30.5, 30.5]])
    sides = encode_center_targets(boxes, zero, zero, (1, 1, 16, 16), 4, 0.7, points, cut)
    assert sides.size_weights.tolist() == [[0, 1, 1, 1], [1, 1, 1, 0]]
    sizes = encode_center_targets(boxes, zero, zero, (1, 1, 16, 16), 4, 0.7, None, cut)
    assert sizes.size_weights.tolist() == [[0, 1], [1, 0]]  # width, height
    assert encode_one([[17, 18, 47, 50]], [0]).size_weights.tolist() == [[1, 1]]


@pytest.mark.parametrize("center_point", ["box", "interior"])
def test_whole_objects_train_the_kept_sides_and_the_whole_keypoint(center_point):
    """A box the crop cut on the left (visible x from 0, whole from -16): with
    cropped_objects="whole" the heatmap peaks at the whole object's keypoint, and a wrong left
    side (interior keypoint) or width (box centre) costs nothing, a wrong top or height does."""
    head = make_head(center_point=center_point, cropped_objects="whole")
    instances = gt((64, 64), [[0, 16, 32, 48]], [0])
    instances.gt_whole_boxes = Boxes(torch.tensor([[-16.0, 16.0, 32.0, 48.0]]))
    instances.gt_interior_points = torch.tensor([[12.5, 24.5]])
    targets = head.encode([instances], (1, 2, 16, 16))
    # (x, y) cells: the keypoint (12.5, 24.5) / 4; the whole box's centre (8, 32) / 4 (the
    # visible box's would be (16, 32) / 4)
    x, y = (3, 6) if center_point == "interior" else (2, 8)
    assert targets.index.tolist() == [y * 16 + x]
    heat, offset = torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16, 16)
    right = torch.zeros(1, len(targets.sizes[0]), 16, 16)
    right[0, :, y, x] = targets.sizes[0]
    losses = []
    for channel in (0, 1):
        wrong = right.clone()
        wrong[0, channel, y, x] += 5.0
        losses.append(head.losses(heat, wrong, offset, [instances])["loss_wh"].item())
    assert losses[0] == 0 and losses[1] > 0
    with pytest.raises(ValueError, match="gt_whole_boxes"):
        head.encode([gt((64, 64), [[0, 16, 32, 48]], [0])], (1, 2, 16, 16))
    with pytest.raises(ValueError, match="CROPPED_OBJECTS.*'all'"):
        make_head(cropped_objects="all")


def test_focal_loss_hand_computed():
    logits = torch.tensor([0.0, math.log(3), -math.log(3)]).view(1, 1, 1, 3)
    target = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3)
    # positive p = 1/2: (1/2)^2 log(1/2); y = 1/2, p = 3/4: (1/2)^4 (3/4)^2 log(1/4);
    # y = 0, p = 1/4: (1/4)^2 log(3/4); one positive.
    negatives = (1 / 16) * (9 / 16) * math.log(1 / 4) + (1 / 16) * math.log(3 / 4)
    expected = -(0.25 * math.log(0.5) + negatives)
    assert center_focal_loss(logits, target, 2.0, 4.0).item() == pytest.approx(expected, rel=1e-6)
    # No positive: the bare negative sum.
    no_positive = center_focal_loss(logits[..., 1:], target[..., 1:], 2.0, 4.0)
    assert no_positive.item() == pytest.approx(-negatives, rel=1e-6)


def test_focal_loss_is_finite_for_saturated_logits():
    # sigmoid(200) == 1 in float32, so log(1 - p) of an unclamped sigmoid would be -inf.
    logits = torch.tensor([200.0, -200.0]).view(1, 1, 1, 2).requires_grad_()
    target = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    loss = center_focal_loss(logits, target, 2.0, 4.0)
    assert loss.item() == pytest.approx(400.0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    "kind, expected_wh", [("l1", (0.5 + 2) / 2), ("smooth_l1", (0.125 + 1.5) / 2)]
)
def test_regression_losses_are_read_at_the_centres(kind, expected_wh):
    head = make_head(regression_loss=kind, loss_weights={"loss_wh": 0.1})
    heat = torch.zeros(1, 2, 16, 16)
    wh = torch.full((1, 2, 16, 16), 100.0)  # only the centre cell may count
    offset = torch.full((1, 2, 16, 16), 100.0)
    wh[0, :, 8, 8] = torch.tensor([7.0, 10.0])  # targets (7.5, 8)
    offset[0, :, 8, 8] = torch.tensor([0.25, 0.25])  # targets (0, 0.5)
    losses = head.losses(heat, wh, offset, [gt((64, 64), [[17, 18, 47, 50]], [1])])
    assert losses["loss_wh"].item() == pytest.approx(0.1 * expected_wh)
    expected_offset = {"l1": 0.25, "smooth_l1": 0.5 * 0.25**2}[kind]
    assert losses["loss_offset"].item() == pytest.approx(expected_offset)


def test_max_objects_keeps_the_first_instances_of_each_image():
    head = make_head(max_objects=1)
    instances = [
        gt((64, 64), [[0, 0, 16, 16], [32, 32, 48, 48]], [0, 0]),
        gt((64, 64), [[32, 0, 48, 16]], [1]),
    ]
    targets = head.encode(instances, (2, 2, 16, 16))
    assert targets.index.tolist() == [2 * 16 + 2, 256 + 2 * 16 + 10]
    assert targets.heatmap[0, 0, 10, 10] == 0


def test_images_without_instances_give_finite_losses_in_the_graph():
    head = make_head().train()
    features = {"dec4": torch.randn(2, 8, 16, 16)}
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (60, 50)])
    _, losses = head(images, features, [gt((64, 64), [], []), gt((60, 50), [], [])])
    assert set(losses) == {"loss_heatmap", "loss_wh", "loss_offset"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert losses["loss_wh"].item() == 0 and losses["loss_offset"].item() == 0
    sum(losses.values()).backward()
    assert head.wh_head[0].weight.grad is not None


def test_decoding_constructed_maps_gives_exactly_the_constructed_boxes():
    head = make_head(score_thresh=0.3)
    heat = torch.full((2, 2, 16, 16), -10.0)
    wh = torch.zeros(2, 2, 16, 16)
    offset = torch.zeros(2, 2, 16, 16)
    heat[0, 0, 2, 3] = 2.0  # class 0 at cell (x=3, y=2)
    heat[0, 0, 2, 4] = 1.5  # not a peak: its neighbour is higher
    heat[0, 1, 7, 10] = 1.0  # class 1 at cell (10, 7)
    heat[0, 1, 12, 12] = -1.0  # a peak below the threshold (0.27)
    wh[0, :, 2, 3] = torch.tensor([4.0, 6.0])
    offset[0, :, 2, 3] = torch.tensor([0.25, 0.5])
    wh[0, :, 7, 10] = torch.tensor([2.5, 3.0])
    offset[0, :, 7, 10] = torch.tensor([0.5, 0.0])
    heat[1, 0, 5, 5] = 3.0  # second image: a box crossing its right border (width 20)
    wh[1, :, 5, 5] = torch.tensor([2.0, 2.0])

    proposals = head.decode(heat, wh, offset, [(64, 64), (40, 20)])
    first, second = proposals
    # centre (3.25, 2.5) +/- (2, 3) cells -> (5, -2, 21, 22) px, clipped at y = 0;
    # centre (10.5, 7) +/- (1.25, 1.5) -> (37, 22, 47, 34).
    assert first.image_size == (64, 64)
    assert first.proposal_boxes.tensor.tolist() == [[5, 0, 21, 22], [37, 22, 47, 34]]
    assert first.objectness_logits.tolist() == [2.0, 1.0]
    assert first.pred_classes.tolist() == [0, 1]
    assert second.proposal_boxes.tensor.tolist() == [[16, 16, 20, 24]]


@pytest.mark.parametrize("center_point", ["box", "interior"])
@pytest.mark.parametrize("log_wh", [False, True])
def test_encoding_then_decoding_recovers_the_boxes(log_wh, center_point):
    """The regression targets the losses read (the sizes, or their logs), written into the maps at
    the centres, decode to the ground-truth boxes."""
    head = make_head(stride=4, log_wh=log_wh, center_point=center_point)
    instances = [
        gt((128, 128), [[10, 20, 50, 41], [64.5, 3, 90, 30.5], [100, 100, 127, 128]], [0, 1, 0]),
        gt((128, 96), [[0, 0, 7, 9], [33, 47, 95, 120]], [1, 1]),
    ]
    # Keypoints off the box centres, one on a box corner pixel.
    instances[0].gt_interior_points = torch.tensor([[12.5, 39.5], [80.0, 10.0], [120.5, 101.5]])
    instances[1].gt_interior_points = torch.tensor([[0.5, 0.5], [40.5, 100.5]])
    shape = (2, 2, 32, 32)
    targets = head.encode(instances, shape)
    heat_logits = torch.logit(targets.heatmap.clamp(1e-4, 1 - 1e-4))
    maps = []
    for values in (head.wh_target(targets.sizes), targets.offset):
        dense = torch.zeros(2 * 32 * 32, values.shape[1])
        dense[targets.index] = values
        maps.append(dense.view(2, 32, 32, -1).permute(0, 3, 1, 2))
    proposals = head.decode(heat_logits, *maps, [inst.image_size for inst in instances])
    for inst, proposal in zip(instances, proposals):
        order = proposal.proposal_boxes.tensor[:, 0].argsort()
        torch.testing.assert_close(
            proposal.proposal_boxes.tensor[order], inst.gt_boxes.tensor, rtol=0, atol=1e-4
        )
        assert torch.equal(proposal.pred_classes[order], inst.gt_classes)


@pytest.mark.parametrize("center_point", ["box", "interior"])
@pytest.mark.parametrize("log_wh", [False, True])
def test_a_fresh_size_head_starts_at_the_size_prior(log_wh, center_point):
    """Before training (the size head's weights left out), every detection is a box of the prior
    diameter around its keypoint; without a prior, a point."""
    features = torch.randn(1, 8, 16, 16)
    heat = torch.full((1, 2, 16, 16), -10.0)
    heat[0, 0, 8, 6] = 2.0  # one centre at cell (6, 8): input pixel (24, 32)
    for prior, expected in ((36.0, [6.0, 14.0, 42.0, 50.0]), (0.0, [24.0, 32.0, 24.0, 32.0])):
        head = make_head(log_wh=log_wh, center_point=center_point, size_prior=prior)
        with torch.no_grad():
            head.wh_head[-1].weight.zero_()
            wh = head.wh_head(features)
        offset = torch.zeros(1, 2, 16, 16)
        (proposal,) = head.decode(heat, wh, offset, [(64, 64)])
        if log_wh and prior == 0:  # exp(0): a width of one cell, or one cell to each side
            expected = [22.0, 30.0, 26.0, 34.0] if center_point == "box" else [20, 28, 28, 36.0]
        torch.testing.assert_close(proposal.proposal_boxes.tensor, torch.tensor([expected]))


def test_built_from_config_with_the_authors_layers():
    cfg = get_cfg()
    add_objguided_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    head = CenterKeypointProposalGenerator(cfg, {"dec4": ShapeSpec(channels=16, stride=4)})
    assert head.heatmap_head[-1].out_channels == 3
    assert torch.allclose(head.heatmap_head[-1].bias, torch.tensor(-2.19))
    assert head.wh_head[0].kernel_size == (7, 7) and head.wh_head[-1].kernel_size == (7, 7)
    assert head.offset_head[-1].kernel_size == (1, 1)
    assert head.loss_weights == {"loss_heatmap": 1.0, "loss_wh": 0.1, "loss_offset": 1.0}
    assert (head.topk, head.score_thresh, head.max_objects) == (500, 0.3, 500)

    # The authors' head on 256 channels with one class: 3x3/1x1, 7x7/7x7 and 3x3/1x1 convs.
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    head = CenterKeypointProposalGenerator(cfg, {"dec4": ShapeSpec(channels=256, stride=4)})
    expected = (
        (256 * 256 * 9 + 256 + 256 + 1)
        + (256 * 256 * 49 + 256 + 256 * 2 * 49 + 2)
        + (256 * 256 * 9 + 256 + 256 * 2 + 2)
    )
    assert sum(p.numel() for p in head.parameters()) == expected == 4_417_541

    with pytest.raises(ValueError, match="regression_loss"):
        make_head(regression_loss="l2")


def test_training_step_reaches_every_parameter():
    cfg = get_cfg()
    add_objguided_config(cfg)
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.OBJGUIDED.HEAD_CHANNELS = 16
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    backbone = build_objguided_resnet_backbone(cfg, ShapeSpec(channels=3)).train()
    head = CenterKeypointProposalGenerator(cfg, backbone.output_shape()).train()
    images = ImageList(torch.randn(2, 3, 64, 64), [(64, 64), (64, 48)])
    instances = [gt((64, 64), [[4, 4, 30, 28], [36, 40, 60, 62]], [0, 0]), gt((64, 48), [], [])]

    proposals, losses = head(images, backbone(images.tensor), instances)
    sum(losses.values()).backward()
    for module in (backbone, head):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if p.dim() > 1:
                assert p.grad.abs().sum() > 0, name
    assert len(proposals) == 2 and not proposals[0].objectness_logits.requires_grad
    assert proposals[1].image_size == (64, 48)

    head.eval()
    with torch.no_grad():
        _, eval_losses = head(images, backbone.eval()(images.tensor))
    assert eval_losses == {}
