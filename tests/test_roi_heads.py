"""Object-guided ROI heads: the batched path equals the one-ROI-at-a-time reference (logits,
losses, gradients, predictions), loss definitions, degenerate batches, and the inference
bookkeeping (per-image grouping, scaling, mask NMS, cap)."""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks

from objguided_d2.modeling import roi_heads as roi_heads_module
from objguided_d2.modeling.fusion import FUSED_RESIZE_CONV_MIN_CHANNELS
from objguided_d2.modeling.mask_quality import MaskIoUHead, max_mask_ious
from objguided_d2.modeling.mask_windows import MaskWindows
from objguided_d2.modeling.point_sampling import point_counts, select_uncertain_points
from objguided_d2.modeling.roi_crops import crop_masks, crop_rois
from objguided_d2.modeling.roi_heads import FlippedBatch, GroupOutput, ObjGuidedROIHeads
from objguided_d2.modeling.tiling import Placement

pytestmark = pytest.mark.usefixtures("single_thread")

# S3 reads dec16 with its upsampling and conv fused, the other S modules separately.
CHANNELS = {"stem": 6, "dec4": 5, "dec8": 7, "dec16": FUSED_RESIZE_CONV_MIN_CHANNELS}
STRIDES = {"stem": 2, "dec4": 4, "dec8": 8, "dec16": 16}
IMAGE_SIZES = [(96, 128), (80, 112)]

# (image, XYXY box, levels): 1..5 levels, shapes of very different aspect, ROIs of different
# sizes that share a group (so groups are padded), a box leaving the image, a skipped box.
ROIS = [
    (0, (10.0, 12.0, 13.0, 15.0), 1),
    (1, (40.2, 7.5, 43.0, 10.1), 1),
    (0, (50.0, 50.0, 55.0, 54.5), 2),
    (1, (3.0, 60.0, 13.0, 70.0), 3),
    (0, (70.0, 5.0, 90.0, 25.0), 4),
    (0, (20.0, 30.0, 80.0, 50.0), 4),
    (1, (30.0, 20.0, 66.0, 60.0), 5),
    (1, (33.5, 22.0, 73.0, 66.0), 5),
    (0, (90.0, 40.0, 135.0, 101.0), 5),
    (0, (5.0, 60.0, 6.0, 61.0), 0),
    (0, (60.0, 70.0, 61.9, 95.0), 1),
]


def head_args(**kwargs) -> dict:
    """Constructor arguments of heads on the CHANNELS / STRIDES maps of an unnormalized image."""
    args = dict(
        in_features=list(CHANNELS),
        in_channels=list(CHANNELS.values()),
        in_strides=list(STRIDES.values()),
        pixel_mean=[0.0] * 3,
        pixel_std=[1.0] * 3,
    )
    return {**args, **kwargs}


def make_heads(**kwargs) -> ObjGuidedROIHeads:
    heads = ObjGuidedROIHeads(
        **head_args(**{"image_conv_channels": 4, "instance_norm_affine": True, **kwargs})
    )
    with torch.no_grad():  # non-trivial affine parameters, so the masked norm must apply them
        for fusion in heads.fusions:
            for norm in (fusion.norm_low, fusion.norm_fuse):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
    return heads


def make_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    padded = (96, 128)
    images = ImageList(torch.randn(2, 3, *padded, generator=generator), IMAGE_SIZES)
    features = {
        name: torch.randn(2, CHANNELS[name], padded[0] // s, padded[1] // s, generator=generator)
        for name, s in STRIDES.items()
    }
    return images, features


def roi_boxes(image_index: int) -> torch.Tensor:
    return torch.tensor([box for i, box, _ in ROIS if i == image_index]).reshape(-1, 4)


def points_in(boxes: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(N, 2) random (x, y) points inside (N, 4) XYXY boxes."""
    where = torch.rand(len(boxes), 2, generator=torch.Generator().manual_seed(seed))
    return boxes[:, :2] + where * (boxes[:, 2:] - boxes[:, :2])


def proposals_of_rois():
    """Proposals of ROIS, with keypoints inside their boxes (read with keypoint guidance)."""
    proposals = []
    for image_index, image_size in enumerate(IMAGE_SIZES):
        boxes = roi_boxes(image_index)
        instances = Instances(image_size)
        instances.proposal_boxes = Boxes(boxes)
        instances.objectness_logits = torch.linspace(2.0, -1.0, len(boxes))
        instances.pred_classes = torch.zeros(len(boxes), dtype=torch.int64)
        instances.proposal_keypoints = points_in(boxes, seed=image_index)
        proposals.append(instances)
    return proposals


def targets_of_rois(seed: int = 0):
    """GT boxes of ROIS with random blob masks at each image's size and keypoints inside the
    boxes (``gt_interior_points``, read with keypoint guidance)."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for image_index, image_size in enumerate(IMAGE_SIZES):
        boxes = roi_boxes(image_index)
        noise = torch.rand(
            len(boxes), 1, image_size[0] // 4, image_size[1] // 4, generator=generator
        )
        blobs = F.interpolate(noise, size=image_size, mode="bilinear")[:, 0] > 0.5
        instances = Instances(image_size)
        instances.gt_boxes = Boxes(boxes)
        instances.gt_masks = BitMasks(blobs)
        instances.gt_interior_points = points_in(boxes, seed=seed + image_index)
        targets.append(instances)
    return targets


def all_rois():
    boxes = torch.cat([roi_boxes(0), roi_boxes(1)])
    batch_index = torch.tensor([0] * len(roi_boxes(0)) + [1] * len(roi_boxes(1)))
    return boxes, batch_index


def per_roi_logits(heads, images, features, batch_rois: bool, keypoints=None):
    """{ROI index: (h, w) level-0 logits} of the ROIs ordered as :func:`all_rois`; default
    keypoints: random points inside the boxes."""
    heads.batch_rois = batch_rois
    boxes, batch_index = all_rois()
    if keypoints is None:
        keypoints = points_in(boxes)
    pyramid = heads.build_pyramid(boxes)
    groups = heads.group(pyramid)
    level_maps = heads.level_maps(images, features)
    outputs = heads.segment(level_maps, batch_index, pyramid, groups, keypoints)
    logits = {}
    for group, out in zip(groups, outputs):
        for row, index in enumerate(group.indices.tolist()):
            h, w = pyramid.level_hw[index, 0].tolist()
            logits[index] = out.logits[row, 0, :h, :w]
    return logits, groups, pyramid


def test_rois_cover_every_level_count():
    heads = make_heads()
    pyramid = heads.build_pyramid(all_rois()[0])
    expected = [levels for i in (0, 1) for image, _, levels in ROIS if image == i]
    assert pyramid.num_levels.tolist() == expected


def test_test_time_enlargement_widens_inference_rois_only():
    boxes = all_rois()[0]
    heads = make_heads(box_enlarge=1.1, box_enlarge_test=1.5)
    train_sizes = heads.build_pyramid(boxes).sizes
    heads.eval()
    test_sizes = heads.build_pyramid(boxes).sizes
    box_sizes = (boxes[:, 2:] - boxes[:, :2]).double()
    torch.testing.assert_close(train_sizes, 1.1 * box_sizes)
    torch.testing.assert_close(test_sizes, 1.5 * box_sizes)
    assert (
        make_heads(box_enlarge=1.3)
        .eval()
        .build_pyramid(boxes)
        .sizes.equal(make_heads(box_enlarge=1.3).build_pyramid(boxes).sizes)
    )


# keypoint guidance off (paper) and on
GUIDANCE = pytest.mark.parametrize("guidance_sigma", [0.0, 0.15], ids=["paper", "keypoint-guided"])


@GUIDANCE
def test_batched_forward_equals_one_roi_at_a_time(guidance_sigma):
    torch.manual_seed(0)
    heads = make_heads(keypoint_guidance_sigma=guidance_sigma).eval()
    images, features = make_inputs()
    with torch.no_grad():
        batched, groups, pyramid = per_roi_logits(heads, images, features, batch_rois=True)
        reference, _, _ = per_roi_logits(heads, images, features, batch_rois=False)
    # The batched run really pads: some group mixes ROIs of different sizes.
    sizes_per_group = [set(map(tuple, pyramid.level_hw[g.indices, 0].tolist())) for g in groups]
    assert any(len(sizes) > 1 for sizes in sizes_per_group)
    kept = [i for i in range(len(pyramid)) if pyramid.num_levels[i] > 0]
    assert sorted(batched) == sorted(reference) == kept
    for index in kept:
        torch.testing.assert_close(batched[index], reference[index], atol=1e-5, rtol=1e-5)


def test_one_roi_reference_is_the_plain_module_computation():
    """The reference path equals cropping one ROI with the batched path's gathers and running
    the S modules and the seg head's convs on it, unpadded."""
    torch.manual_seed(0)
    heads = make_heads().eval()
    images, features = make_inputs()
    boxes, batch_index = all_rois()
    with torch.no_grad():
        reference, _, pyramid = per_roi_logits(heads, images, features, batch_rois=False)
        level_maps = [heads.level0_map(images)] + [features[f] for f in CHANNELS]
        for index in range(len(boxes)):
            num_levels = int(pyramid.num_levels[index])
            if num_levels == 0:
                continue
            one = pyramid[torch.tensor([index])]
            crops = [
                crop_rois(
                    level_maps[level], batch_index[[index]], one, level, one.level_hw[0, level]
                )[0]
                for level in range(num_levels)
            ]
            x = crops[-1]
            for level in reversed(range(num_levels - 1)):
                x = heads.fusions[level](x, crops[level])
            logits = heads.seg_predictor(F.relu(heads.seg_conv(x)))
            torch.testing.assert_close(logits[0, 0], reference[index], atol=1e-5, rtol=1e-5)


def fixed_candidate_points(probs, valid_hw, density, oversample_ratio, importance_ratio, mode):
    """sample_uncertain_points with the same candidate table for every ROI, so that an ROI's
    points do not depend on the group it runs in."""
    num_points = point_counts(valid_hw, density, importance_ratio)
    num_candidates = point_counts(valid_hw, density, oversample_ratio)
    table = torch.rand(4096, 2, generator=torch.Generator().manual_seed(0))
    assert int(num_candidates.max()) <= len(table)
    candidates = table[: int(num_candidates.max())].expand(len(valid_hw), -1, -1)
    return select_uncertain_points(probs, valid_hw, candidates, num_candidates, num_points)


@GUIDANCE
def test_batched_losses_and_gradients_equal_one_roi_at_a_time(monkeypatch, guidance_sigma):
    monkeypatch.setattr(roi_heads_module, "sample_uncertain_points", fixed_candidate_points)
    torch.manual_seed(0)
    heads = make_heads(keypoint_guidance_sigma=guidance_sigma).train()
    images, features = make_inputs()
    features = {name: f.requires_grad_() for name, f in features.items()}
    targets = targets_of_rois()
    results = []
    for batch_rois in (True, False):
        heads.batch_rois = batch_rois
        heads.zero_grad()
        _, losses = heads(images, features, [], targets)
        total = losses["loss_mask"] + losses["loss_refine"]
        feature_grads = torch.autograd.grad(total, list(features.values()), retain_graph=True)
        total.backward()
        param_grads = [p.grad.clone() for p in heads.parameters()]
        results.append(({k: v.detach() for k, v in losses.items()}, feature_grads, param_grads))
    (loss_b, feat_b, param_b), (loss_r, feat_r, param_r) = results
    assert loss_b["loss_refine"] > 0
    for name in ("loss_mask", "loss_refine"):
        torch.testing.assert_close(loss_b[name], loss_r[name], atol=1e-5, rtol=1e-5)
    for batched, reference in zip(feat_b + tuple(param_b), feat_r + tuple(param_r)):
        torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-4)


@GUIDANCE
def test_batched_predictions_equal_one_roi_at_a_time(guidance_sigma):
    torch.manual_seed(0)
    heads = make_heads(keypoint_guidance_sigma=guidance_sigma).eval()
    images, features = make_inputs()
    results = []
    with torch.no_grad():
        for batch_rois in (True, False):
            heads.batch_rois = batch_rois
            results.append(heads(images, features, proposals_of_rois())[0])
    for batched, reference in zip(*results):
        assert len(batched) > 0
        torch.testing.assert_close(batched.scores, reference.scores)
        torch.testing.assert_close(batched.pred_boxes.tensor, reference.pred_boxes.tensor)
        assert torch.equal(batched.pred_masks.to_masks(), reference.pred_masks.to_masks())


def test_inference_segmenting_few_pixels_at_a_time_gives_the_same_predictions():
    """Inference segments groups a bounded number of level-0 pixels at a time (memory); a bound
    that takes one ROI at a time changes nothing."""
    torch.manual_seed(0)
    heads = make_heads().eval()
    images, features = make_inputs()
    results = []
    with torch.no_grad():
        for max_inference_pixels in (1 << 17, 1):
            heads.max_inference_pixels = max_inference_pixels
            results.append(heads(images, features, proposals_of_rois())[0])
    for whole, chunked in zip(*results):
        assert len(whole) > 0
        torch.testing.assert_close(chunked.scores, whole.scores)
        assert torch.equal(chunked.pred_masks.to_masks(), whole.pred_masks.to_masks())


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def full_and_empty_rois_target() -> Instances:
    """Three ground-truth ROIs of image 0, of different sizes: A's mask fills the image (its
    soft ROI target is all ones), B's and C's are empty (all zeros)."""
    target = Instances(IMAGE_SIZES[0])
    target.gt_boxes = Boxes(
        torch.tensor([[20.0, 20.0, 60.0, 50.0], [70, 10, 80, 30], [5, 70, 25, 76]])
    )
    masks = torch.zeros(3, *IMAGE_SIZES[0], dtype=torch.bool)
    masks[0] = True
    target.gt_masks = BitMasks(masks)
    return target


def test_losses_average_per_roi_with_their_weights():
    """Constant predictions c (mask) and b (points) against ROIs whose soft GT is all ones (A) or
    all zeros (B, C, of other sizes): per-ROI means give mean(sp(-c), sp(c), sp(c)), whatever
    the areas; every ROI has 2+ levels, so each contributes one mean per point head."""
    c, b = 0.7, -0.4
    heads = make_heads(mask_loss_weight=2.0, refine_loss_weight=3.0).train()
    with torch.no_grad():
        heads.seg_predictor.weight.zero_()
        heads.seg_predictor.bias.fill_(c)
        for head in (heads.point_head0, heads.point_head1):
            head.weight.zero_()
            head.bias.fill_(b)
    images, features = make_inputs()
    target = full_and_empty_rois_target()
    empty = Instances(IMAGE_SIZES[1])
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_masks = BitMasks(torch.zeros(0, *IMAGE_SIZES[1], dtype=torch.bool))

    _, losses = heads(images, features, [], [target, empty])

    assert losses["loss_mask"].item() == pytest.approx(2.0 * (softplus(-c) + 2 * softplus(c)) / 3)
    assert losses["loss_refine"].item() == pytest.approx(3.0 * (softplus(-b) + 2 * softplus(b)) / 3)


def test_soft_dice_loss_ignores_invalid_pixels_and_counts_thin_objects_fully():
    """0 for a confident exact prediction, 1 - 1 / (F + 1) for an all-background prediction of F
    foreground pixels, whatever lies outside the valid region; a 1-px line missed in a large
    box costs about as much as a missed blob (BCE's mean would be tiny)."""
    gt = torch.zeros(2, 1, 40, 40)
    gt[0, 0, 10:20, 10:20] = 1  # a blob of 100 px
    gt[1, 0, 20, 5:35] = 1  # a 1-px line of 30 px
    valid = torch.zeros(2, 1, 40, 40)
    valid[..., :30, :] = 1
    gt[..., 30:, :] = 1  # outside the valid region: ignored
    exact = torch.where(gt > 0, 30.0, -30.0)
    assert roi_heads_module.soft_dice_loss(exact, gt, valid) == pytest.approx([0, 0], abs=1e-6)
    missed = torch.full_like(gt, -30.0)
    missed[..., 30:, :] = 30.0  # confident outside the valid region: ignored
    losses = roi_heads_module.soft_dice_loss(missed, gt, valid)
    assert losses.tolist() == pytest.approx([1 - 1 / 101, 1 - 1 / 31], abs=1e-6)


def test_dice_weight_adds_the_weighted_mean_soft_dice_to_the_mask_loss():
    """All-background predictions (logit -30) of ROI A (soft GT all ones) and B, C (all zeros):
    Dice losses about 1, 0, 0, so the mask loss grows by weight * dice_weight / 3."""
    images, features = make_inputs()
    target = full_and_empty_rois_target()
    mask_losses = []
    for dice_weight in (0.0, 1.5):
        torch.manual_seed(0)
        heads = make_heads(mask_loss_weight=2.0, mask_dice_weight=dice_weight).train()
        with torch.no_grad():
            heads.seg_predictor.weight.zero_()
            heads.seg_predictor.bias.fill_(-30.0)
        _, losses = heads(images, features, [], [target])
        mask_losses.append(losses["loss_mask"].item())
    assert mask_losses[1] - mask_losses[0] == pytest.approx(2.0 * 1.5 / 3, rel=1e-2)


def empty_target(image_size):
    target = Instances(image_size)
    target.gt_boxes = Boxes(torch.zeros(0, 4))
    target.gt_masks = BitMasks(torch.zeros(0, *image_size, dtype=torch.bool))
    return target


@pytest.mark.parametrize(
    "boxes, mask_loss_is_zero",
    [
        ([], True),  # no instance at all
        ([[30.0, 30.0, 31.0, 31.5]], True),  # one ROI, skipped (level 0 below 2 px)
        ([[30.0, 30.0, 33.0, 33.0], [50, 50, 52.5, 53]], False),  # 1-level ROIs: no S module
    ],
    ids=["no-gt", "skipped-roi", "one-level-rois"],
)
def test_degenerate_batches_give_finite_losses_and_grads_for_every_parameter(
    boxes, mask_loss_is_zero
):
    heads = make_heads().train()
    images, features = make_inputs()
    target = Instances(IMAGE_SIZES[0])
    target.gt_boxes = Boxes(torch.tensor(boxes).reshape(-1, 4))
    target.gt_masks = BitMasks(torch.ones(len(boxes), *IMAGE_SIZES[0], dtype=torch.bool))

    _, losses = heads(images, features, [], [target, empty_target(IMAGE_SIZES[1])])

    assert set(losses) == {"loss_mask", "loss_refine"}
    assert (losses["loss_mask"].item() == 0) == mask_loss_is_zero
    assert losses["loss_refine"].item() == 0  # no ROI is large enough for a point
    sum(losses.values()).backward()
    for name, parameter in heads.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


def test_max_train_rois_per_image_caps_the_rois():
    heads = make_heads(max_train_rois_per_image=2, refine_enabled=False).train()
    targets = targets_of_rois()
    boxes, keypoints, batch_index, masks = heads._training_rois(targets, (96, 128))
    assert batch_index.tolist() == [0, 0, 1, 1]
    assert masks.shape == (4, 96, 128)
    for box, keypoint, image, mask in zip(boxes, keypoints, batch_index, masks):
        target = targets[image]
        match = (target.gt_boxes.tensor == box).all(dim=1).nonzero()[:, 0]
        assert len(match) == 1  # a GT box with its own keypoint and mask, padded
        assert torch.equal(keypoint, target.gt_interior_points[match[0]])
        h, w = target.image_size
        assert torch.equal(mask[:h, :w], target.gt_masks.tensor[match[0]])
        assert not mask[h:].any() and not mask[:, w:].any()


def test_training_rois_are_jittered_and_their_masks_kept():
    targets = targets_of_rois()
    exact = make_heads(refine_enabled=False).train()._training_rois(targets, (96, 128))
    torch.manual_seed(0)
    heads = make_heads(train_box_jitter=0.2, refine_enabled=False).train()
    boxes, keypoints, batch_index, masks = heads._training_rois(targets, (96, 128))
    assert torch.equal(keypoints, exact[1])  # the keypoints stay where the objects are
    assert torch.equal(batch_index, exact[2]) and torch.equal(masks, exact[3])
    sizes = exact[0][:, 2:] - exact[0][:, :2]
    scale = (boxes[:, 2:] - boxes[:, :2]) / sizes
    shift = ((boxes[:, :2] + boxes[:, 2:]) - (exact[0][:, :2] + exact[0][:, 2:])) / 2 / sizes
    assert not torch.equal(boxes, exact[0])
    assert ((scale - 1).abs() <= 0.2 + 1e-6).all() and (shift.abs() <= 0.1 + 1e-6).all()
    with pytest.raises(ValueError, match="train_box_jitter"):
        make_heads(train_box_jitter=1.0)


class OracleHeads(ObjGuidedROIHeads):
    """Heads whose mask logits are the soft crops of known masks (one per ROI)."""

    roi_masks: torch.Tensor  # (R, H, W) over the padded batch, ROI order of the proposals

    def level_maps(self, images, features):
        return []

    def segment(self, level_maps, batch_index, pyramid, groups, keypoints=None):
        outputs = []
        for group in groups:
            soft = crop_masks(
                self.roi_masks, pyramid[group.indices], group.pad_hw[0], group.indices
            )
            hw = pyramid.level_hw[group.indices]
            outputs.append(GroupOutput(logits=40 * (soft - 0.5), e1=soft, e2=None, valid_hw=hw))
        return outputs


def disc(image_size, center, radius):
    ys, xs = torch.meshgrid(
        torch.arange(image_size[0]) + 0.5, torch.arange(image_size[1]) + 0.5, indexing="ij"
    )
    return (xs - center[0]) ** 2 + (ys - center[1]) ** 2 <= radius**2


def rectangle(image_size, x1, y1, x2, y2):
    mask = torch.zeros(image_size, dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    return mask


def iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


@pytest.mark.parametrize("batch_rois", [True, False])
def test_inference_pastes_each_proposal_mask_into_its_image(batch_rois):
    """Masks follow their own proposal (score, box, class) through grouping, pasting at a
    different output size per axis, mask NMS (a duplicate and an empty mask go) and the cap."""
    sizes = [(64, 80), (48, 48)]
    outputs_hw = [(128, 120), (48, 48)]
    objects = [  # image, mask, proposal box, score logit, class
        (0, rectangle(sizes[0], 10, 10, 30, 26), [10, 10, 30, 26], 3.0, 0),
        (0, disc(sizes[0], (50, 40), 10), [40, 30, 60, 50], 2.0, 1),
        (0, disc(sizes[0], (50, 40), 10), [41, 31, 61, 51], 1.0, 1),  # duplicate, suppressed
        (0, rectangle(sizes[0], 62, 4, 70, 12), [62, 4, 70, 12], 0.5, 0),
        (0, torch.zeros(sizes[0], dtype=torch.bool), [5, 40, 25, 60], 2.5, 0),  # empty mask
        (1, rectangle(sizes[1], 5, 5, 40, 20), [5, 5, 40, 20], -1.0, 1),
        (1, disc(sizes[1], (20, 35), 8), [12, 27, 28, 43], 0.0, 0),
    ]
    proposals, roi_masks = [], []
    for image_index, image_size in enumerate(sizes):
        mine = [o for o in objects if o[0] == image_index]
        instances = Instances(image_size)
        instances.proposal_boxes = Boxes(torch.tensor([o[2] for o in mine], dtype=torch.float32))
        instances.objectness_logits = torch.tensor([o[3] for o in mine])
        instances.pred_classes = torch.tensor([o[4] for o in mine])
        proposals.append(instances)
        roi_masks += [F.pad(o[1], (0, 96 - image_size[1], 0, 64 - image_size[0])) for o in mine]
    heads = OracleHeads(
        **head_args(mask_thresh_test=0.5, detections_per_image=3, batch_rois=batch_rois)
    ).eval()
    heads.roi_masks = torch.stack(roi_masks)
    images = ImageList(torch.zeros(2, 3, 64, 96), sizes)

    results, losses = heads(images, {}, proposals, output_sizes=outputs_hw)

    assert losses == {}
    first, second = results
    assert first.image_size == (128, 120) and second.image_size == (48, 48)
    # image 0: by score the rectangle, the disc, the small rectangle (empty and duplicate gone)
    torch.testing.assert_close(first.scores, torch.sigmoid(torch.tensor([3.0, 2.0, 0.5])))
    assert first.pred_classes.tolist() == [0, 1, 0]
    scale = torch.tensor([120 / 80, 128 / 64] * 2)
    expected_boxes = torch.tensor([[10, 10, 30, 26], [40, 30, 60, 50], [62, 4, 70, 12]]) * scale
    torch.testing.assert_close(first.pred_boxes.tensor, expected_boxes)
    assert isinstance(first.pred_masks, MaskWindows) and first.pred_masks.shape == (3, 128, 120)
    for mask, (_, gt, *_) in zip(first.pred_masks, [objects[0], objects[1], objects[3]]):
        upsampled = F.interpolate(gt[None, None].float(), size=(128, 120))[0, 0].bool()
        assert iou(mask, upsampled) > 0.85
    # image 1: the cap of 3 keeps both, by score
    torch.testing.assert_close(second.scores, torch.sigmoid(torch.tensor([0.0, -1.0])))
    for mask, (_, gt, *_) in zip(second.pred_masks, [objects[6], objects[5]]):
        assert iou(mask, gt) > 0.85


def test_box_refinement_segments_again_from_the_tight_boxes_of_the_masks():
    """With one refinement step, each box is the tight box of the mask segmented from the
    detector's box (at the network input), and the masks are segmented from it: an oversized box
    shrinks to its object."""
    size = (64, 96)
    objects = [  # mask, proposal box
        (rectangle(size, 8, 8, 32, 32), [4.0, 4.0, 40.0, 40.0]),  # box 1.5x too large
        (disc(size, (60, 40), 10), [54.0, 32.0, 68.0, 46.0]),  # too small and off-centre
    ]
    proposals = Instances(size)
    proposals.proposal_boxes = Boxes(torch.tensor([box for _, box in objects]))
    proposals.objectness_logits = torch.tensor([2.0, 1.0])
    proposals.pred_classes = torch.zeros(2, dtype=torch.int64)
    images = ImageList(torch.zeros(1, 3, *size), [size])
    results = {}
    for steps in (0, 1):
        heads = OracleHeads(**head_args(mask_thresh_test=0.5, box_refine_steps=steps)).eval()
        heads.roi_masks = torch.stack([mask for mask, _ in objects])
        (results[steps],), _ = heads(images, {}, [proposals])
    detector, refined = results[0], results[1]
    torch.testing.assert_close(detector.pred_boxes.tensor, proposals.proposal_boxes.tensor)
    torch.testing.assert_close(refined.pred_boxes.tensor, detector.pred_masks.boxes)
    torch.testing.assert_close(
        refined.pred_boxes.tensor[0], torch.tensor([8.0, 8.0, 32.0, 32.0]), atol=1, rtol=0
    )
    assert iou(refined.pred_masks.to_masks()[0], objects[0][0]) > 0.95


def test_refinement_passes_with_a_wider_roi_reach_past_a_box_that_is_too_small():
    size = (64, 96)
    square = rectangle(size, 8, 8, 40, 40)
    proposals = Instances(size)
    proposals.proposal_boxes = Boxes(torch.tensor([[16.0, 16.0, 32.0, 32.0]]))  # half its side
    proposals.objectness_logits = torch.tensor([2.0])
    proposals.pred_classes = torch.zeros(1, dtype=torch.int64)
    images = ImageList(torch.zeros(1, 3, *size), [size])
    boxes = {}
    for refine_enlarge in (None, 2.5):
        heads = OracleHeads(
            **head_args(mask_thresh_test=0.5, box_refine_steps=1, box_refine_enlarge=refine_enlarge)
        ).eval()
        heads.roi_masks = square[None]
        (result,), _ = heads(images, {}, [proposals])
        boxes[refine_enlarge] = result.pred_boxes.tensor[0]
    # the test ROI (1.1x) ends inside the square; 2.5x holds all of it
    assert (boxes[None][2:] - boxes[None][:2] <= 24).all()
    torch.testing.assert_close(boxes[2.5], torch.tensor([8.0, 8.0, 40.0, 40.0]), atol=1, rtol=0)


class SoftOracleHeads(OracleHeads):
    """Oracle heads whose ROI probabilities are the crops of known soft masks."""

    def segment(self, level_maps, batch_index, pyramid, groups, keypoints=None):
        return [
            out._replace(logits=torch.logit(out.e1.clamp(1e-6, 1 - 1e-6)))
            for out in super().segment(level_maps, batch_index, pyramid, groups, keypoints)
        ]


@pytest.mark.parametrize(
    "mask_confidence_score, mask_confidence_power", [(False, 1.0), (True, 1.0), (True, 3.0)]
)
def test_mask_confidence_scales_the_scores_and_reorders_the_detections(
    mask_confidence_score, mask_confidence_power
):
    """With the option, a detection scores its keypoint score times its mask's mean probability
    over the pixels it segments, to the given power: a confident mask of a lower keypoint score
    ranks first."""
    size = (64, 96)
    objects = [  # mask probability inside the object, proposal box, score logit
        (0.6, [8.0, 8.0, 32.0, 32.0], 2.0),
        (0.95, [50.0, 20.0, 74.0, 44.0], 1.0),
    ]
    proposals = Instances(size)
    proposals.proposal_boxes = Boxes(torch.tensor([box for _, box, _ in objects]))
    proposals.objectness_logits = torch.tensor([logit for *_, logit in objects])
    proposals.pred_classes = torch.zeros(2, dtype=torch.int64)
    heads = SoftOracleHeads(
        **head_args(
            mask_thresh_test=0.5,
            mask_confidence_score=mask_confidence_score,
            mask_confidence_power=mask_confidence_power,
        )
    ).eval()
    heads.roi_masks = torch.stack(
        [p * rectangle(size, *[int(v) for v in box]).float() for p, box, _ in objects]
    )
    images = ImageList(torch.zeros(1, 3, *size), [size])

    (result,), _ = heads(images, {}, [proposals])

    keypoint_scores = torch.sigmoid(torch.tensor([logit for *_, logit in objects]))
    if mask_confidence_score:
        confidences = torch.tensor([p for p, *_ in objects])
        # power 1: 0.69 before 0.53; power 3: 0.63 before 0.19
        expected = (keypoint_scores * confidences**mask_confidence_power)[[1, 0]]
        boxes = [objects[1][1], objects[0][1]]
        torch.testing.assert_close(result.scores, expected, atol=0.01, rtol=0)
    else:
        boxes = [objects[0][1], objects[1][1]]
        torch.testing.assert_close(result.scores, keypoint_scores)
    torch.testing.assert_close(result.pred_boxes.tensor, torch.tensor(boxes))


@pytest.mark.parametrize("agreement_power", [0.0, 1.0, 2.0])
def test_flip_agreement_scales_the_scores_by_the_views_mask_iou(agreement_power):
    """With a flipped view, a detection's score is multiplied by the IoU of its mask in that view
    (flipped back) with its mask in the input, to the given power: here the left ROI's mirror
    image holds only half of its object (IoU 1/2), the right ROI's all of it (IoU 1); the third,
    on background, segments nothing in either view and is dropped. Without a flipped view the
    scores are the keypoint scores."""
    size, _, proposals, _ = two_rectangles_and_background()
    heads = OracleHeads(
        **head_args(
            mask_thresh_test=0.5,
            roi_pixel_grid=True,
            mask_flip_agreement_power=agreement_power,
        )
    ).eval()
    # what each ROI's mirrored ROI (x -> 96 - x) reads: half the object, or all of it
    heads.roi_masks = torch.stack(
        [
            rectangle(size, 8, 8, 32, 32) | rectangle(size, 64, 8, 76, 32),
            rectangle(size, 50, 20, 74, 44) | rectangle(size, 22, 20, 46, 44),
            torch.zeros(size, dtype=torch.bool),
        ]
    ).float()
    images = ImageList(torch.zeros(1, 3, *size), [size])
    flipped = [FlippedBatch((-1,), ImageList(images.tensor.flip(-1), [size]), {})]

    (result,), _ = heads(images, {}, [proposals], flipped=flipped)

    left_first = torch.argsort(result.pred_boxes.tensor[:, 0])
    keypoint_scores = proposals.objectness_logits[:2].sigmoid()
    expected = keypoint_scores * torch.tensor([0.5, 1.0]) ** agreement_power
    torch.testing.assert_close(result.scores[left_first], expected, atol=0.01, rtol=0)
    # without a flipped view there is no agreement to score
    (one_view,), _ = heads(images, {}, [proposals])
    torch.testing.assert_close(one_view.scores, keypoint_scores)


@pytest.mark.parametrize("mask_largest_component", [False, True])
def test_largest_component_drops_the_fragments_a_mask_has_beside_its_object(
    mask_largest_component,
):
    """A mask with a stray fragment on a neighbour keeps it (paper) or, with the option, loses it
    from its mask and its box; a mask of one piece is the same either way."""
    size = (64, 96)
    cell = rectangle(size, 10, 10, 30, 30)
    stray = rectangle(size, 34, 12, 38, 16)  # 4 px to the right of the cell, inside its ROI
    other = disc(size, (70, 40), 9)
    proposals = Instances(size)
    proposals.proposal_boxes = Boxes(
        torch.tensor([[8.0, 8.0, 40.0, 32.0], [58.0, 28.0, 82.0, 52.0]])
    )
    proposals.objectness_logits = torch.tensor([2.0, 1.0])
    proposals.pred_classes = torch.zeros(2, dtype=torch.int64)
    heads = OracleHeads(
        **head_args(mask_thresh_test=0.5, mask_largest_component=mask_largest_component)
    ).eval()
    heads.roi_masks = torch.stack([cell | stray, other])
    images = ImageList(torch.zeros(1, 3, *size), [size])

    (result,), _ = heads(images, {}, [proposals])

    masks = result.pred_masks.to_masks()
    expected = cell if mask_largest_component else cell | stray
    assert iou(masks[0], expected) > 0.9
    assert masks[0][stray].any() != mask_largest_component
    x2 = result.pred_masks.boxes[0, 2].item()
    assert (x2 <= 31) if mask_largest_component else (x2 >= 37)
    assert iou(masks[1], other) > 0.9


@pytest.mark.parametrize("box_refine_steps", [0, 1])
def test_a_tile_is_segmented_from_its_own_features_and_pasted_where_it_lies(box_refine_steps):
    """Predictions of inputs placed in larger images (tiles) are those of the inputs alone, moved
    by the placement: the ROIs crop the tile's features, their masks land in the larger image."""
    torch.manual_seed(0)
    heads = make_heads(box_refine_steps=box_refine_steps).eval()
    images, features = make_inputs()
    with torch.no_grad():
        alone, _ = heads(images, features, proposals_of_rois())
        origins = [(13, 7), (0, 21)]  # (y, x)
        larger = [(h + y + 5, w + x + 9) for (h, w), (y, x) in zip(IMAGE_SIZES, origins)]
        placements = [Placement(o, hw) for o, hw in zip(origins, larger)]
        placed, _ = heads(
            images, features, proposals_of_rois(), output_sizes=larger, placements=placements
        )
    for own, tile, (h, w), (y, x) in zip(alone, placed, IMAGE_SIZES, origins):
        assert len(own) > 0
        torch.testing.assert_close(tile.scores, own.scores)
        torch.testing.assert_close(
            tile.pred_boxes.tensor, own.pred_boxes.tensor + torch.tensor([x, y, x, y])
        )
        # (a mask may reach past the tile's border, which clips it alone)
        inside = tile.pred_masks.to_masks()[:, y : y + h, x : x + w]
        assert torch.equal(inside, own.pred_masks.to_masks())


def test_inference_without_proposals():
    heads = make_heads().eval()
    images, features = make_inputs()
    proposals = []
    for image_size in IMAGE_SIZES:
        instances = Instances(image_size)
        instances.proposal_boxes = Boxes(torch.zeros(0, 4))
        instances.objectness_logits = torch.zeros(0)
        instances.pred_classes = torch.zeros(0, dtype=torch.int64)
        proposals.append(instances)
    with torch.no_grad():
        results, _ = heads(images, features, proposals, output_sizes=[(10, 20), (30, 40)])
    assert [len(r) for r in results] == [0, 0]
    assert results[1].pred_masks.shape == (0, 30, 40)


def test_inference_without_autograd_returns_ordinary_tensors_equal_to_a_recorded_run():
    """Without autograd the branch runs in inference mode; what it returns are still ordinary
    tensors (callers may edit them in place) and equal what it gives with autograd on."""
    torch.manual_seed(0)
    heads = make_heads().eval()
    images, features = make_inputs()
    with torch.no_grad():
        results, _ = heads(images, features, proposals_of_rois())
    recorded, _ = heads(images, features, proposals_of_rois())
    for fast, slow in zip(results, recorded):
        assert len(fast) > 0
        masks, expected_masks = fast.pred_masks, slow.pred_masks
        fields = [(fast.pred_boxes.tensor, slow.pred_boxes.tensor)] + [
            (fast.get(name), slow.get(name)) for name in ("scores", "pred_classes")
        ]
        fields += [
            (getattr(masks, name), getattr(expected_masks, name))
            for name in ("pixels", "origins", "shapes", "boxes")
        ]
        for value, expected in fields:
            assert not value.is_inference()
            assert torch.equal(value, expected)
        fast.pred_boxes.scale(2.0, 2.0)
        masks.pixels[:1] = True
        fast.scores.clamp_(max=0.5)


def test_channels_follow_the_feature_maps():
    heads = make_heads(image_conv_channels=4)
    # S_i keeps level i's channels: levels are 4 (image conv), 6, 5, 7 and dec16's.
    expected = [(6, 4), (5, 6), (7, 5), (CHANNELS["dec16"], 7)]
    for fusion, (low, skip) in zip(heads.fusions, expected):
        assert fusion.conv_low.in_channels == low
        assert fusion.conv_fuse.out_channels == skip
    assert heads.point_head0.in_channels == 4
    assert heads.point_head1.in_channels == 4 + 6
    assert not hasattr(make_heads(refine_enabled=False), "point_head0")


def test_polygon_ground_truth_is_refused_with_the_config_key():
    heads = make_heads().train()
    images, features = make_inputs()
    target = Instances(IMAGE_SIZES[0])
    target.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 30.0, 30.0]]))
    target.gt_masks = PolygonMasks([[[10, 10, 30, 10, 30, 30.0]]])
    with pytest.raises(TypeError, match="INPUT.MASK_FORMAT 'bitmask'"):
        heads(images, features, [], [target, empty_target(IMAGE_SIZES[1])])


def test_image_conv_reads_the_image_at_the_authors_scale():
    """The backbone's normalized input is undone for the level-0 image conv, which reads
    x / 255 - 0.5 of the raw values x, whatever the backbone's normalization."""
    mean, std = [103.53, 116.28, 123.675], [57.4, 57.1, 58.4]
    heads = make_heads(pixel_mean=mean, pixel_std=std)
    raw = torch.randint(0, 256, (1, 3, 16, 20)).float()
    normalized = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    seen = []
    heads.image_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    heads.level0_map(ImageList(normalized, [(16, 20)]))
    torch.testing.assert_close(seen[0], raw / 255 - 0.5)


def two_discs_in_one_box():
    """Image 0 of the test batch with two equal discs side by side, and its targets: two
    instances that share one box (the pair's), each with its own disc's mask and centre."""
    images, features = make_inputs()
    rows, cols = torch.meshgrid(torch.arange(96.0), torch.arange(128.0), indexing="ij")
    centers = [(40.0, 48.0), (66.0, 48.0)]  # (x, y) pixel indices
    discs = torch.stack([(cols - x) ** 2 + (rows - y) ** 2 <= 10**2 for x, y in centers])
    images.tensor[0] = discs.any(dim=0).float() * 2 - 1
    target = Instances(IMAGE_SIZES[0])
    target.gt_boxes = Boxes(torch.tensor([[28.0, 36.0, 78.0, 60.0]]).repeat(2, 1))
    target.gt_masks = BitMasks(discs)
    target.gt_interior_points = torch.tensor(centers) + 0.5
    return images, features, target


@pytest.mark.parametrize("guidance_sigma", [0.0, 0.15], ids=["paper", "keypoint-guided"])
def test_keypoint_guidance_tells_which_object_of_a_shared_box_to_segment(guidance_sigma):
    """Trained on two discs that share one box, the guided branch segments the disc at each
    proposal's keypoint; without guidance both ROIs see the same crops and get the same mask."""
    torch.manual_seed(0)
    heads = make_heads(keypoint_guidance_sigma=guidance_sigma, refine_enabled=False).train()
    images, features, target = two_discs_in_one_box()
    optimizer = torch.optim.Adam(heads.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        heads(images, features, [], [target])[1]["loss_mask"].backward()
        optimizer.step()

    proposals = Instances(IMAGE_SIZES[0])
    proposals.proposal_boxes = target.gt_boxes
    proposals.objectness_logits = torch.tensor([1.0, 0.0])
    proposals.pred_classes = torch.zeros(2, dtype=torch.int64)
    proposals.proposal_keypoints = target.gt_interior_points
    heads.eval().mask_nms_thresh = 1.0  # keep both masks, however alike
    image0 = ImageList(images.tensor[:1], IMAGE_SIZES[:1])
    with torch.no_grad():
        (predicted,), _ = heads(image0, {k: v[:1] for k, v in features.items()}, [proposals])
    # (K, 2) IoU of each non-empty predicted mask, in score order, with each disc
    masks, truth = predicted.pred_masks.to_masks()[:, None], target.gt_masks.tensor[None]
    ious = (masks & truth).sum(dim=(2, 3)) / (masks | truth).sum(dim=(2, 3))
    if guidance_sigma > 0:
        assert len(masks) == 2 and (ious.diagonal() > 0.7).all(), ious
    else:  # the same mask twice (or none): one disc at most
        assert all(torch.equal(mask, masks[0]) for mask in masks)
        assert (ious > 0.7).sum() <= 1, ious


def two_rectangles_and_background():
    """An image with two rectangular objects (their boxes the ground truth) and three detections:
    the two boxes and one on background."""
    size = (64, 96)
    boxes = torch.tensor(
        [[8.0, 8.0, 32.0, 32.0], [50.0, 20.0, 74.0, 44.0], [40.0, 48.0, 56.0, 60.0]]
    )
    masks = torch.stack([rectangle(size, *[int(v) for v in box]) for box in boxes])
    target = Instances(size)
    target.gt_boxes = Boxes(boxes[:2])
    target.gt_masks = BitMasks(masks[:2])
    proposals = Instances(size)
    proposals.proposal_boxes = Boxes(boxes)
    proposals.objectness_logits = torch.tensor([2.0, 1.0, 0.0])
    proposals.pred_classes = torch.zeros(3, dtype=torch.int64)
    return size, target, proposals, masks


@pytest.mark.parametrize("train_detections, mean_iou", [(2, 1.0), (3, 0.8)])
def test_mask_iou_head_learns_the_pasted_masks_ious_on_gt_and_detector_rois(
    train_detections, mean_iou
):
    """The head's targets are the IoUs of the pasted masks with the object each covers best: the
    two ground-truth ROIs' and the top detections' (the third, on background, segments a mask
    that is no object's); only the head gets gradients from its loss."""
    size, target, proposals, masks = two_rectangles_and_background()
    heads = OracleHeads(
        **head_args(image_conv_channels=1, mask_iou_head=True, refine_enabled=False),
        mask_iou_train_detections=train_detections,
    ).train()
    heads.roi_masks = masks.float()
    with torch.no_grad():  # every ROI's IoU logit is 1
        heads.mask_iou_head.predictor.weight.zero_()
        heads.mask_iou_head.predictor.bias.fill_(1.0)
    images = ImageList(torch.zeros(1, 3, *size), [size])

    _, losses = heads(images, {}, [proposals], [target])

    # BCE(1, t) = softplus(1) - t: the loss is softplus(1) - the targets' mean
    assert softplus(1.0) - losses["loss_mask_iou"].item() == pytest.approx(mean_iou, abs=0.03)
    losses["loss_mask_iou"].backward()
    assert heads.mask_iou_head.predictor.bias.grad is not None
    assert all(p.grad is None for name, p in heads.named_parameters() if "mask_iou" not in name)


def test_mask_iou_head_gives_an_roi_the_same_logit_alone_or_padded_in_a_group():
    head = MaskIoUHead(in_channels=3)
    generator = torch.Generator().manual_seed(0)
    e1 = torch.randn(2, 3, 21, 30, generator=generator)
    probs = torch.rand(2, 1, 21, 30, generator=generator)
    valid = torch.zeros(2, 1, 21, 30)
    valid[0, :, :13, :18] = 1
    valid[1] = 1
    alone = head(e1[:1, :, :13, :18], probs[:1, :, :13, :18], torch.tensor([[13, 18]]))
    padded = head(e1 * valid, probs * valid, torch.tensor([[13, 18], [21, 30]]))
    torch.testing.assert_close(padded[:1], alone)
    assert padded.shape == (2,)


def test_max_mask_ious_match_each_mask_to_the_object_it_covers_best():
    size = (10, 10)
    gt = torch.stack([rectangle(size, 0, 0, 4, 4), rectangle(size, 5, 5, 10, 10)])
    masks = torch.stack(
        [rectangle(size, 0, 0, 4, 2), rectangle(size, 5, 5, 10, 10), torch.zeros(size, dtype=bool)]
    )
    torch.testing.assert_close(max_mask_ious(masks, gt), torch.tensor([0.5, 1.0, 0.0]))
    torch.testing.assert_close(max_mask_ious(masks, gt[:0]), torch.zeros(3))


@pytest.mark.parametrize("mask_confidence_score", [False, True])
@pytest.mark.parametrize("score_power", [1.0, 2.0])
def test_mask_iou_head_scales_the_scores_by_the_predicted_iou(mask_confidence_score, score_power):
    size, _, proposals, masks = two_rectangles_and_background()
    heads = SoftOracleHeads(
        **head_args(
            image_conv_channels=1,
            mask_thresh_test=0.5,
            mask_confidence_score=mask_confidence_score,
            mask_iou_head=True,
            mask_iou_score_power=score_power,
        )
    ).eval()
    heads.roi_masks = 0.8 * masks.float()
    with torch.no_grad():  # a predicted IoU of sigmoid(-1) for every mask
        heads.mask_iou_head.predictor.weight.zero_()
        heads.mask_iou_head.predictor.bias.fill_(-1.0)
    images = ImageList(torch.zeros(1, 3, *size), [size])

    (result,), _ = heads(images, {}, [proposals])

    expected = (
        proposals.objectness_logits.sigmoid() * torch.sigmoid(torch.tensor(-1.0)) ** score_power
    )
    if mask_confidence_score:
        expected = expected * 0.8
    torch.testing.assert_close(result.scores, expected, atol=0.01, rtol=0)


def test_mask_iou_head_on_a_batch_without_rois_gives_grads_for_every_parameter():
    heads = make_heads(mask_iou_head=True).train()
    images, features = make_inputs()
    empty = Instances(IMAGE_SIZES[0])
    empty.proposal_boxes = Boxes(torch.zeros(0, 4))
    _, losses = heads(
        images, features, [empty, empty], [empty_target(size) for size in IMAGE_SIZES]
    )
    assert losses["loss_mask_iou"].item() == 0
    sum(losses.values()).backward()
    for name, parameter in heads.named_parameters():
        assert parameter.grad is not None, name
