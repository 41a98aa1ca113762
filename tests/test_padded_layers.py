"""Layers on padded ROI batches, checked against the plain PyTorch layer on each ROI alone."""

import pytest
import torch
import torch.nn.functional as F

from objguided_d2.modeling.padded_layers import (
    masked_instance_norm,
    resize_conv_rois,
    resize_rois_bilinear,
)
from objguided_d2.modeling.roi_crops import build_roi_pyramid, crop_rois, valid_mask

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("affine", [False, True])
def test_masked_instance_norm_equals_instance_norm_per_roi(affine):
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
    )
    for r, roi in enumerate(rois):
        h, w = sizes[r]
        torch.testing.assert_close(out[r, :, :h, :w], norm(roi)[0], atol=1e-5, rtol=1e-5)
        assert out[r, :, h:].abs().sum() == 0 and out[r, :, :, w:].abs().sum() == 0


def test_masked_instance_norm_keeps_its_input_and_backpropagates():
    """The input stays untouched, and the gradient equals nn.InstanceNorm2d's on each ROI."""
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
    conv = torch.nn.Conv2d(3, 4, kernel_size, padding=kernel_size // 2)
    rois = [torch.randn(1, 3, h, w) for h, w in in_sizes]
    batch = torch.zeros(6, 3, 13, 11)
    for r, roi in enumerate(rois):
        batch[r, :, : in_sizes[r][0], : in_sizes[r][1]] = roi[0]
    in_hw, out_hw = torch.tensor(in_sizes), torch.tensor(out_sizes)
    # the same ROIs twice, split in two batches of other paddings: one matmul serves all
    out, first, second = resize_conv_rois(
        [
            (batch, in_hw, out_hw, (9, 13)),
            (batch[:2, :, :9], in_hw[:2], out_hw[:2], (8, 13)),
            (batch[2:], in_hw[2:], out_hw[2:], (7, 11)),
        ],
        conv.weight,
        conv.bias,
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
    (out,) = resize_conv_rois([(x, hw, torch.tensor([[1, 4]]), (2, 5))], weight)
    up = [2.0, 3.0, 5.0, 6.0]
    expected = [10 * up[0] + 100 * up[1], up[0] + 10 * up[1] + 100 * up[2]]
    expected += [up[1] + 10 * up[2] + 100 * up[3], up[2] + 10 * up[3]]
    torch.testing.assert_close(out[0, 0, 0, :4], torch.tensor(expected))
    assert out[0, 0, 0, 4] == 0 and out[0, 0, 1].abs().sum() == 0


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
            (mixed,) = resize_conv_rois([(crops, hw, 2 * hw, (30, 40))], torch.ones(1, 3, 3, 3))
            up = up + mixed
            grads.append(
                torch.autograd.grad((up * torch.arange(1200.0).view(30, 40)).sum(), feature)
            )
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0][0], grads[1][0]) and grads[0][0].abs().sum() > 0
