"""Point sampling of the auxiliary feature refinement (paper Sec. II-C, Table II).

Points are normalized (x, y) coordinates in [0, 1]^2 of each ROI's own valid region, read with
``align_corners=True`` on the ROI's own grid: (0, 0) is the ROI's first sample, (1, 1) its last.
The same normalized points therefore address the level-0 mask, the level-0 feature e1 and the
level-1 feature e2 of an ROI, whatever their padded sizes. ROIs have different point counts, so
points are padded to the largest count with a validity mask; all of it is batched over ROIs.

Strategies, with N_r = (h_r * w_r) // D for ROI r:
- "biased": draw int(k * N_r) uniform random points, score them by the uncertainty -|2p - 1| of the
  (detached) mask probabilities p, keep the int(beta * N_r) most uncertain (paper: k=3, beta=0.75).
- "uniform": int(beta * N_r) uniform random points, all kept (k is unused). The paper's uniform
  rows of Table II use beta = k (k=1, beta=1 and k=3, beta=3).
"""

from __future__ import annotations

import torch

from .bilinear import bilinear_tap_rows, channel_rows, gather_bilinear, linear_taps

__all__ = [
    "point_counts",
    "select_uncertain_points",
    "sample_uncertain_points",
    "point_sample_rois",
]


def point_counts(valid_hw: torch.Tensor, density: int, ratio: float) -> torch.Tensor:
    """(R,) int64 int(ratio * N_r) with N_r = (h_r * w_r) // density; valid_hw: (R, 2) (h, w)."""
    base = (valid_hw[:, 0] * valid_hw[:, 1]) // density
    return (base.double() * ratio).floor().long()


def point_sample_rois(
    x: torch.Tensor, valid_hw: torch.Tensor, points: torch.Tensor
) -> torch.Tensor:
    """Bilinear samples of each ROI's valid region at normalized points.

    Equals ``F.grid_sample(roi, 2 * points - 1, align_corners=True)`` on each unpadded ROI.

    Args:
        x: (R, C, Hp, Wp) padded ROI batch, ROI r valid in its top-left ``valid_hw[r]``.
        valid_hw: (R, 2) int64 (h, w).
        points: (R, P, 2) normalized (x, y) in [0, 1].

    Returns:
        (R, C, P) samples (reads stay inside each ROI's valid region).
    """
    num_rois, _, pad_h, pad_w = x.shape
    every = torch.ones(points.shape[:2], dtype=torch.bool, device=x.device)
    taps = []
    for axis, coord in ((0, 1), (1, 0)):  # y from the second coordinate, x from the first
        length = valid_hw[:, axis, None]
        pos = points[..., coord].double() * (length - 1).clamp(min=0)
        taps.append(linear_taps(pos, length, every, clamp_to_edge=True))
    plane_rows = (torch.arange(num_rois, device=x.device) * pad_h)[:, None]
    index, weights = bilinear_tap_rows(plane_rows, pad_w, taps[0], taps[1])
    return gather_bilinear(channel_rows(x), index, weights).transpose(1, 2)


def select_uncertain_points(
    probs: torch.Tensor,
    valid_hw: torch.Tensor,
    candidates: torch.Tensor,
    num_candidates: torch.Tensor,
    num_points: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each ROI's ``num_points`` most uncertain candidates.

    Args:
        probs: (R, 1, Hp, Wp) mask probabilities (the uncertainty -|2p - 1| is read bilinearly).
        valid_hw: (R, 2) int64 (h, w) valid region of each ROI.
        candidates: (R, M, 2) normalized (x, y) candidate points; ROI r uses its first
            ``num_candidates[r]``.
        num_candidates: (R,) int64.
        num_points: (R,) int64, at most ``num_candidates``.

    Returns:
        points (R, P, 2) with P = max(num_points), most uncertain first (ties keep the earlier
        candidate), and point_valid (R, P) bool (the first ``num_points[r]`` of row r).
    """
    with torch.no_grad():
        uncertainty = -(2 * point_sample_rois(probs, valid_hw, candidates)[:, 0] - 1).abs()
    slots = torch.arange(candidates.shape[1], device=candidates.device)
    uncertainty = uncertainty.masked_fill(slots >= num_candidates[:, None], -float("inf"))
    num_kept = int(num_points.max()) if num_points.numel() else 0
    order = torch.sort(uncertainty, dim=1, descending=True, stable=True).indices[:, :num_kept]
    points = torch.gather(candidates, 1, order[..., None].expand(-1, -1, 2))
    return points, slots[:num_kept] < num_points[:, None]


def sample_uncertain_points(
    probs: torch.Tensor,
    valid_hw: torch.Tensor,
    density: int = 8,
    oversample_ratio: float = 3.0,
    importance_ratio: float = 0.75,
    mode: str = "biased",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training points of the refinement heads (see the module docstring for the strategies).

    Args:
        probs: (R, 1, Hp, Wp) mask probabilities (detached inside), ROI r valid in ``valid_hw[r]``.
        valid_hw: (R, 2) int64 (h, w) level-0 sizes.
        density: D, N_r = (h_r * w_r) // D.
        oversample_ratio: k, candidates int(k * N_r) ("biased" only).
        importance_ratio: beta, points int(beta * N_r); must not exceed k in "biased" mode.
        mode: "biased" or "uniform".
        generator: optional generator of the random draws; they are drawn on its device and moved
            to ``probs.device``, so a CPU generator gives the same points on every device.

    Returns:
        points (R, P, 2) normalized (x, y) in [0, 1] and point_valid (R, P) bool; ROIs with
        int(beta * N_r) == 0 get no valid point. Padded points are finite but meaningless.
    """
    if mode not in ("biased", "uniform"):
        raise ValueError(f"Unknown point sampling mode {mode!r}; expected 'biased' or 'uniform'.")
    if mode == "biased" and importance_ratio > oversample_ratio:
        raise ValueError(
            "Biased sampling keeps beta*N of k*N points, so beta must not exceed k: "
            f"beta={importance_ratio}, k={oversample_ratio}."
        )
    num_points = point_counts(valid_hw, density, importance_ratio)
    num_candidates = (
        point_counts(valid_hw, density, oversample_ratio) if mode == "biased" else num_points
    )
    draws = int(num_candidates.max()) if num_candidates.numel() else 0
    device = generator.device if generator is not None else probs.device
    candidates = torch.rand((probs.shape[0], draws, 2), generator=generator, device=device)
    candidates = candidates.to(probs.device)
    if mode == "uniform":
        slots = torch.arange(draws, device=probs.device)
        return candidates, slots < num_points[:, None]
    return select_uncertain_points(probs, valid_hw, candidates, num_candidates, num_points)
