"""ROI geometry: pyramids, crops, masked per-ROI ops, paste-back and mask NMS, checked against
hand-computed values and one-ROI-at-a-time references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks

from objguided_d2.modeling.roi_geometry import (
    MaskWindows,
    build_roi_pyramid,
    conv1x1_concat,
    conv2d_by_taps,
    conv_weight_taps,
    crop_masks,
    crop_roi_groups,
    crop_rois,
    group_rois,
    mask_nms,
    mask_to_boxes,
    masked_instance_norm,
    paste_mask_windows,
    resize_conv_rois,
    resize_rois_bilinear,
    scale_fresh,
    valid_mask,
)

torch.set_num_threads(1)  # small tensors: extra threads only wait on a shared machine


def _grid_positions(center, size, count, stride):
    """Contract sample positions of one ROI axis, in level-map coordinates (reference)."""
    k = torch.arange(count, dtype=torch.float64)
    x = center - size / 2 + k * size / (count - 1)
    return (x + 0.5) / stride - 0.5


def _reference_crop(feature, box, stride, enlarge=1.1):
    """One ROI cropped with grid_sample (align_corners=False, zero padding) at the contract's
    positions; box XYXY in input pixels, feature (C, H, W)."""
    x1, y1, x2, y2 = box
    w, h = (x2 - x1) * enlarge, (y2 - y1) * enlarge
    cx, cy = (x1 + x2) / 2 - 0.5, (y1 + y2) / 2 - 0.5
    u = _grid_positions(cx, w, int(w / stride), stride)
    v = _grid_positions(cy, h, int(h / stride), stride)
    height, width = feature.shape[1:]
    gx = (2 * u + 1) / width - 1
    gy = (2 * v + 1) / height - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None].float()
    return F.grid_sample(feature[None], grid, align_corners=False)[0]


# ----------------------------------------------------------------------------- pyramid


def test_pyramid_sizes_and_levels_near_the_limits():
    boxes = torch.tensor(
        [
            [10.0, 20.0, 30.0, 50.0],  # 20 x 30 -> 22 x 33 enlarged
            [0.0, 0.0, 7.2, 40.0],  # 1.1 * 7.2 / 4 = 1.98 < 2: stops before level 2
            [0.0, 0.0, 7.28, 40.0],  # 1.1 * 7.28 / 4 = 2.002: level 2 has 2 columns
            [5.0, 5.0, 6.0, 6.0],  # 1 px: 1.1 < 2 at level 0, skipped
            [0.0, 0.0, 100.0, 100.0],  # all five levels
        ]
    )
    pyramid = build_roi_pyramid(boxes)
    assert pyramid.strides == (1, 2, 4, 8, 16)
    assert pyramid.num_levels.tolist() == [4, 2, 3, 0, 5]
    assert pyramid.level_hw[0].tolist() == [[33, 22], [16, 11], [8, 5], [4, 2], [0, 0]]
    assert pyramid.level_hw[1].tolist() == [[44, 7], [22, 3], [0, 0], [0, 0], [0, 0]]
    assert pyramid.level_hw[2, :3].tolist() == [[44, 8], [22, 4], [11, 2]]
    assert pyramid.level_hw[3].abs().sum() == 0
    assert pyramid.level_hw[4].tolist() == [[110, 110], [55, 55], [27, 27], [13, 13], [6, 6]]
    # centres in pixel-index coordinates, sizes enlarged
    assert pyramid.centers[0].tolist() == [19.5, 34.5]
    assert torch.allclose(pyramid.sizes[0], torch.tensor([22.0, 33.0], dtype=torch.float64))


def test_pyramid_subset_and_custom_levels():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 40.0, 20.0]])
    pyramid = build_roi_pyramid(boxes, strides=(1, 4), enlarge=1.0, min_size=3.0)
    assert pyramid.level_hw.tolist() == [[[10, 10], [0, 0]], [[20, 40], [5, 10]]]
    sub = pyramid[torch.tensor([1])]
    assert len(sub) == 1 and sub.level_hw.tolist() == [[[20, 40], [5, 10]]]


# ----------------------------------------------------------------------------- crops


def test_crop_of_linear_ramp_is_exact_with_half_pixel_mapping():
    # f(u, v) = 3 + 2u - v is reproduced exactly by bilinear sampling inside the map
    height, width = 40, 50  # a stride-4 map of a 160 x 200 input
    v, u = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    feature = (3.0 + 2.0 * u - v).float()[None, None].repeat(1, 2, 1, 1)
    feature[0, 1] *= -1
    box = torch.tensor([[40.0, 30.0, 100.0, 110.0]])  # 60 x 80 -> 66 x 88 enlarged
    pyramid = build_roi_pyramid(box)
    crops, valid = crop_rois(feature, torch.tensor([0]), pyramid, 2, (25, 20))
    h, w = pyramid.level_hw[0, 2].tolist()
    assert (h, w) == (22, 16)
    # stride 4: u = (x + 0.5) / 4 - 0.5 with x_k = 69.5 - 33 + k * 66 / 15
    uk = (69.5 - 33 + torch.arange(w, dtype=torch.float64) * 66 / 15 + 0.5) / 4 - 0.5
    vk = (69.5 - 44 + torch.arange(h, dtype=torch.float64) * 88 / 21 + 0.5) / 4 - 0.5
    expected = 3.0 + 2.0 * uk[None, :] - vk[:, None]
    assert torch.allclose(crops[0, 0, :h, :w].double(), expected, atol=1e-4)
    assert torch.allclose(crops[0, 1, :h, :w].double(), -expected, atol=1e-4)
    assert crops[0, :, h:].abs().sum() == 0 and crops[0, :, :, w:].abs().sum() == 0
    assert valid.dtype == torch.bool and valid.shape == (1, 1, 25, 20)
    assert valid[0, 0].sum() == h * w and valid[0, 0, :h, :w].all()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_crop_matches_per_roi_grid_sample_with_zeros_outside_the_map(memory_format):
    torch.manual_seed(0)
    # stride 4 of 64 x 80
    features = torch.randn(2, 3, 16, 20).contiguous(memory_format=memory_format)
    boxes = torch.tensor(
        [
            [-6.0, -4.0, 20.0, 30.0],  # sticks out at the top-left
            [50.0, 40.0, 85.0, 70.0],  # sticks out at the bottom-right
            [10.0, 12.0, 40.0, 24.0],
        ]
    )
    batch_index = torch.tensor([1, 0, 1])
    pyramid = build_roi_pyramid(boxes)
    crops, _ = crop_rois(features, batch_index, pyramid, 2, (12, 12))
    assert crops.is_contiguous(memory_format=torch.channels_last)
    for r in range(3):
        reference = _reference_crop(features[batch_index[r]], boxes[r].tolist(), 4)
        h, w = reference.shape[1:]
        assert pyramid.level_hw[r, 2].tolist() == [h, w]
        torch.testing.assert_close(crops[r, :, :h, :w], reference, atol=1e-5, rtol=0)
        assert crops[r, :, h:].abs().sum() == 0 and crops[r, :, :, w:].abs().sum() == 0


def test_crop_groups_equal_single_batch_crops_and_gradients():
    torch.manual_seed(1)
    boxes = torch.tensor(
        [[3.0, 4.0, 40.0, 30.0], [10.0, 10.0, 22.0, 19.0], [0.0, 20.0, 60.0, 63.0]]
    )
    batch_index = torch.tensor([0, 1, 1])
    pyramid = build_roi_pyramid(boxes)
    feature = torch.randn(2, 4, 32, 32, requires_grad=True)  # stride 2
    groups = group_rois(pyramid, min_saving=0)
    assert len(groups) == 3
    grouped = crop_roi_groups(feature, batch_index, pyramid, 1, groups)
    single, _ = crop_rois(feature, batch_index, pyramid, 1, pyramid.level_hw[:, 1].amax(0))
    for group, crops in zip(groups, grouped):
        assert crops.shape == (len(group.indices), 4, *group.pad_hw[1])
        h, w = group.pad_hw[1]
        assert torch.equal(crops, single[group.indices, :, :h, :w])
    weights = torch.randn_like(single)
    (grad_single,) = torch.autograd.grad((single * weights).sum(), feature)
    grouped_loss = sum(
        (crops * weights[g.indices, :, : crops.shape[2], : crops.shape[3]]).sum()
        for g, crops in zip(groups, grouped)
    )
    (grad_grouped,) = torch.autograd.grad(grouped_loss, feature)
    torch.testing.assert_close(grad_grouped, grad_single)
    # the gradient is the adjoint of the crop: <crop(f), g> = <f, grad>
    assert torch.allclose((grad_single * feature).sum(), (single * weights).sum(), rtol=1e-4)


def test_crop_masks_reads_each_rois_own_mask():
    masks = torch.zeros(3, 40, 50, dtype=torch.bool)
    masks[0, 10:30, 10:30] = True
    masks[1, 5:15, 20:45] = True
    masks[2] = True
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [20.0, 5.0, 45.0, 15.0]])
    pyramid = build_roi_pyramid(boxes)
    soft = crop_masks(masks, pyramid, (24, 30), mask_index=torch.tensor([0, 1]))
    for r in range(2):
        reference = _reference_crop(masks[r, None].float(), boxes[r].tolist(), 1)
        h, w = reference.shape[1:]
        torch.testing.assert_close(soft[r, :, :h, :w], reference, atol=1e-5, rtol=0)
        assert soft[r, :, h:].sum() == 0 and soft[r, :, :, w:].sum() == 0
    # 20 px box -> 22 samples at 8.5 + k * 22 / 21: samples 2..19 lie in [10, 29], first is out
    assert soft[0, 0, 2:20, 2:20].eq(1).all() and soft[0, 0, 0, :].max() == 0
    assert 0 < soft[0, 0, 1, 5] < 1
    # ROI 0 reading the all-ones mask 2 is 1 wherever the grid lies in the image
    ones = crop_masks(masks, pyramid[:1], (22, 22), mask_index=torch.tensor([2]))
    torch.testing.assert_close(ones, torch.ones_like(ones))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_masks_accepts_byte_and_float_masks(dtype):
    masks = torch.zeros(1, 30, 30, dtype=torch.bool)
    masks[0, 5:20, 8:25] = True
    pyramid = build_roi_pyramid(torch.tensor([[8.0, 5.0, 25.0, 20.0]]))
    expected = crop_masks(masks, pyramid, (16, 18))
    assert torch.equal(crop_masks(masks.to(dtype), pyramid, (16, 18)), expected)


def test_crops_and_resizes_backpropagate_deterministically():
    torch.manual_seed(8)
    pyramid = build_roi_pyramid(torch.tensor([[3.0, 4.0, 40.0, 30.0], [10.0, 10.0, 22.0, 19.0]]))
    feature = torch.randn(2, 3, 24, 24, requires_grad=True)  # stride 2
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            crops, _ = crop_rois(feature, torch.tensor([1, 0]), pyramid, 1, (15, 20))
            hw = pyramid.level_hw[:, 1]
            up = resize_rois_bilinear(crops, hw, 2 * hw, (30, 40))
            taps = conv_weight_taps(torch.ones(1, 3, 3, 3))
            (mixed,) = resize_conv_rois(taps, [(crops, hw, 2 * hw, (30, 40))])
            up = up + mixed
            grads.append(
                torch.autograd.grad((up * torch.arange(1200.0).view(30, 40)).sum(), feature)
            )
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0][0], grads[1][0]) and grads[0][0].abs().sum() > 0


# ----------------------------------------------------------------------------- masked ops


def test_valid_mask():
    mask = valid_mask(torch.tensor([[2, 3], [0, 4], [3, 1]]), (3, 4))
    assert mask.shape == (3, 1, 3, 4)
    assert mask.sum((1, 2, 3)).tolist() == [6, 0, 3]
    assert mask[0, 0, :2, :3].all() and mask[2, 0, :, 0].all()


@pytest.mark.parametrize("zero_outside", [True, False])
@pytest.mark.parametrize("affine", [False, True])
def test_masked_instance_norm_equals_instance_norm_per_roi(affine, zero_outside):
    torch.manual_seed(2)
    sizes = [(5, 7), (12, 3), (1, 4), (12, 12)]
    channels = 6
    norm = torch.nn.InstanceNorm2d(channels, affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    rois = [torch.randn(1, channels, h, w) * 3 + 1 for h, w in sizes]
    hw = torch.tensor(sizes)
    batch = torch.randn(4, channels, 12, 12) * 10  # values outside the ROIs must not matter
    for r, roi in enumerate(rois):
        batch[r, :, : sizes[r][0], : sizes[r][1]] = roi[0]
    out = masked_instance_norm(
        batch,
        valid_mask(hw, (12, 12)),
        weight=norm.weight if affine else None,
        bias=norm.bias if affine else None,
        zero_outside=zero_outside,
    )
    for r, roi in enumerate(rois):
        h, w = sizes[r]
        torch.testing.assert_close(out[r, :, :h, :w], norm(roi)[0], atol=1e-5, rtol=1e-5)
        if zero_outside:
            assert out[r, :, h:].abs().sum() == 0 and out[r, :, :, w:].abs().sum() == 0


def test_masked_instance_norm_keeps_its_input_and_backpropagates():
    """The norm scales its own temporaries in place when no graph records them: the input stays
    untouched, and with autograd the gradient equals nn.InstanceNorm2d's on each ROI."""
    torch.manual_seed(4)
    sizes = [(5, 7), (9, 3)]
    batch = torch.randn(2, 3, 9, 7)
    valid = valid_mask(torch.tensor(sizes), (9, 7))
    before = batch.clone()
    with torch.no_grad():
        inference = masked_instance_norm(batch, valid)
    assert torch.equal(batch, before)

    batch.requires_grad_()
    upstream = torch.randn_like(batch)
    (grad,) = torch.autograd.grad((masked_instance_norm(batch, valid) * upstream).sum(), batch)
    for r, (h, w) in enumerate(sizes):
        roi = batch[r : r + 1, :, :h, :w].detach().requires_grad_()
        out = F.instance_norm(roi)
        (expected,) = torch.autograd.grad((out * upstream[r : r + 1, :, :h, :w]).sum(), roi)
        torch.testing.assert_close(inference[r, :, :h, :w], out[0].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad[r, :, :h, :w], expected[0], atol=1e-5, rtol=1e-4)
        assert grad[r, :, h:].abs().sum() == 0 and grad[r, :, :, w:].abs().sum() == 0


def test_scale_fresh_is_in_place_only_without_autograd():
    fresh, factor = torch.ones(2, 3), torch.full((1, 3), 2.0)
    assert scale_fresh(fresh, factor) is fresh and torch.equal(fresh, torch.full((2, 3), 2.0))
    recorded = torch.ones(2, 3, requires_grad=True) * 1.0
    out = scale_fresh(recorded, factor)
    assert out is not recorded and torch.equal(recorded, torch.ones(2, 3))
    out.sum().backward()  # the graph is intact
    # a parameter factor (the affine norm's weight) requires a gradient, but no_grad records
    # nothing
    parameter = torch.nn.Parameter(torch.full((1, 3), 3.0))
    with torch.no_grad():
        assert scale_fresh(fresh, parameter) is fresh
    assert torch.equal(fresh, torch.full((2, 3), 6.0))


def test_resize_rois_bilinear_equals_per_roi_interpolate():
    torch.manual_seed(3)
    in_sizes = [(4, 6), (9, 5), (2, 2), (13, 11), (7, 7)]
    out_sizes = [(8, 13), (4, 10), (5, 3), (6, 11), (7, 7)]  # up, mixed, down, identity
    rois = [torch.randn(1, 3, h, w) for h, w in in_sizes]
    batch = torch.full((5, 3, 13, 11), float("nan"))  # the padding must never be read
    for r, roi in enumerate(rois):
        batch[r, :, : in_sizes[r][0], : in_sizes[r][1]] = roi[0]
    out = resize_rois_bilinear(batch, torch.tensor(in_sizes), torch.tensor(out_sizes), (9, 13))
    assert out.shape == (5, 3, 9, 13)
    for r, roi in enumerate(rois):
        h, w = out_sizes[r]
        reference = F.interpolate(roi, size=(h, w), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(out[r, :, :h, :w], reference, atol=1e-5, rtol=1e-5)
        assert out[r, :, h:].abs().sum() == 0 and out[r, :, :, w:].abs().sum() == 0


@pytest.mark.parametrize("kernel_size", [3, 1, 5])
def test_resize_conv_rois_equals_per_roi_interpolate_then_conv(kernel_size):
    torch.manual_seed(3)
    in_sizes = [(4, 6), (9, 5), (2, 2), (13, 11), (7, 7), (1, 3)]
    out_sizes = [(8, 13), (4, 10), (5, 3), (6, 11), (7, 7), (2, 6)]  # up, mixed, down, identity
    conv = torch.nn.Conv2d(3, 4, kernel_size, padding=kernel_size // 2, bias=False)
    rois = [torch.randn(1, 3, h, w) for h, w in in_sizes]
    batch = torch.zeros(6, 3, 13, 11)
    for r, roi in enumerate(rois):
        batch[r, :, : in_sizes[r][0], : in_sizes[r][1]] = roi[0]
    taps = conv_weight_taps(conv.weight)
    in_hw, out_hw = torch.tensor(in_sizes), torch.tensor(out_sizes)
    # the same ROIs twice, split in two batches of other paddings: one matmul serves all
    out, first, second = resize_conv_rois(
        taps,
        [
            (batch, in_hw, out_hw, (9, 13)),
            (batch[:2, :, :9], in_hw[:2], out_hw[:2], (8, 13)),
            (batch[2:], in_hw[2:], out_hw[2:], (7, 11)),
        ],
    )
    assert first.shape == (2, 4, 8, 13) and second.shape == (4, 4, 7, 11)
    torch.testing.assert_close(first, out[:2, :, :8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, out[2:, :, :7, :11], atol=1e-5, rtol=1e-5)
    assert out.shape == (6, 4, 9, 13)
    for r, roi in enumerate(rois):
        h, w = out_sizes[r]
        up = F.interpolate(roi, size=(h, w), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[r, :, :h, :w], conv(up)[0], atol=1e-5, rtol=1e-5)
        assert out[r, :, h:].abs().sum() == 0 and out[r, :, :, w:].abs().sum() == 0


def test_resize_conv_rois_by_hand():
    """A 1 x 2 ROI upsampled to 1 x 4 reads [a, 0.75a + 0.25b, 0.25a + 0.75b, b]; a 1 x 3 kernel
    [1, 10, 100] then sums its left neighbour, 10 x itself and 100 x its right neighbour."""
    x = torch.tensor([[[[2.0, 6.0]]]])
    weight = torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 1, 3)
    hw = torch.tensor([[1, 2]])
    # only the middle row of a 3 x 3 kernel touches a single-row ROI
    weight = F.pad(weight, (0, 0, 1, 1))
    taps = conv_weight_taps(weight)
    (out,) = resize_conv_rois(taps, [(x, hw, torch.tensor([[1, 4]]), (2, 5))])
    up = [2.0, 3.0, 5.0, 6.0]
    expected = [10 * up[0] + 100 * up[1], up[0] + 10 * up[1] + 100 * up[2]]
    expected += [up[1] + 10 * up[2] + 100 * up[3], up[2] + 10 * up[3]]
    torch.testing.assert_close(out[0, 0, 0, :4], torch.tensor(expected))
    assert out[0, 0, 0, 4] == 0 and out[0, 0, 1].abs().sum() == 0


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel_size, out_channels", [(3, 1), (3, 2), (1, 1), (5, 3)])
def test_conv2d_by_taps_equals_conv2d(kernel_size, out_channels, memory_format):
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(4, out_channels, kernel_size, padding=kernel_size // 2)
    x = torch.randn(3, 4, 7, 9).contiguous(memory_format=memory_format)
    out = conv2d_by_taps(x, conv.weight, conv.bias)
    torch.testing.assert_close(out, conv(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv2d_by_taps(x, conv.weight), conv(x) - conv.bias.view(-1, 1, 1))
    # with a valid mask, x outside it counts as zero
    valid = torch.rand(3, 1, 7, 9) > 0.3
    masked = conv2d_by_taps(x, conv.weight, conv.bias, valid=valid)
    torch.testing.assert_close(masked, conv(x * valid), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv1x1_concat_equals_the_conv_of_the_concatenation(with_bias, memory_format):
    torch.manual_seed(6)
    conv = torch.nn.Conv2d(5 + 3, 4, 1, bias=with_bias)
    skip = torch.randn(2, 5, 6, 7).contiguous(memory_format=memory_format)
    up = torch.randn(2, 3, 6, 7).contiguous(memory_format=memory_format)
    out = conv1x1_concat([skip, up], conv.weight, conv.bias)
    torch.testing.assert_close(out, conv(torch.cat([skip, up], dim=1)), atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_zero_padded_conv_is_exact_inside_the_valid_region():
    # the invariant the padded-batch heads rely on (documented in the module docstring)
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    sizes = [(4, 9), (7, 2)]
    rois = [torch.randn(1, 3, h, w) for h, w in sizes]
    batch = torch.zeros(2, 3, 8, 10)
    for r, roi in enumerate(rois):
        batch[r, :, : sizes[r][0], : sizes[r][1]] = roi[0]
    valid = valid_mask(torch.tensor(sizes), (8, 10))
    out = conv(batch) * valid
    for r, roi in enumerate(rois):
        h, w = sizes[r]
        torch.testing.assert_close(out[r, :, :h, :w], conv(roi)[0], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- grouping


def test_group_rois_partitions_the_rois_and_cuts_while_it_saves_padding():
    torch.manual_seed(5)
    xy = torch.rand(200, 2) * 400
    wh = torch.rand(200, 2) ** 2 * 90 + 0.5
    pyramid = build_roi_pyramid(torch.cat((xy, xy + wh), dim=1))
    kept = torch.nonzero(pyramid.num_levels > 0).squeeze(1)
    assert len(kept) < 200

    def padded_area(indices):
        return len(indices) * int(pyramid.level_hw[indices, 0].amax(0).prod())

    for min_saving in (0, 1000, 10**9):
        groups = group_rois(pyramid, min_saving=min_saving)
        members = torch.cat([g.indices for g in groups])
        assert sorted(members.tolist()) == kept.tolist()
        for group in groups:
            assert group.indices.tolist() == sorted(group.indices.tolist())
            levels = pyramid.num_levels[group.indices]
            assert (levels == group.num_levels).all()
            hw = pyramid.level_hw[group.indices]
            for level, pad in enumerate(group.pad_hw):
                assert list(pad) == hw[:, level].amax(0).tolist()
            # no cut between consecutive ROIs by height or by width saves more than min_saving
            for axis in (0, 1):
                order = group.indices[torch.sort(hw[:, 0, axis], stable=True).indices]
                for cut in range(1, len(order)):
                    saving = padded_area(order) - padded_area(order[:cut])
                    saving -= padded_area(order[cut:])
                    assert saving <= min_saving
        if min_saving == 10**9:  # never cut: one group per number of levels
            assert len(groups) == len(pyramid.num_levels[kept].unique())
    # the default cuts into fewer groups than cutting at any saving, padding more
    cut_all, default = group_rois(pyramid, min_saving=0), group_rois(pyramid)
    assert len(default) < len(cut_all)
    assert sum(padded_area(g.indices) for g in default) > sum(
        padded_area(g.indices) for g in cut_all
    )

    limited = group_rois(pyramid, max_group_pixels=4000)
    assert sorted(torch.cat([g.indices for g in limited]).tolist()) == kept.tolist()
    for group in limited:
        pad_area = group.pad_hw[0][0] * group.pad_hw[0][1]
        assert len(group.indices) == 1 or len(group.indices) * pad_area <= 4000


def test_group_rois_separates_two_sizes_and_keeps_near_sizes_together():
    boxes = torch.tensor([[0.0, 0.0, 40.0, 36.0]] * 5 + [[0.0, 0.0, 60.0, 50.0]] * 3)
    near = torch.tensor([[0.0, 0.0, 41.0, 36.0]] * 2)  # one pixel wider: cutting saves 195 px
    pyramid = build_roi_pyramid(torch.cat((boxes, near)))
    assert (pyramid.num_levels == 5).all()
    groups = group_rois(pyramid)
    assert [g.indices.tolist() for g in groups] == [[0, 1, 2, 3, 4, 8, 9], [5, 6, 7]]
    assert groups[0].pad_hw[0] == (39, 45) and groups[1].pad_hw[0] == (55, 66)
    assert len(group_rois(pyramid, min_saving=0)) == 3


def test_group_rois_without_kept_rois():
    pyramid = build_roi_pyramid(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert group_rois(pyramid) == []
    assert group_rois(build_roi_pyramid(torch.zeros(0, 4))) == []


# ----------------------------------------------------------------------------- paste-back


def _shape_mask(kind, cx, cy, a, b, height, width, scale_y=1.0, scale_x=1.0):
    """Disc / ellipse (semi-axes a, b) or rectangle (half sides a, b) centred on (cx, cy) in
    continuous input coordinates, rasterised on a grid scale_x, scale_y times finer."""
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / scale_y
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / scale_x
    dy, dx = (ys[:, None] - cy).abs(), (xs[None, :] - cx).abs()
    if kind == "rect":
        return (dx <= a) & (dy <= b)
    return (dx / a) ** 2 + (dy / b) ** 2 <= 1


def _iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


_SHAPES = [
    ("ellipse", 40.3, 50.0, 4.0, 4.0),  # 8 px disc
    ("ellipse", 120.0, 60.7, 6.0, 4.5),
    ("rect", 200.0, 100.0, 5.0, 8.0),
    ("ellipse", 300.5, 200.2, 30.0, 12.0),
    ("rect", 80.0, 300.0, 30.0, 25.0),
    ("ellipse", 400.0, 320.0, 22.0, 30.0),
    ("ellipse", 5.0, 7.0, 6.0, 5.0),  # clipped by the image border
    ("rect", 500.0, 370.0, 15.0, 20.0),  # clipped by the image border
]


def _crop_shapes(height, width):
    masks = torch.stack([_shape_mask(*s[:5], height, width) for s in _SHAPES])
    boxes = BitMasks(masks).get_bounding_boxes().tensor
    pyramid = build_roi_pyramid(boxes)
    pad = tuple(pyramid.level_hw[:, 0].amax(0).tolist())
    return masks, pyramid, crop_masks(masks, pyramid, pad)


def _reference_canvas(probs, box, height, width):
    """Normalized bilinear splat of one ROI's level-0 probabilities on the full canvas."""
    x1, y1, x2, y2 = box
    w, h = (x2 - x1) * 1.1, (y2 - y1) * 1.1
    ys = _grid_positions((y1 + y2) / 2 - 0.5, h, int(h), 1).numpy()
    xs = _grid_positions((x1 + x2) / 2 - 0.5, w, int(w), 1).numpy()
    y, x = np.meshgrid(ys, xs, indexing="ij")
    num, den = np.zeros((height, width)), np.zeros((height, width))
    for ty, wy in ((np.floor(y), 1 - (y - np.floor(y))), (np.floor(y) + 1, y - np.floor(y))):
        for tx, wx in ((np.floor(x), 1 - (x - np.floor(x))), (np.floor(x) + 1, x - np.floor(x))):
            inside = (ty >= 0) & (ty < height) & (tx >= 0) & (tx < width)
            at = (ty[inside].astype(int), tx[inside].astype(int))
            np.add.at(num, at, (probs.numpy() * wy * wx)[inside])
            np.add.at(den, at, (wy * wx)[inside])
    return torch.from_numpy(np.where(den > 0, num / np.maximum(den, 1e-300), 0.0))


def test_crop_then_paste_reproduces_masks_at_input_resolution():
    masks, pyramid, soft = _crop_shapes(384, 512)
    windows = paste_mask_windows(soft, pyramid, (384, 512), threshold=0.5)
    pasted = windows.to_masks()
    assert pasted.dtype == torch.bool and pasted.shape == masks.shape
    assert torch.equal(pasted, masks)  # objects of 8 px and more come back pixel-exact
    chunked = paste_mask_windows(soft, pyramid, (384, 512), threshold=0.5, max_chunk_bytes=1)
    assert torch.equal(chunked.to_masks(), pasted)
    # a subset in another order, and the windows read back as the full masks
    index = torch.tensor([4, 0, 2])
    assert torch.equal(windows.to_masks(index), pasted[index])
    assert torch.equal(MaskWindows.cat([chunked, windows]).to_masks(), torch.cat([pasted, pasted]))


@pytest.mark.parametrize("out_hw", [(384, 512), (780, 1040), (192, 256)])
def test_paste_gives_the_tight_boxes_of_its_masks(out_hw):
    masks, pyramid, soft = _crop_shapes(384, 512)
    soft[2] = 0.0  # an empty mask gets a zero box
    windows = paste_mask_windows(soft, pyramid, (384, 512), out_hw, max_chunk_bytes=1 << 20)
    pasted = windows.to_masks()
    assert not pasted[2].any()
    assert torch.equal(windows.boxes, mask_to_boxes(pasted))


@pytest.mark.parametrize("out_hw", [(780, 1040), (192, 256), (400, 300)])
def test_paste_to_another_resolution_resizes_the_soft_canvas(out_hw):
    # reference: splat one ROI at a time on the full canvas, F.interpolate it, threshold
    masks, pyramid, soft = _crop_shapes(384, 512)
    boxes = BitMasks(masks).get_bounding_boxes().tensor
    pasted = paste_mask_windows(
        soft, pyramid, (384, 512), out_hw, threshold=0.5, max_chunk_bytes=1 << 20
    ).to_masks()
    assert pasted.shape == (len(masks), *out_hw)
    for r in range(len(masks)):
        h, w = pyramid.level_hw[r, 0].tolist()
        canvas = _reference_canvas(soft[r, 0, :h, :w].double(), boxes[r].tolist(), 384, 512)
        resized = F.interpolate(canvas[None, None], size=out_hw, mode="bilinear")[0, 0]
        undecided = (resized - 0.5).abs() < 1e-5
        assert torch.equal(pasted[r] & ~undecided, (resized >= 0.5) & ~undecided), r


def test_paste_upscaled_masks_track_the_true_shapes():
    # 512 x 384 -> 1040 x 780: compared with each shape rasterised at the output resolution,
    # pasting is at least as good as resizing the input mask, and > 0.99 IoU from 16 px on
    masks, pyramid, soft = _crop_shapes(384, 512)
    out_hw = (780, 1040)
    pasted = paste_mask_windows(soft, pyramid, (384, 512), out_hw, threshold=0.5).to_masks()
    resized = F.interpolate(masks[:, None].float(), size=out_hw, mode="bilinear")[:, 0] >= 0.5
    for r, shape in enumerate(_SHAPES):
        fine = _shape_mask(*shape, *out_hw, scale_y=780 / 384, scale_x=1040 / 512)
        assert _iou(pasted[r], fine) >= _iou(resized[r], fine) - 0.005, r
        if min(shape[3:]) >= 8:
            assert _iou(pasted[r], resized[r]) > 0.99, r


def test_paste_splats_with_normalized_bilinear_weights():
    # 3 x 3 samples at 9.7, 11.2, 12.7 (spacing 1.5) in both axes; probs = outer(a, a)
    pyramid = build_roi_pyramid(torch.tensor([[10.2, 10.2, 13.2, 13.2]]), enlarge=1.0)
    assert pyramid.level_hw[0, 0].tolist() == [3, 3]
    a = torch.tensor([0.2, 0.9, 0.6])
    probs = (a[:, None] * a[None, :])[None, None]
    # taps 9 (.3) 10 (.7) | 11 (.8) 12 (.2) | 12 (.3) 13 (.7): pixel 12 gets (.2*.9 + .3*.6) / .5
    line = torch.zeros(20)
    line[9:14] = torch.tensor([0.2, 0.2, 0.9, 0.72, 0.6])
    canvas = line[:, None] * line[None, :]
    for threshold in (0.15, 0.5, 0.53, 0.7):
        pasted = paste_mask_windows(probs, pyramid, (20, 20), threshold=threshold).to_masks()
        assert torch.equal(pasted[0], canvas >= threshold), threshold


def test_paste_of_skipped_roi_is_empty():
    pyramid = build_roi_pyramid(torch.tensor([[3.0, 3.0, 4.0, 4.0], [0.0, 0.0, 10.0, 10.0]]))
    probs = torch.ones(2, 1, 11, 11)
    pasted = paste_mask_windows(probs, pyramid, (20, 20), (40, 40), threshold=0.5).to_masks()
    assert pasted[0].sum() == 0 and pasted[1].sum() > 0
    no_roi = paste_mask_windows(probs[:0], pyramid[:0], (20, 20), (40, 40))
    assert len(no_roi) == 0 and no_roi.to_masks().shape == (0, 40, 40)


# ----------------------------------------------------------------------------- boxes and NMS


def test_mask_to_boxes_matches_bitmasks():
    torch.manual_seed(6)
    masks = torch.rand(6, 17, 23) > 0.97
    masks[0] = False
    masks[1, 0, 0] = True
    masks[1, 1:] = False
    masks[1, 0, 1:] = False
    torch.testing.assert_close(mask_to_boxes(masks), BitMasks(masks).get_bounding_boxes().tensor)
    assert mask_to_boxes(masks)[0].tolist() == [0, 0, 0, 0]
    assert mask_to_boxes(masks)[1].tolist() == [0, 0, 1, 1]


def test_mask_nms_suppresses_duplicates_and_keeps_disjoint_masks():
    masks = torch.zeros(7, 40, 40, dtype=torch.bool)
    masks[0, 0:10, 0:10] = True  # score .5
    masks[1, 0:10, 0:9] = True  # IoU .9 with 0, score .9: suppresses 0
    masks[2, 20:30, 20:30] = True  # disjoint, kept
    masks[3, 20:30, 25:35] = True  # IoU 1/3 with 2: kept at 0.4, suppressed at 0.2
    masks[5, 0:1, 30:40] = True  # row-0 mask, disjoint, kept
    masks[6, 35:40, 0:5] = True  # lowest score, kept
    scores = torch.tensor([0.5, 0.9, 0.8, 0.7, 0.95, 0.6, 0.1])  # 4 is empty: dropped
    assert mask_nms(MaskWindows.from_masks(masks), scores, 0.2).tolist() == [1, 2, 5, 6]
    assert mask_nms(MaskWindows.from_masks(masks), scores, 0.4).tolist() == [1, 2, 3, 5, 6]
    assert mask_nms(MaskWindows.from_masks(masks), scores, 0.95).tolist() == [1, 2, 3, 5, 0, 6]


def test_mask_nms_chain_follows_greedy_order():
    # 0 suppresses 1, so 1 cannot suppress 2: greedy keeps 0 and 2
    masks = torch.zeros(3, 10, 30, dtype=torch.bool)
    masks[0, :, 0:10] = True
    masks[1, :, 5:15] = True
    masks[2, :, 10:20] = True
    keep = mask_nms(MaskWindows.from_masks(masks), torch.tensor([0.9, 0.8, 0.7]), 0.3)
    assert keep.tolist() == [0, 2]


def test_mask_nms_empty_inputs():
    empty_masks = MaskWindows.from_masks(torch.zeros(3, 8, 8, dtype=torch.bool))
    assert mask_nms(empty_masks, torch.rand(3), 0.5).tolist() == []
    no_masks = MaskWindows.empty((8, 8))
    assert mask_nms(no_masks, torch.zeros(0), 0.5).tolist() == []
    assert no_masks.to_masks().shape == (0, 8, 8)


def test_mask_nms_matches_brute_force_on_random_overlaps():
    torch.manual_seed(7)
    num, size = 40, 64
    masks = torch.zeros(num, size, size, dtype=torch.bool)
    corners = torch.randint(0, size - 8, (num, 2))
    sides = torch.randint(1, 30, (num, 2))
    for r in range(num):
        y, x = corners[r].tolist()
        h, w = sides[r].tolist()
        masks[r, y : y + h, x : x + w] = torch.rand(min(h, size - y), min(w, size - x)) > 0.2
    scores = torch.rand(num)
    flat = masks.flatten(1).float()
    inter = flat @ flat.T
    union = flat.sum(1)[:, None] + flat.sum(1)[None, :] - inter
    iou = inter / union
    order = torch.argsort(scores, descending=True).tolist()
    expected, suppressed = [], set()
    for i in order:
        if i in suppressed or flat[i].sum() == 0:
            continue
        expected.append(i)
        suppressed |= {j for j in order if iou[i, j] > 0.3}
    full = MaskWindows.from_masks(masks)
    assert mask_nms(full, scores, 0.3, max_chunk_elements=500).tolist() == expected
    # the same masks in ragged windows around each mask, of random margins, give the same
    windows = _random_windows(masks, torch.Generator().manual_seed(8))
    assert torch.equal(windows.to_masks(), masks)
    assert mask_nms(windows, scores, 0.3, max_chunk_elements=500).tolist() == expected


def _random_windows(masks, generator):
    """MaskWindows of full masks, each in a window of its box widened by random margins."""
    height, width = masks.shape[1:]
    pixels, origins, shapes = [], [], []
    for mask, box in zip(masks, mask_to_boxes(masks).long().tolist()):
        x1, y1, x2, y2 = box
        (top, left, bottom, right) = torch.randint(0, 6, (4,), generator=generator).tolist()
        y1, x1 = max(y1 - top, 0), max(x1 - left, 0)
        y2, x2 = min(max(y2, y1 + 1) + bottom, height), min(max(x2, x1 + 1) + right, width)
        pixels.append(mask[y1:y2, x1:x2].reshape(-1))
        origins.append([y1, x1])
        shapes.append([y2 - y1, x2 - x1])
    return MaskWindows(
        pixels=torch.cat(pixels),
        origins=torch.tensor(origins),
        shapes=torch.tensor(shapes),
        boxes=mask_to_boxes(masks),
        image_hw=(height, width),
    )
