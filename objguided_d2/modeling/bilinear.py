"""Bilinear sampling by gathers: the building blocks of the ROI crops, the point sampling of the
refinement, the fused resize-conv and paste-back.

Bilinear sampling is done with gathers (an embedding-bag sum over 4 taps) instead of
``grid_sample``, whose CUDA backward is non-deterministic: forward passes are gathers and matmuls,
and their backward also runs under ``torch.use_deterministic_algorithms(True)``. Positions are in
index coordinates of the source (sample k is centred on k). Pure tensor code, batched over ROIs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "bilinear_tap_rows",
    "channel_rows",
    "gather_bilinear",
    "linear_taps",
    "rows_to_channels_last",
    "tap_matrix",
]


def linear_taps(
    pos: torch.Tensor, length: torch.Tensor, valid: torch.Tensor, clamp_to_edge: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps of 1-D linear interpolation at float positions.

    Args:
        pos: (R, K) float64 positions in index coordinates of a source of ``length`` samples.
        length: (R, 1) int64 source lengths (per ROI).
        valid: (R, K) bool; invalid positions get zero weights.
        clamp_to_edge: F.interpolate's rule (positions below 0 read sample 0, the upper tap never
            passes the last sample); otherwise taps outside the source weigh zero (zero padding).

    Returns:
        taps (2, R, K) int64 clamped into [0, length - 1] and weights (2, R, K) float64.
    """
    if clamp_to_edge:
        pos = pos.clamp(min=0)
    low = pos.floor()
    frac = pos - low
    low = low.long()
    taps = torch.stack((low, low + 1))
    weights = torch.stack((1 - frac, frac)) * valid
    last = (length - 1).clamp(min=0)
    if not clamp_to_edge:
        weights = weights * ((taps >= 0) & (taps <= last))
    taps = torch.minimum(taps.clamp(min=0), last)
    return taps, weights


def bilinear_tap_rows(
    plane_rows: torch.Tensor,
    row_width: int,
    y_taps: tuple[torch.Tensor, torch.Tensor],
    x_taps: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and weights of the 4 bilinear taps into a (planes * height * row_width) array.

    plane_rows: first row of each output's source plane (plane * height), broadcastable with the
    taps; y_taps / x_taps: (taps (2, ...), weights (2, ...)) broadcastable to a common shape S.
    Returns index (*S, 4) int64 and weights (*S, 4) float64.
    """
    (ty, wy), (tx, wx) = y_taps, x_taps
    # (2, 2, *S): tap (a, b) of row tap a and column tap b, flattened to a * 2 + b
    index = ((plane_rows + ty) * row_width)[:, None] + tx[None]
    weights = wy[:, None] * wx[None]
    return index.flatten(0, 1).movedim(0, -1), weights.flatten(0, 1).movedim(0, -1)


def gather_bilinear(rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t weights[..., t] * rows[index[..., t]]: (*S, 4) taps over (M, C) rows -> (*S, C).

    One dense embedding-bag gather: no per-tap temporaries, and its backward accumulates into a
    single gradient of ``rows``.
    """
    out = F.embedding_bag(
        index.reshape(-1, 4),
        rows,
        per_sample_weights=weights.reshape(-1, 4).to(rows.dtype),
        mode="sum",
    )
    return out.view(*index.shape[:-1], rows.shape[1])


def channel_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N * H * W, C) channels-last rows, the layout the gathers read."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def rows_to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Contiguous (R, H, W, C) -> (R, C, H, W) in channels-last memory format (a view)."""
    return x.permute(0, 3, 1, 2)


def tap_matrix(
    taps: torch.Tensor, weights: torch.Tensor, origin: torch.Tensor, length: int
) -> torch.Tensor:
    """Linear interpolation (or splatting) as a matrix: (R, K, length) float32 holding
    weights[a, r, k] at column taps[a, r, k] - origin[r] for both taps a (taps falling outside
    [0, length) are dropped); taps and weights as :func:`linear_taps` gives them, origin (R,)."""
    columns = torch.arange(length, device=taps.device)
    local = (taps - origin.view(1, -1, 1))[..., None]
    return ((local == columns) * weights.float()[..., None]).sum(dim=0)
