"""Layers of the mask branch on padded ROI batches (the convention of :mod:`.roi_crops`): each
equals the plain PyTorch layer applied to every unpadded ROI alone, and returns zeros outside
each ROI's valid region, so that the next zero-padded convolution stays exact.

Convolutions and ReLUs need no variant (their input is zero outside each ROI; a convolution's
output is multiplied by the valid mask where a norm does not follow). What does:

* :func:`masked_instance_norm`: ``nn.InstanceNorm2d`` over each ROI's valid region only;
* :func:`resize_conv_rois`: ``F.interpolate`` of each ROI to its own target size followed by a
  convolution, fused so that the convolution's channel mixing runs at the low resolution (the
  S modules' upsampling by two: a quarter of the multiply-adds).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .bilinear import (
    bilinear_tap_rows,
    channel_rows,
    gather_bilinear,
    linear_taps,
    rows_to_channels_last,
    tap_matrix,
)
from .roi_crops import valid_mask

__all__ = ["masked_instance_norm", "resize_conv_rois", "resize_rois_bilinear"]


def masked_instance_norm(
    x: torch.Tensor,
    valid: torch.Tensor,
    eps: float = 1e-5,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Instance norm of each ROI over its valid region only.

    Equals ``nn.InstanceNorm2d(C, eps, affine=weight is not None)`` applied to each unpadded ROI
    (biased variance, no running statistics).

    Args:
        x: (R, C, Hp, Wp) padded ROI batch (any values outside the valid regions).
        valid: (R, 1, Hp, Wp) bool or 0/1 float valid regions.
        eps: added to the variance.
        weight, bias: optional (C,) affine parameters.

    Returns:
        (R, C, Hp, Wp) normalized, zero outside the valid regions (and for empty ROIs).
    """
    # statistics in float32 even under autocast, as nn.InstanceNorm2d computes them
    values = x.float()
    valid = valid.to(values.dtype)
    count = valid.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    mean = (values * valid).sum(dim=(2, 3), keepdim=True) / count
    centered = (values - mean) * valid
    var = centered.square().sum(dim=(2, 3), keepdim=True) / count
    out = centered * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1) * valid
    return out.to(x.dtype)


def resize_rois_bilinear(
    x: torch.Tensor, in_hw: torch.Tensor, out_hw: torch.Tensor, pad_hw: Sequence[int]
) -> torch.Tensor:
    """Resize each ROI from its own size to its own target size.

    Reproduces ``F.interpolate(roi, size=(h_o, w_o), mode="bilinear", align_corners=False)`` of
    every unpadded ROI (per-ROI scale factors, source coordinates clamped to the ROI's edges).

    Args:
        x: (R, C, Hl, Wl) padded ROI batch, ROI r valid in its top-left ``in_hw[r]``.
        in_hw: (R, 2) int64 (h_l, w_l) source sizes.
        out_hw: (R, 2) int64 (h_o, w_o) target sizes.
        pad_hw: (Ho, Wo) padded output size, at least the largest target size.

    Returns:
        (R, C, Ho, Wo) channels-last, zero outside each ROI's target region.
    """
    num_rois, _, pad_h, pad_w = x.shape
    taps = []
    for axis, pad in enumerate(pad_hw):
        k = torch.arange(pad, dtype=torch.float64, device=x.device)
        scale = in_hw[:, axis, None].double() / out_hw[:, axis, None].clamp(min=1)
        taps.append(
            linear_taps(
                (k + 0.5) * scale - 0.5, in_hw[:, axis, None], k < out_hw[:, axis, None], True
            )
        )
    (ty, wy), (tx, wx) = taps
    plane_rows = (torch.arange(num_rois, device=x.device) * pad_h).view(-1, 1, 1)
    index, weights = bilinear_tap_rows(
        plane_rows, pad_w, (ty[..., None], wy[..., None]), (tx[:, :, None, :], wx[:, :, None, :])
    )
    return rows_to_channels_last(gather_bilinear(channel_rows(x), index, weights))


def _shifted_resize_rows(
    in_len: torch.Tensor, out_len: torch.Tensor, in_pad: int, out_pad: int, kernel_size: int
) -> torch.Tensor:
    """Interpolation matrices of one axis, one per kernel tap: (R, out_pad, in_pad, k).

    Entry [r, y, i, d] is the ``F.interpolate`` (bilinear, align_corners=False) weight of source
    sample i in output sample y + d - k // 2 of ROI r; zero when that sample or y lies outside the
    ROI's ``out_len`` (the convolution's zero padding). The leading part [:, :o, :i] of each ROI
    is its matrix for the pads o and i.
    """
    device = in_len.device
    y = torch.arange(out_pad, device=device)
    pos = (y[:, None] + torch.arange(kernel_size, device=device) - kernel_size // 2)[None]
    limit = out_len.view(-1, 1, 1)
    valid = (pos >= 0) & (pos < limit) & (y[None, :, None] < limit)
    scale = in_len.double().view(-1, 1, 1) / limit.clamp(min=1)
    taps, weights = linear_taps((pos + 0.5) * scale - 0.5, in_len.view(-1, 1, 1), valid, True)
    rows = tap_matrix(taps.flatten(2), weights.flatten(2), torch.zeros_like(in_len), in_pad)
    return rows.view(len(in_len), out_pad, kernel_size, in_pad).transpose(2, 3)


def resize_conv_rois(
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[int]]],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Bilinear resize of each ROI to its own target size, then a k x k convolution (stride 1,
    zero padding k // 2), evaluated at the source resolution, for several padded ROI batches.

    Equals ``F.conv2d(F.interpolate(roi, size=(h_o, w_o), mode="bilinear",
    align_corners=False), weight, bias, padding=k // 2)`` of every unpadded ROI. Resizing acts on
    positions and the convolution's channel mixing on channels, so they commute: the k * k
    channel mixes run as one matmul over the h_i x w_i source positions of all batches (one read
    of the weight, which the S modules' deep levels make large), and only their C_out-channel
    results are resized, shifted per tap and summed, as batched matmuls with each ROI's own
    interpolation matrices (one per axis).

    Args:
        batches: (x, in_hw, out_hw, pad_hw) each: x (R, C_in, Hi, Wi) padded ROI batch, ROI r
            valid in its top-left ``in_hw[r]`` and zero outside it; in_hw, out_hw (R, 2) int64
            (h, w) source and target sizes; pad_hw (Ho, Wo), at least the largest target size.
        weight: (C_out, C_in, k, k), k odd.
        bias: (C_out,) or None.

    Returns:
        per batch (R, C_out, Ho, Wo) channels-last, zero outside each ROI's target region.
    """
    out_channels, in_channels, k, _ = weight.shape
    # (C_in, [dy, dx, C_out]): every tap's channel mix in one matmul
    taps = weight.reshape(out_channels, -1).t().contiguous().view(in_channels, -1)
    # positions column-major: the rows of one source column then pair (source row, dy), which
    # the y matrices contract
    positions = [x.permute(0, 3, 2, 1).reshape(-1, in_channels) for x, _, _, _ in batches]
    mixed = torch.cat(positions) @ taps
    # each axis' matrices of all batches' ROIs at once, at the largest pads; every batch takes its
    # ROIs' leading parts
    matrices = [
        _shifted_resize_rows(
            torch.cat([in_hw[:, axis] for _, in_hw, _, _ in batches]),
            torch.cat([out_hw[:, axis] for _, _, out_hw, _ in batches]),
            max(x.shape[2 + axis] for x, _, _, _ in batches),
            max(int(pad_hw[axis]) for _, _, _, pad_hw in batches),
            k,
        )
        for axis in (0, 1)
    ]
    outputs = []
    first = 0
    for (x, _, out_hw, pad_hw), part in zip(batches, mixed.split([len(p) for p in positions])):
        num_rois, _, in_h, in_w = x.shape
        out_h, out_w = (int(v) for v in pad_hw)
        own = slice(first, first + num_rois)
        first += num_rois
        rows_y, rows_x = (
            m[own, :out_len, :in_len].reshape(num_rois, out_len, in_len * k).to(x.dtype)
            for m, out_len, in_len in zip(matrices, (out_h, out_w), (in_h, in_w))
        )
        part = part.view(num_rois, in_w, in_h * k, k * out_channels)
        # (R, Wi, [dx, C_out], Ho): rows pair (source column, dx), which the x matrices contract
        along_y = part.transpose(2, 3) @ rows_y.transpose(1, 2)[:, None]
        out = rows_x @ along_y.reshape(num_rois, in_w * k, out_channels * out_h)
        out = out.view(num_rois, out_w, out_channels, out_h).permute(0, 2, 3, 1)
        out = out.contiguous(memory_format=torch.channels_last)
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1) * valid_mask(out_hw, (out_h, out_w))
        outputs.append(out)
    return outputs
