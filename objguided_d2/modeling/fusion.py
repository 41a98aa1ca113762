"""The fusion block of the paper (Fig. 1): the "B" modules of the detection decoder (batch norm)
and the "S" modules of the mask branch (instance norm) are this one block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import get_norm
from torch import nn

from .padded_layers import masked_instance_norm, resize_conv_rois, resize_rois_bilinear
from .roi_crops import valid_mask

__all__ = ["FusionBlock", "build_fusion_norm"]

# On padded ROI batches, blocks whose deep input has at least this many channels upsample and
# convolve it fused (:func:`.padded_layers.resize_conv_rois`): mixing channels before upsampling
# saves 3/4 of conv_low's multiply-adds, while the per-ROI interpolation matrices cost the same
# whatever the channels, so the fusion pays on wide inputs and small ROIs (the deep S modules).
FUSED_RESIZE_CONV_MIN_CHANNELS = 128


def build_fusion_norm(norm: str, channels: int) -> nn.Module:
    """Norm layer of a :class:`FusionBlock`.

    Args:
        norm: a name of detectron2's :func:`get_norm` ("BN", "GN", "SyncBN", "FrozenBN", ...),
            "" for none, "IN" for instance norm without parameters or running statistics (the
            authors' "S" module) or "IN_AFFINE" for instance norm with the learnable gamma / eta of
            the paper's Eq. 6.
        channels: number of channels it normalizes.
    """
    if norm == "IN":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if norm == "IN_AFFINE":
        return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)
    return get_norm(norm, channels) or nn.Identity()


class FusionBlock(nn.Module):
    """Fuse a deep map into a shallower skip map (the paper's "B" and "S" modules).

    ``low`` is bilinearly upsampled to the size of ``skip``, then::

        up  = relu(norm_low(conv_low(upsampled low)))       # 3x3, low_channels -> out_channels
        out = relu(norm_fuse(conv_fuse(cat[skip, up])))     # 1x1, skip + out -> out_channels

    With ``out_channels == skip_channels`` this is the authors' module exactly. Weights keep
    PyTorch's default init, as the authors' code does; both convs keep their bias, whatever the
    norm.

    The same block runs on whole feature maps (the decoder, and the mask branch one ROI at a
    time) and on padded ROI batches (the mask branch's fast path): given each ROI's sizes, every
    step runs its padded-batch variant from :mod:`.padded_layers`, which equals the step on each
    ROI alone.
    """

    def __init__(self, low_channels: int, skip_channels: int, out_channels: int, norm: str):
        """
        Args:
            low_channels: channels of the deep input.
            skip_channels: channels of the shallow (skip) input.
            out_channels: channels of the output.
            norm: see :func:`build_fusion_norm`.
        """
        super().__init__()
        self.conv_low = nn.Conv2d(low_channels, out_channels, kernel_size=3, padding=1)
        self.norm_low = build_fusion_norm(norm, out_channels)
        self.conv_fuse = nn.Conv2d(skip_channels + out_channels, out_channels, kernel_size=1)
        self.norm_fuse = build_fusion_norm(norm, out_channels)
        self.fused_resize_conv = low_channels >= FUSED_RESIZE_CONV_MIN_CHANNELS

    def forward(
        self,
        low: torch.Tensor | list[torch.Tensor],
        skip: torch.Tensor | list[torch.Tensor],
        roi_sizes: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """
        Args:
            low: (N, low_channels, h, w) deep features; with ``roi_sizes``, a list of padded ROI
                batches (R_g, low_channels, h_g, w_g), zero outside each ROI.
            skip: (N, skip_channels, H, W) shallow features; with ``roi_sizes``, a list of padded
                ROI batches (R_g, skip_channels, H_g, W_g), zero outside each ROI.
            roi_sizes: for padded ROI batches, per batch the (R_g, 2) int64 (h, w) of each ROI
                in ``low`` and in ``skip``; the block then needs instance norm. The batches run
                together: the deep S modules' conv_low weights are read once for all.

        Returns:
            (N, out_channels, H, W); for ROI batches, per batch (R_g, out_channels, H_g, W_g),
            zero outside each ROI's region of ``skip``.
        """
        if roi_sizes is None:
            up = F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            return self._fuse(skip, self.conv_low(up), None)
        batches = [
            (x, low_hw, skip_hw, target.shape[-2:])
            for x, target, (low_hw, skip_hw) in zip(low, skip, roi_sizes)
        ]
        if self.fused_resize_conv:
            ups = resize_conv_rois(batches, self.conv_low.weight, self.conv_low.bias)
        else:
            ups = [self.conv_low(resize_rois_bilinear(*batch)) for batch in batches]
        return [
            self._fuse(target, up, valid_mask(skip_hw, target.shape[-2:]))
            for target, up, (_, skip_hw) in zip(skip, ups, roi_sizes)
        ]

    def _fuse(
        self, skip: torch.Tensor, up: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """The block after conv_low: norm, ReLU, concatenation with skip, conv_fuse, norm, ReLU."""
        up = F.relu(self._norm(self.norm_low, up, valid))
        return F.relu(self._norm(self.norm_fuse, self.conv_fuse(torch.cat([skip, up], 1)), valid))

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if valid is None:
            return norm(x)
        if not isinstance(norm, nn.InstanceNorm2d):
            raise TypeError(
                f"a FusionBlock runs on padded ROI batches with instance norm only, not {norm}"
            )
        return masked_instance_norm(x, valid, norm.eps, norm.weight, norm.bias)
