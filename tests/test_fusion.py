"""The fusion block ("B" and "S" modules): by hand, its norms, and on padded ROI batches equal to
the block on each ROI alone (with fused and with separate upsampling and conv)."""

import pytest
import torch
from torch import nn

from objguided_d2.modeling.fusion import (
    FUSED_RESIZE_CONV_MIN_CHANNELS,
    FusionBlock,
    build_fusion_norm,
)
from objguided_d2.modeling.roi_crops import valid_mask

pytestmark = pytest.mark.usefixtures("single_thread")


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_fusion_block_hand_computed():
    block = FusionBlock(low_channels=1, skip_channels=1, out_channels=1, norm="")
    with torch.no_grad():
        block.conv_low.weight.zero_()
        block.conv_low.weight[0, 0, 1, 1] = 1.0  # identity 3x3 kernel
        block.conv_low.bias.zero_()
        block.conv_fuse.weight.copy_(torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
        block.conv_fuse.bias.fill_(-1.0)
    low = torch.full((1, 1, 1, 1), 2.0)  # upsampled: 2 everywhere
    skip = torch.tensor([[[[1.0, -3.0], [0.0, 5.0]]]])
    # relu(skip + 2 - 1)
    assert torch.equal(block(low, skip), torch.tensor([[[[2.0, 0.0], [1.0, 6.0]]]]))


def test_fusion_block_general_channels_and_norms():
    block = FusionBlock(low_channels=8, skip_channels=4, out_channels=6, norm="IN")
    out = block(torch.randn(2, 8, 3, 5), torch.randn(2, 4, 6, 10))
    assert out.shape == (2, 6, 6, 10)
    assert block.conv_fuse.in_channels == 4 + 6
    assert num_params(block.norm_low) == 0 and not block.norm_low.track_running_stats
    assert num_params(build_fusion_norm("IN_AFFINE", 6)) == 12
    assert isinstance(build_fusion_norm("", 6), nn.Identity)
    assert isinstance(build_fusion_norm("BN", 6), nn.BatchNorm2d)


def padded(rois: list[torch.Tensor], pad_hw: tuple[int, int]) -> torch.Tensor:
    """(R, C, Hp, Wp) batch of (1, C, h, w) ROIs, zero outside each."""
    batch = torch.zeros(len(rois), rois[0].shape[1], *pad_hw)
    for r, roi in enumerate(rois):
        batch[r, :, : roi.shape[2], : roi.shape[3]] = roi[0]
    return batch


@pytest.mark.parametrize("low_channels", [8, FUSED_RESIZE_CONV_MIN_CHANNELS])
@pytest.mark.parametrize("norm", ["IN", "IN_AFFINE"])
def test_padded_roi_batches_equal_the_block_on_each_roi(low_channels, norm):
    """Two padded batches at once; outputs and gradients equal the block run on each ROI."""
    torch.manual_seed(0)
    block = FusionBlock(low_channels=low_channels, skip_channels=5, out_channels=6, norm=norm)
    if norm == "IN_AFFINE":
        with torch.no_grad():
            for layer in (block.norm_low, block.norm_fuse):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
    assert block.fused_resize_conv == (low_channels >= FUSED_RESIZE_CONV_MIN_CHANNELS)
    low_sizes = [[(2, 3), (4, 4), (1, 5)], [(6, 2), (3, 3)]]
    skip_sizes = [[(4, 6), (8, 8), (2, 10)], [(12, 4), (6, 7)]]
    lows = [[torch.randn(1, low_channels, h, w) for h, w in sizes] for sizes in low_sizes]
    skips = [[torch.randn(1, 5, h, w) for h, w in sizes] for sizes in skip_sizes]
    low_batches = [padded(rois, (6, 5)).requires_grad_() for rois in lows]
    skip_batches = [padded(rois, (12, 10)) for rois in skips]
    roi_sizes = [(torch.tensor(a), torch.tensor(b)) for a, b in zip(low_sizes, skip_sizes)]

    outputs = block(low_batches, skip_batches, roi_sizes)

    upstream = [torch.randn_like(out) for out in outputs]
    grads = torch.autograd.grad(
        sum((out * up).sum() for out, up in zip(outputs, upstream)), low_batches
    )
    for g, (out, sizes) in enumerate(zip(outputs, skip_sizes)):
        assert out.shape == (len(sizes), 6, 12, 10)
        assert (out * ~valid_mask(torch.tensor(sizes), (12, 10))).abs().sum() == 0
        for r, (h, w) in enumerate(sizes):
            low = lows[g][r].requires_grad_()
            reference = block(low, skips[g][r])
            torch.testing.assert_close(out[r : r + 1, :, :h, :w], reference, atol=1e-5, rtol=1e-5)
            (grad,) = torch.autograd.grad((reference * upstream[g][r, :, :h, :w]).sum(), low)
            lh, lw = low_sizes[g][r]
            torch.testing.assert_close(grads[g][r : r + 1, :, :lh, :lw], grad, atol=1e-5, rtol=1e-4)


def test_padded_roi_batches_need_instance_norm():
    block = FusionBlock(low_channels=4, skip_channels=4, out_channels=4, norm="BN")
    sizes = (torch.tensor([[2, 2]]), torch.tensor([[4, 4]]))
    with pytest.raises(TypeError, match="instance norm"):
        block([torch.zeros(1, 4, 2, 2)], [torch.zeros(1, 4, 4, 4)], [sizes])
