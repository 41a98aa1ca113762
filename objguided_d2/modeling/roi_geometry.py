"""Geometry of the object-guided mask branch: size-adaptive ROI pyramids, batched crops, masked
per-ROI operations on padded ROI batches, paste-back and mask NMS.

Pure tensor code (no detectron2 types). Everything is batched over ROIs (Python loops run over
levels, size groups, images or memory chunks only) and runs on CPU and CUDA. Bilinear sampling
is done with gathers (an embedding-bag sum over 4 taps) instead of ``grid_sample``, whose CUDA
backward is non-deterministic: forward passes are gathers and matmuls, and the crops' backward
also runs under ``torch.use_deterministic_algorithms(True)``.

Coordinates
    Boxes are XYXY in detectron2's continuous pixel coordinates (pixel k spans [k, k + 1]).
    Sample positions are in pixel-index coordinates (pixel k is centred on k), so a box's centre
    is ((x1 + x2) / 2 - 0.5, (y1 + y2) / 2 - 0.5). Cell j of a stride-s feature map is centred on
    input pixel (j + 0.5) * s - 0.5, i.e. input position x reads the map at u = (x + 0.5) / s - 0.5
    (bilinear, zero outside the map).

ROI pyramid
    An ROI is its box scaled by ``enlarge`` about the centre: (w', h'). Level i (stride s_i) samples
    int(h' / s_i) x int(w' / s_i) points spanning the enlarged box end to end,
    x_k = cx - w'/2 + k * w' / (n - 1), k = 0..n-1 (same in y). Levels stop at the first one whose
    h' / s_i or w' / s_i is below ``min_size``; an ROI whose level 0 fails has no level (skipped).

Padded ROI batches
    ROIs of different sizes travel as (R, C, Hp, Wp) tensors: ROI r occupies its top-left
    h_r x w_r corner (its "valid region", see :func:`valid_mask`) and is zero elsewhere.
    Invariant for code that runs layers on such batches: a zero-padded convolution
    (padding = k // 2) gives, inside the valid region, exactly what it gives on the ROI alone iff
    its input is zero outside the valid region. A conv writes outside it (border taps, bias), so
    multiply by the valid mask before the next conv (or, for :func:`conv2d_by_taps`, pass it).
    :func:`masked_instance_norm` (by default), :func:`resize_rois_bilinear` and
    :func:`resize_conv_rois` return zeros outside, and ReLU keeps zeros; position-wise layers
    (1 x 1 convs) may run on anything outside if what follows masks. Crops and resizes come in
    channels-last memory format, which elementwise ops keep: the convolutions on these small,
    many-channel maps run up to 1.7x faster on a CPU than in NCHW, and the gathers read
    channels-last feature maps without a transposed copy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "RoiPyramid",
    "RoiGroup",
    "build_roi_pyramid",
    "valid_mask",
    "group_rois",
    "crop_rois",
    "crop_roi_groups",
    "crop_masks",
    "masked_instance_norm",
    "scale_fresh",
    "resize_rois_bilinear",
    "conv_weight_taps",
    "resize_conv_rois",
    "resize_conv_pays",
    "conv1x1_concat",
    "conv2d_by_taps",
    "MaskWindows",
    "paste_mask_windows",
    "mask_to_boxes",
    "mask_nms",
    # bilinear-gather building blocks shared with point_sampling
    "linear_taps",
    "bilinear_tap_rows",
    "gather_bilinear",
    "channel_rows",
]


@dataclass
class RoiPyramid:
    """Size-adaptive crop grids of R ROIs over L levels (see the module docstring).

    Attributes:
        centers: (R, 2) float64 (cx, cy) box centres in pixel-index coordinates.
        sizes: (R, 2) float64 (w', h') enlarged box sizes in input pixels.
        level_hw: (R, L, 2) int64 (h, w) samples per level; zero at levels beyond the ROI's last.
        num_levels: (R,) int64 levels of each ROI; 0 means the ROI is skipped.
        strides: the L level strides, e.g. (1, 2, 4, 8, 16).
    """

    centers: torch.Tensor
    sizes: torch.Tensor
    level_hw: torch.Tensor
    num_levels: torch.Tensor
    strides: tuple[int, ...]

    def __len__(self) -> int:
        return self.centers.shape[0]

    def __getitem__(self, index: torch.Tensor | slice) -> RoiPyramid:
        """The pyramid of a subset of ROIs (index: (K,) int64, (R,) bool or a slice)."""
        return RoiPyramid(
            centers=self.centers[index],
            sizes=self.sizes[index],
            level_hw=self.level_hw[index],
            num_levels=self.num_levels[index],
            strides=self.strides,
        )


@dataclass
class RoiGroup:
    """ROIs batched together: same number of levels, padded to common sizes per level.

    Attributes:
        indices: (G,) int64 indices into the pyramid the group was built from.
        pad_hw: one (Hp, Wp) per level of the group (its ROIs' largest crop at that level).
    """

    indices: torch.Tensor
    pad_hw: tuple[tuple[int, int], ...]

    @property
    def num_levels(self) -> int:
        return len(self.pad_hw)


def build_roi_pyramid(
    boxes: torch.Tensor,
    strides: Sequence[int] = (1, 2, 4, 8, 16),
    enlarge: float = 1.1,
    min_size: float = 2.0,
) -> RoiPyramid:
    """Crop grids of the enlarged boxes at every level.

    Args:
        boxes: (R, 4) XYXY boxes in network-input pixels (continuous coordinates).
        strides: stride of each level, shallowest first.
        enlarge: factor applied to the box width and height about its centre.
        min_size: smallest side (in level units) a level may have.

    Returns:
        The :class:`RoiPyramid` (on ``boxes.device``). Sizes are decided in float64 so that e.g.
        1.1 * 30 gives 33 samples on every device.
    """
    boxes = boxes.to(torch.float64)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2 - 0.5
    sizes = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0) * enlarge
    stride_t = torch.tensor(strides, dtype=torch.float64, device=boxes.device)
    # (R, L, 2) level sizes in level units, (h, w) order
    level_sides = sizes.flip(1)[:, None, :] / stride_t[None, :, None]
    fits = (level_sides >= min_size).all(dim=2)
    # levels stop at the first that fails: keep the leading run of True
    fits = fits.cumprod(dim=1).bool()
    level_hw = level_sides.floor().long() * fits[:, :, None]
    return RoiPyramid(
        centers=centers,
        sizes=sizes,
        level_hw=level_hw,
        num_levels=fits.sum(dim=1),
        strides=tuple(int(s) for s in strides),
    )


def valid_mask(hw: torch.Tensor, pad_hw: Sequence[int]) -> torch.Tensor:
    """(R, 1, Hp, Wp) bool mask of each ROI's top-left h x w valid region; hw: (R, 2) (h, w)."""
    rows = torch.arange(pad_hw[0], device=hw.device)
    cols = torch.arange(pad_hw[1], device=hw.device)
    inside = (rows[None, :, None] < hw[:, 0, None, None]) & (
        cols[None, None, :] < hw[:, 1, None, None]
    )
    return inside[:, None]


def _size_buckets(sizes: torch.Tensor, ratio: float, min_size: float) -> torch.Tensor:
    """Geometric bucket of each size: sizes sharing a bucket differ by less than ``ratio``
    (all sizes up to ``min_size * ratio`` share bucket 0)."""
    scaled = sizes.to(torch.float64).clamp(min=min_size) / min_size
    # the epsilon puts sizes exactly on a bucket edge (e.g. 10 = 8 * 1.25) in the upper bucket
    return (scaled.log() / math.log(ratio) + 1e-9).floor().long()


def _split_by_key(keys: torch.Tensor) -> list[torch.Tensor]:
    """Indices of equal rows of ``keys`` (M, K) int64, groups in key order, members in index
    order."""
    if keys.shape[0] == 0:
        return []
    _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    order = torch.sort(inverse, stable=True).indices
    return list(torch.split(order, counts.tolist()))


def _cheapest_cut(sides: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """The cut of n >= 2 ROIs with (n, 2) int sides into two groups, between consecutive ROIs in
    the order of their heights or of their widths, whose groups pad to the least area:
    (that area, positions of the first group, positions of the second)."""
    counts = np.arange(1, sides.shape[0])
    best = None
    for axis in (0, 1):
        order = np.argsort(sides[:, axis], kind="stable")
        ordered = sides[order]
        # padded area of ordered[: k + 1] and of ordered[k + 1 :], k = 0 .. n - 2
        head = counts * np.maximum.accumulate(ordered)[:-1].prod(axis=1)
        tail = counts[::-1] * np.maximum.accumulate(ordered[::-1])[::-1][1:].prod(axis=1)
        cut = int((head + tail).argmin())
        if best is None or head[cut] + tail[cut] < best[0]:
            best = (int(head[cut] + tail[cut]), order[: cut + 1], order[cut + 1 :])
    return best


def _cut_while_padding_shrinks(sides: np.ndarray, min_saving: int) -> list[np.ndarray]:
    """Groups of the ROIs with (n, 2) int sides: one group, cut by :func:`_cheapest_cut` as long
    as a cut saves more than ``min_saving`` of padded area. Positions into ``sides``, sorted."""
    groups, pending = [], [np.arange(sides.shape[0])]
    while pending:
        members = pending.pop()
        if len(members) > 1:
            area, first, second = _cheapest_cut(sides[members])
            padded = len(members) * int(sides[members].max(axis=0).prod())
            if padded - area > min_saving:
                pending += [members[second], members[first]]  # the smaller sides come out first
                continue
        groups.append(np.sort(members))
    return groups


def group_rois(
    pyramid: RoiPyramid, min_saving: int = 1000, max_group_pixels: int | None = None
) -> list[RoiGroup]:
    """Split the ROIs into batches that pad little.

    ROIs of one group have the same number of levels. Starting from one group per number of
    levels, a group is cut in two between consecutive ROIs in the order of their level-0 heights
    or widths (wherever the two halves pad least) as long as the cut saves more than
    ``min_saving`` padded level-0 pixels: every group costs the same few hundred small
    operations, on a CPU about what the mask branch spends on a thousand level-0 pixels.

    Args:
        pyramid: R ROIs; skipped ROIs (no level) belong to no group.
        min_saving: padded level-0 pixels a cut must save (0: cut while it saves any).
        max_group_pixels: if given, groups are split into consecutive chunks so that
            G * Hp * Wp at level 0 stays within it (a group always keeps at least one ROI).

    Returns:
        Groups by number of levels, members in index order; every kept ROI is in one.
    """
    kept = torch.nonzero(pyramid.num_levels > 0).squeeze(1)
    level_hw = pyramid.level_hw[kept].cpu().numpy()
    num_levels = pyramid.num_levels[kept].cpu().numpy()
    members = []
    for levels in np.unique(num_levels):
        subset = np.flatnonzero(num_levels == levels)
        members += [
            subset[group] for group in _cut_while_padding_shrinks(level_hw[subset, 0], min_saving)
        ]
    if max_group_pixels is not None:
        limits = [
            max(1, max_group_pixels // int(level_hw[m, 0].max(axis=0).prod())) for m in members
        ]
        members = [
            m[i : i + limit] for m, limit in zip(members, limits) for i in range(0, len(m), limit)
        ]
    groups = []
    for m in members:
        pads = level_hw[m, : num_levels[m[0]]].max(axis=0).tolist()
        indices = kept[torch.from_numpy(m).to(kept.device)]
        groups.append(RoiGroup(indices=indices, pad_hw=tuple(tuple(pad) for pad in pads)))
    return groups


# ---------------------------------------------------------------------------------------------
# Bilinear sampling by gathers
# ---------------------------------------------------------------------------------------------


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


def _consecutive_slices(lengths: Sequence[int]) -> list[slice]:
    """Slices of consecutive runs of the given lengths: [0, l0), [l0, l0 + l1), ..."""
    ends = list(itertools.accumulate(lengths))
    return [slice(end - length, end) for length, end in zip(lengths, ends)]


def channel_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N * H * W, C) channels-last rows, the layout the gathers read."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _rows_to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Contiguous (R, H, W, C) -> (R, C, H, W) in channels-last memory format (a view)."""
    return x.permute(0, 3, 1, 2)


def _level_positions(
    pyramid: RoiPyramid, level: int, pad_hw: Sequence[int]
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Sample positions of every ROI at ``level`` in that level's map coordinates.

    Returns ((y (R, Hp), y_valid (R, Hp)), (x (R, Wp), x_valid (R, Wp))), float64 positions
    u = (x + 0.5) / s - 0.5 of x_k = c - size / 2 + k * size / (n - 1); padded entries invalid.
    """
    stride = pyramid.strides[level]
    axes = []
    for axis, pad in ((1, pad_hw[0]), (0, pad_hw[1])):
        count = pyramid.level_hw[:, level, 1 - axis]
        k = torch.arange(pad, dtype=torch.float64, device=count.device)
        size = pyramid.sizes[:, axis, None]
        step = size / (count[:, None] - 1).clamp(min=1)
        pos = pyramid.centers[:, axis, None] - size / 2 + k * step
        axes.append(((pos + 0.5) / stride - 0.5, k < count[:, None]))
    return axes[0], axes[1]


def _crop_taps(
    pyramid: RoiPyramid, level: int, pad_hw: Sequence[int], height: int, width: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Zero-padded bilinear taps of each ROI's crop grid on a height x width map, shaped to
    broadcast to (R, Hp, Wp)."""
    (y, y_valid), (x, x_valid) = _level_positions(pyramid, level, pad_hw)
    heights = torch.full_like(y[:, :1], height, dtype=torch.long)
    widths = torch.full_like(x[:, :1], width, dtype=torch.long)
    ty, wy = linear_taps(y, heights, y_valid, clamp_to_edge=False)
    tx, wx = linear_taps(x, widths, x_valid, clamp_to_edge=False)
    return (ty[..., None], wy[..., None]), (tx[:, :, None, :], wx[:, :, None, :])


def _crop_packed(
    feature: torch.Tensor,
    batch_index: torch.Tensor,
    pyramid: RoiPyramid,
    level: int,
    batches: Sequence[tuple[torch.Tensor, tuple[int, int]]],
) -> list[torch.Tensor]:
    """Crops of several padded batches (ROI subset (G,) int64, (Hp, Wp)) of one level: one
    gather for all."""
    _, channels, height, width = feature.shape
    rois = torch.cat([subset for subset, _ in batches])
    # Each axis' taps of all the batches' ROIs at once, up to the largest pad; every batch takes
    # its rows and its own pad (positions past an ROI's own size weigh zero either way).
    largest_pad = [max(pad_hw[axis] for _, pad_hw in batches) for axis in (0, 1)]
    (ty, wy), (tx, wx) = _crop_taps(pyramid[rois], level, largest_pad, height, width)
    plane_rows = (batch_index[rois] * height).view(-1, 1, 1)
    indices, weights, shapes = [], [], []
    owns = _consecutive_slices([len(subset) for subset, _ in batches])
    for (subset, (pad_h, pad_w)), own in zip(batches, owns):
        index, weight = bilinear_tap_rows(
            plane_rows[own],
            width,
            (ty[:, own, :pad_h], wy[:, own, :pad_h]),
            (tx[:, own, :, :pad_w], wx[:, own, :, :pad_w]),
        )
        indices.append(index.reshape(-1, 4))
        weights.append(weight.reshape(-1, 4))
        shapes.append((len(subset), pad_h, pad_w))
    samples = gather_bilinear(channel_rows(feature), torch.cat(indices), torch.cat(weights))
    sizes = [g * h * w for g, h, w in shapes]
    return [
        _rows_to_channels_last(part.view(*shape, channels))
        for part, shape in zip(torch.split(samples, sizes), shapes)
    ]


def crop_roi_groups(
    feature: torch.Tensor,
    batch_index: torch.Tensor,
    pyramid: RoiPyramid,
    level: int,
    groups: Sequence[RoiGroup],
) -> list[torch.Tensor]:
    """Crop one level for several ROI groups with a single gather.

    One gather per level keeps the backward to a single gradient accumulation into ``feature``
    however many groups there are (cropping group by group would add one full-size gradient of
    ``feature`` per group).

    Args:
        feature: (N, C, H, W) the level's map, stride ``pyramid.strides[level]``.
        batch_index: (R,) int64 image of each ROI of ``pyramid``.
        pyramid: the R ROIs.
        level: level to crop; every group must have it (``level < group.num_levels``).
        groups: index groups into ``pyramid`` with their pads.

    Returns:
        Per group a (G, C, Hp, Wp) channels-last tensor (Hp, Wp = ``group.pad_hw[level]``): ROI
        crops sampled bilinearly at the pyramid's positions, zero outside each ROI's valid region.
    """
    if not groups:
        return []
    batches = [(group.indices, group.pad_hw[level]) for group in groups]
    return _crop_packed(feature, batch_index, pyramid, level, batches)


def crop_rois(
    feature: torch.Tensor,
    batch_index: torch.Tensor,
    pyramid: RoiPyramid,
    level: int,
    pad_hw: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop one level for all ROIs into one padded batch.

    Args:
        feature: (N, C, H, W) the level's map, stride ``pyramid.strides[level]``.
        batch_index: (R,) int64 image of each ROI.
        pyramid: the R ROIs.
        level: level to crop.
        pad_hw: (Hp, Wp), at least the largest (h, w) of the level.

    Returns:
        crops (R, C, Hp, Wp) channels-last, zero outside each ROI's valid region (ROIs without
        this level are all zero), and valid (R, 1, Hp, Wp) bool.
    """
    pad_hw = (int(pad_hw[0]), int(pad_hw[1]))
    every = torch.arange(len(pyramid), device=batch_index.device)
    (crops,) = _crop_packed(feature, batch_index, pyramid, level, [(every, pad_hw)])
    return crops, valid_mask(pyramid.level_hw[:, level], pad_hw)


def crop_masks(
    masks: torch.Tensor,
    pyramid: RoiPyramid,
    pad_hw: Sequence[int],
    mask_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft ROI masks: each ROI's mask sampled bilinearly on its level-0 grid.

    Only the 4 taps of every sample are read from ``masks`` (no float copy of the full masks).

    Args:
        masks: (M, H, W) bool, uint8 or float masks at network-input resolution.
        pyramid: the R ROIs.
        pad_hw: (Hp, Wp), at least the largest level-0 (h, w).
        mask_index: (R,) int64 mask of each ROI; default ROI r reads mask r.

    Returns:
        (R, 1, Hp, Wp) float32 in [0, 1], zero outside each ROI's valid region.
    """
    num_rois = len(pyramid)
    height, width = masks.shape[1:]
    if mask_index is None:
        mask_index = torch.arange(num_rois, device=masks.device)
    y_taps, x_taps = _crop_taps(pyramid, 0, pad_hw, height, width)
    plane_rows = (mask_index * height).view(-1, 1, 1)
    index, weights = bilinear_tap_rows(plane_rows, width, y_taps, x_taps)
    values = masks.reshape(-1)[index].to(torch.float64)
    return (values * weights).sum(dim=-1).float()[:, None]


def masked_instance_norm(
    x: torch.Tensor,
    valid: torch.Tensor,
    eps: float = 1e-5,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    zero_outside: bool = True,
) -> torch.Tensor:
    """Instance norm of each ROI over its valid region only.

    Equals ``nn.InstanceNorm2d(C, eps, affine=weight is not None)`` applied to each unpadded ROI
    (biased variance, no running stats).

    Args:
        x: (R, C, Hp, Wp) padded ROI batch (any values outside the valid regions).
        valid: (R, 1, Hp, Wp) bool or 0/1 float valid regions.
        eps: added to the variance.
        weight, bias: optional (C,) affine parameters.
        zero_outside: zero the output outside the valid regions; False leaves there whatever
            the normalization gives (one pass less, for a consumer that ignores those positions).

    Returns:
        (R, C, Hp, Wp) normalized, zero outside the valid regions (and for empty ROIs) if
        ``zero_outside``.
    """
    # statistics in float32 even under autocast, as nn.InstanceNorm2d computes them
    values = x.float()
    num_rois, channels = values.shape[:2]
    valid = valid.to(values.dtype)
    count = valid.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    # masked sums as one (1, P) @ (P, C) matmul per ROI: no masked copy (positions are a view of
    # a channels-last map)
    valid_rows = valid.reshape(num_rois, 1, -1)

    def masked_mean(maps: torch.Tensor) -> torch.Tensor:
        sums = torch.bmm(valid_rows, channel_rows(maps).view(num_rois, -1, channels))
        return sums.view(num_rois, channels, 1, 1) / count

    centered = values - masked_mean(values)
    if zero_outside:
        centered.mul_(valid)  # in place on a fresh temporary, not saved for the backward
        var = centered.square().sum(dim=(2, 3), keepdim=True) / count
    else:
        var = masked_mean(centered.square())
    out = scale_fresh(centered, torch.rsqrt(var + eps))
    if weight is not None:
        out = scale_fresh(out, weight.view(1, -1, 1, 1))
    if bias is not None:
        out = out + (bias.view(1, -1, 1, 1) * valid if zero_outside else bias.view(1, -1, 1, 1))
    return out.to(x.dtype)


def scale_fresh(fresh: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``fresh * factor`` (``factor`` broadcastable to ``fresh``'s shape) for a temporary
    ``fresh`` of the caller's own: in place when autograd does not record the product (grad mode
    off, as at inference, or neither tensor requiring a gradient), since a new map's first-touch
    page faults cost about as much again as the multiplication."""
    if torch.is_grad_enabled() and (fresh.requires_grad or factor.requires_grad):
        return fresh * factor
    return fresh.mul_(factor)


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
    return _rows_to_channels_last(gather_bilinear(channel_rows(x), index, weights))


def _one_hot_rows(taps: torch.Tensor, weights: torch.Tensor, origin: torch.Tensor, length: int):
    """(R, K, length) float32 matrix holding weights[a, r, k] at column taps[a, r, k] - origin[r]
    for both taps a (taps falling outside [0, length) are dropped)."""
    columns = torch.arange(length, device=taps.device)
    local = (taps - origin.view(1, -1, 1))[..., None]
    return ((local == columns) * weights.float()[..., None]).sum(dim=0)


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
    rows = _one_hot_rows(taps.flatten(2), weights.flatten(2), torch.zeros_like(in_len), in_pad)
    return rows.view(len(in_len), out_pad, kernel_size, in_pad).transpose(2, 3)


def conv_weight_taps(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, k, k) convolution weight -> contiguous (C_in, k, k, C_out), the form
    :func:`resize_conv_rois` takes. It copies the weight: arrange it once and reuse it for every
    batch of ROIs."""
    out_channels, in_channels, k, _ = weight.shape
    return weight.reshape(out_channels, -1).t().contiguous().view(in_channels, k, k, out_channels)


def resize_conv_rois(
    weight_taps: torch.Tensor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[int]]],
) -> list[torch.Tensor]:
    """Bilinear resize of each ROI to its own target size, then a k x k convolution without bias
    (stride 1, zero padding k // 2), evaluated at the source resolution, for several padded ROI
    batches at once.

    Equals ``F.conv2d(F.interpolate(roi, size=(h_o, w_o), mode="bilinear",
    align_corners=False), weight, padding=k // 2)`` of every unpadded ROI. Resizing acts on
    positions and the convolution's channel mixing on channels, so they commute: the k * k
    channel mixes run as one matmul over the h_i x w_i source positions of all batches (a quarter
    of the positions when upsampling by two, as the S modules do; one matmul reads the weight
    once), and only their C_out-channel results are resized, shifted per tap and summed, as
    batched matmuls with each ROI's own interpolation matrices (one per axis). That pays when
    C_in is large against the ROI sides (see :func:`resize_conv_pays`).

    Args:
        weight_taps: (C_in, k, k, C_out), :func:`conv_weight_taps` of the weight; k odd.
        batches: (x, in_hw, out_hw, pad_hw) each: x (R, C_in, Hi, Wi) padded ROI batch, ROI r
            valid in its top-left ``in_hw[r]`` and zero outside it; in_hw, out_hw (R, 2) int64
            (h, w) source and target sizes; pad_hw (Ho, Wo), at least the largest target size.

    Returns:
        per batch (R, C_out, Ho, Wo) channels-last, zero outside each ROI's target region.
    """
    in_channels, k, _, out_channels = weight_taps.shape
    # Channel mixes of every tap (dy, dx) at every source position, positions column-major: the
    # rows of one source column then pair (source row, dy), which the y matrices contract.
    positions = [x.permute(0, 3, 2, 1).reshape(-1, in_channels) for x, _, _, _ in batches]
    mixed = torch.cat(positions) @ weight_taps.view(in_channels, -1)
    # Each axis' matrices of all the batches' ROIs at once, at the largest pads; every batch takes
    # its ROIs' leading parts.
    in_hw_all = torch.cat([in_hw for _, in_hw, _, _ in batches])
    out_hw_all = torch.cat([out_hw for _, _, out_hw, _ in batches])
    matrices = [
        _shifted_resize_rows(
            in_hw_all[:, axis],
            out_hw_all[:, axis],
            max(x.shape[2 + axis] for x, _, _, _ in batches),
            max(int(pad_hw[axis]) for _, _, _, pad_hw in batches),
            k,
        )
        for axis in (0, 1)
    ]
    outputs = []
    owns = _consecutive_slices([x.shape[0] for x, _, _, _ in batches])
    parts = mixed.split([len(p) for p in positions])
    for (x, _, _, pad_hw), part, own in zip(batches, parts, owns):
        num_rois, _, in_h, in_w = x.shape
        out_h, out_w = (int(v) for v in pad_hw)
        rows_y, rows_x = (
            m[own, :out_len, :in_len].reshape(num_rois, out_len, in_len * k).to(x.dtype)
            for m, out_len, in_len in zip(matrices, (out_h, out_w), (in_h, in_w))
        )
        part = part.view(num_rois, in_w, in_h * k, k * out_channels)
        # (R, Wi, [dx, C_out], Ho): rows pair (source column, dx), which the x matrices contract
        along_y = part.transpose(2, 3) @ rows_y.transpose(1, 2)[:, None]
        out = rows_x @ along_y.reshape(num_rois, in_w * k, out_channels * out_h)
        out = out.view(num_rois, out_w, out_channels, out_h).permute(0, 2, 3, 1)
        outputs.append(out.contiguous(memory_format=torch.channels_last))
    return outputs


# Costs of the fused path's overheads in convolution multiply-adds, measured on a CPU on the S
# modules' shapes: the batched small matmuls of the resize matrices run at about an eighth of a
# convolution's rate, and every element of the k * k * C_out tap maps is written and read once.
_MATMUL_COST = 8.0
_TAP_MAP_ELEMENT_COST = 16.0


def resize_conv_pays(
    in_channels: int, kernel_size: int, in_hw: Sequence[int], out_hw: Sequence[int]
) -> bool:
    """Whether :func:`resize_conv_rois` is cheaper than resizing and then convolving (padded
    sizes in_hw -> out_hw). Per output channel, mixing at the low resolution saves
    k * k * C_in * (Ho * Wo - Hi * Wi) multiply-adds; the resize matrices cost
    k * Ho * Wi * (k * Hi + Wo) and the tap maps hold k * k * Hi * Wi elements."""
    k, (in_h, in_w), (out_h, out_w) = kernel_size, in_hw, out_hw
    saved = k * k * in_channels * (out_h * out_w - in_h * in_w)
    matmuls = k * out_h * in_w * (k * in_h + out_w)
    return _MATMUL_COST * matmuls + _TAP_MAP_ELEMENT_COST * k * k * in_h * in_w < saved


def conv1x1_concat(
    inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv2d(torch.cat(inputs, dim=1), weight, bias)`` for a 1 x 1 ``weight``, as one matmul
    per input over its positions, without the concatenated copy.

    The positions of channels-last inputs are views, so nothing is copied (PyTorch's CPU
    convolution runs 1 x 1 convs of fewer than 16 images on one thread through a slow per-sample
    path, after the concatenation's copy).

    Args:
        inputs: (N, C_i, H, W) each, channels summing to C_in.
        weight: (C_out, C_in, 1, 1).
        bias: (C_out,) or None.

    Returns:
        (N, C_out, H, W), channels-last.
    """
    num, _, height, width = inputs[0].shape
    weights = weight.flatten(1).split([x.shape[1] for x in inputs], dim=1)
    (first, first_weight), *rest = ((channel_rows(x), part.t()) for x, part in zip(inputs, weights))
    out = first @ first_weight if bias is None else torch.addmm(bias, first, first_weight)
    for rows, part in rest:
        out.addmm_(rows, part)
    return out.view(num, height, width, -1).permute(0, 3, 1, 2)


def conv2d_by_taps(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2)`` (stride 1) as one channel mix into the
    k * k * C_out tap maps and a sum of their shifted copies.

    Several times faster on a CPU than the direct kernels when C_out is tiny (a predictor's single
    logit map), where those spend their time on per-output bookkeeping.

    Args:
        x: (N, C_in, H, W).
        weight: (C_out, C_in, k, k), k odd.
        bias: (C_out,) or None.
        valid: optional (N, 1, H, W) bool or 0 / 1 mask; x counts as zero outside it (for a
            padded ROI batch whose x need not be zero there).

    Returns:
        (N, C_out, H, W), channels-last.
    """
    num, in_channels, height, width = x.shape
    out_channels, _, k, _ = weight.shape
    taps = weight.permute(1, 2, 3, 0).reshape(in_channels, -1)
    # (N, H, W, k, k, C_out), rows of the positions: a view of a channels-last x
    mixed = (x.permute(0, 2, 3, 1) @ taps).view(num, height, width, k, k, out_channels)
    if valid is not None:
        # zeroing a position's k * k * C_out tap values zeroes its input (C_in values)
        mixed = scale_fresh(mixed, valid.to(mixed.dtype).view(num, height, width, 1, 1, 1))
    mixed = F.pad(mixed, (0, 0, 0, 0, 0, 0) + (k // 2,) * 4)
    out = sum(
        mixed[:, dy : dy + height, dx : dx + width, dy, dx] for dy in range(k) for dx in range(k)
    )
    out = out.permute(0, 3, 1, 2)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Paste-back into mask windows
# ---------------------------------------------------------------------------------------------


@dataclass
class MaskWindows:
    """Binary masks of R objects in one H x W image, each stored as a window of the image that
    holds all of the mask (ragged, concatenated).

    Paste-back writes them and mask NMS reads them, so that only the masks NMS keeps are ever
    written out at full size (:meth:`to_masks`).

    Attributes:
        pixels: (P,) bool, the windows' pixels, each window row-major, windows one after another.
        origins: (R, 2) int64 (y, x) image position of each window's top-left pixel.
        shapes: (R, 2) int64 (h, w) of each window (inside the image).
        boxes: (R, 4) float32 tight XYXY box of each mask, as :func:`mask_to_boxes` gives it
            (zeros for an empty mask).
        image_hw: (H, W).
        offsets: (R,) int64 position of each window's first pixel in ``pixels`` (derived from
            ``shapes``).
    """

    pixels: torch.Tensor
    origins: torch.Tensor
    shapes: torch.Tensor
    boxes: torch.Tensor
    image_hw: tuple[int, int]
    offsets: torch.Tensor = field(init=False)

    def __post_init__(self):
        sizes = self.shapes.prod(dim=1)
        self.offsets = torch.cumsum(sizes, 0) - sizes

    def __len__(self) -> int:
        return self.shapes.shape[0]

    @classmethod
    def from_masks(cls, masks: torch.Tensor) -> MaskWindows:
        """Full-image (R, H, W) bool masks as windows covering the whole image."""
        num, height, width = masks.shape
        device = masks.device
        return cls(
            pixels=masks.reshape(-1),
            origins=torch.zeros(num, 2, dtype=torch.long, device=device),
            shapes=torch.tensor([height, width], device=device).repeat(num, 1),
            boxes=mask_to_boxes(masks),
            image_hw=(height, width),
        )

    @classmethod
    def empty(cls, image_hw: Sequence[int], device: torch.device | str = "cpu") -> MaskWindows:
        """No mask, in an (H, W) image."""
        return cls.from_masks(torch.zeros((0, *image_hw), dtype=torch.bool, device=device))

    @classmethod
    def cat(cls, parts: Sequence[MaskWindows]) -> MaskWindows:
        """The windows of several parts (same image size, at least one part), in order."""
        return cls(
            pixels=torch.cat([part.pixels for part in parts]),
            origins=torch.cat([part.origins for part in parts]),
            shapes=torch.cat([part.shapes for part in parts]),
            boxes=torch.cat([part.boxes for part in parts]),
            image_hw=parts[0].image_hw,
        )

    def read(self, which: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Pixels of masks ``which`` at image positions: which, rows, cols broadcastable to a
        common shape (e.g. (K, 1, 1), (K, h, 1), (K, 1, w)). Positions outside a mask's window
        read its nearest window pixel."""
        origin_y, origin_x = self.origins[which].unbind(-1)
        height, width = self.shapes[which].unbind(-1)
        local_y = torch.minimum((rows - origin_y).clamp(min=0), height - 1)
        local_x = torch.minimum((cols - origin_x).clamp(min=0), width - 1)
        return self.pixels[self.offsets[which] + local_y * width + local_x]

    def to_masks(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Full-image masks (K, H, W) bool of the masks ``index`` ((K,) int64, default all), in
        that order. Only their foreground pixels are written."""
        device = self.pixels.device
        if index is None:
            index = torch.arange(len(self), device=device)
        masks = torch.zeros((len(index), *self.image_hw), dtype=torch.bool, device=device)
        row_of = torch.full((len(self),), -1, dtype=torch.long, device=device)
        row_of[index] = torch.arange(len(index), device=device)
        position = torch.nonzero(self.pixels).squeeze(1)
        window = torch.searchsorted(self.offsets, position, right=True) - 1
        wanted = row_of[window] >= 0
        position, window = position[wanted], window[wanted]
        local = position - self.offsets[window]
        width = self.shapes[window, 1]
        rows = self.origins[window, 0] + torch.div(local, width, rounding_mode="floor")
        cols = self.origins[window, 1] + local % width
        masks[row_of[window], rows, cols] = True
        return masks


def paste_mask_windows(
    probs: torch.Tensor,
    pyramid: RoiPyramid,
    input_hw: Sequence[int],
    output_hw: Sequence[int] | None = None,
    threshold: float = 0.5,
    max_chunk_bytes: int = 1 << 28,
) -> MaskWindows:
    """Paste level-0 ROI probabilities back into the image as binary masks, each in its ROI's
    window of the image (:meth:`MaskWindows.to_masks` gives full-image masks).

    Each ROI sample (position from the pyramid) splats p * w and w onto its 4 integer neighbours
    with bilinear weights w; the canvas value is sum(p * w) / sum(w) (0 where nothing lands). When
    ``output_hw`` differs, the soft canvas is resized bilinearly (align_corners=False,
    x_out + 0.5 = (x_in + 0.5) * W / w per axis) before thresholding (value >= threshold).
    Splatting and resizing are separable, so both run as batched matmuls on each ROI's window.

    Args:
        probs: (R, 1, Hp, Wp) level-0 ROI probabilities, ROI r valid in its level-0 (h, w).
        pyramid: the R ROIs (their boxes in the ``input_hw`` image).
        input_hw: (h, w) image the boxes refer to.
        output_hw: (H, W) size of the masks; default ``input_hw``.
        threshold: probability at or above which a pixel is foreground.
        max_chunk_bytes: rough bound on the temporaries of one chunk of ROIs.

    Returns:
        The R masks' windows in an (H, W) image, with their tight boxes. Skipped ROIs give empty
        masks.
    """
    in_h, in_w = (int(v) for v in input_hw)
    out_h, out_w = (int(v) for v in (output_hw if output_hw is not None else input_hw))
    num_rois, _, pad_h, pad_w = probs.shape
    device = probs.device
    if num_rois == 0:
        return MaskWindows.empty((out_h, out_w), device)
    # the splat of a sample spacing > 1 px covers at most pad + 2 pixels per axis
    win_h, win_w = min(pad_h + 3, in_h), min(pad_w + 3, in_w)
    resize = (out_h, out_w) != (in_h, in_w)
    if resize:
        res_h = min(math.ceil((win_h + 1) * out_h / in_h) + 2, out_h)
        res_w = min(math.ceil((win_w + 1) * out_w / in_w) + 2, out_w)
    else:
        res_h, res_w = win_h, win_w
    # bytes per ROI: one-hot matrices (bool + float32 per tap), float32 canvases, the bool window
    one_hot = pad_h * win_h + pad_w * win_w + res_h * win_h + res_w * win_w
    canvases = pad_h * pad_w + win_h * pad_w + 3 * win_h * win_w + res_h * win_w + res_h * res_w
    per_roi = 10 * one_hot + 4 * canvases + res_h * res_w
    chunk = max(1, max_chunk_bytes // per_roi)
    windows, origins, boxes = [], [], []
    for start in range(0, num_rois, chunk):
        part = pyramid[start : start + chunk]
        (y, y_valid), (x, x_valid) = _level_positions(part, 0, (pad_h, pad_w))
        # (R, 2): per-ROI window origin, clamped so the window lies inside the image
        first = torch.stack((y[:, 0], x[:, 0]), dim=1).floor().long()
        limit = torch.tensor([in_h - win_h, in_w - win_w], device=device)
        origin = torch.minimum(first.clamp(min=0), limit)
        splat = []
        for pos, valid, axis, length, size in (
            (y, y_valid, 0, win_h, in_h),
            (x, x_valid, 1, win_w, in_w),
        ):
            taps, weights = linear_taps(
                pos, torch.full_like(pos[:, :1], size, dtype=torch.long), valid, False
            )
            splat.append(_one_hot_rows(taps, weights, origin[:, axis], length))
        splat_y, splat_x = splat  # (R, Hp, win_h), (R, Wp, win_w)
        p = probs[start : start + chunk, 0].float()
        numerator = splat_y.transpose(1, 2) @ p @ splat_x
        denominator = splat_y.sum(dim=1)[:, :, None] * splat_x.sum(dim=1)[:, None, :]
        soft = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-30), 0.0)
        if resize:
            resample, res_origin = [], []
            for axis, length, res_len, size_in, size_out in (
                (0, win_h, res_h, in_h, out_h),
                (1, win_w, res_w, in_w, out_w),
            ):
                scale = size_out / size_in
                first_out = ((origin[:, axis] - 0.5) * scale - 0.5).floor().long()
                o = first_out.clamp(min=0, max=size_out - res_len)
                k = torch.arange(res_len, device=device, dtype=torch.float64)
                src = (o[:, None] + k + 0.5) / scale - 0.5
                lengths = torch.full_like(o[:, None], size_in)
                taps, weights = linear_taps(
                    src, lengths, torch.ones_like(src, dtype=torch.bool), True
                )
                resample.append(_one_hot_rows(taps, weights, origin[:, axis], length))
                res_origin.append(o)
            soft = resample[0] @ soft @ resample[1].transpose(1, 2)
            origin = torch.stack(res_origin, dim=1)
        inside = soft >= threshold
        tight = mask_to_boxes(inside)
        nonempty = tight[:, 2:3] > tight[:, 0:1]
        windows.append(inside.reshape(-1))
        origins.append(origin)
        boxes.append(tight + origin.flip(1).repeat(1, 2) * nonempty)
    return MaskWindows(
        pixels=torch.cat(windows),
        origins=torch.cat(origins),
        shapes=torch.tensor([res_h, res_w], device=device).repeat(num_rois, 1),
        boxes=torch.cat(boxes),
        image_hw=(out_h, out_w),
    )


# ---------------------------------------------------------------------------------------------
# Mask boxes and mask NMS
# ---------------------------------------------------------------------------------------------


def mask_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (N, 4) float32 of (N, H, W) bool masks (x2 = last column + 1, like
    detectron2's ``BitMasks.get_bounding_boxes``, which loops over masks); empty masks give zeros.
    """
    # uint8 max-reductions are several times faster than bool any() on CPU
    as_bytes = (
        masks.view(torch.uint8) if masks.dtype == torch.bool else masks.ne(0).view(torch.uint8)
    )
    boxes = []
    for axis in (1, 2):  # columns then rows
        occupied = as_bytes.amax(dim=axis).bool()
        positions = torch.arange(occupied.shape[1], device=masks.device)
        first = torch.where(occupied, positions, occupied.shape[1]).amin(dim=1)
        last = torch.where(occupied, positions, -1).amax(dim=1)
        empty = last < 0
        boxes.append((first.masked_fill(empty, 0), (last + 1).masked_fill(empty, 0)))
    (x1, x2), (y1, y2) = boxes
    return torch.stack((x1, y1, x2, y2), dim=1).float()


def _count_in_windows(
    masks: MaskWindows,
    first: torch.Tensor,
    second: torch.Tensor | None,
    lo: torch.Tensor,
    hi: torch.Tensor,
    max_chunk_elements: int,
) -> torch.Tensor:
    """Pixels set in mask ``first[p]`` (and in mask ``second[p]`` when given) inside the image
    window [lo[p], hi[p]) ((x, y) corners, inside those masks' own windows) of each of P
    windows: (P,) int64.

    Only the windows are read, gathered in chunks of windows of similar size.
    """
    device = lo.device
    extent = hi - lo
    counts = torch.zeros(first.shape[0], dtype=torch.long, device=device)
    keys = torch.stack([_size_buckets(extent[:, axis], 1.5, 8.0) for axis in (1, 0)], dim=1)
    for bucket in _split_by_key(keys):
        pad_w, pad_h = (int(v) for v in extent[bucket].amax(dim=0))
        for part in torch.split(bucket, max(1, max_chunk_elements // max(pad_h * pad_w, 1))):
            rows = (lo[part, 1, None] + torch.arange(pad_h, device=device))[:, :, None]
            cols = (lo[part, 0, None] + torch.arange(pad_w, device=device))[:, None, :]
            # positions past the window are masked out (their reads stay in the masks' windows)
            inside = (rows < hi[part, 1, None, None]) & (cols < hi[part, 0, None, None])
            hits = masks.read(first[part, None, None], rows, cols) & inside
            if second is not None:
                hits &= masks.read(second[part, None, None], rows, cols)
            counts[part] = hits.sum(dim=(1, 2))
    return counts


def mask_nms(
    masks: MaskWindows,
    scores: torch.Tensor,
    iou_threshold: float,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Greedy mask NMS: a mask whose IoU with a higher-scored kept mask exceeds the threshold is
    suppressed. Empty masks are dropped (never kept); ties in score keep the lower index first.

    Areas and intersections read only the tight box of each mask and the box overlaps of
    box-overlapping pairs.

    Args:
        masks: the N masks (:func:`paste_mask_windows`, or :meth:`MaskWindows.from_masks` of
            full-image masks).
        scores: (N,) scores.
        iou_threshold: IoU above which the lower-scored mask is suppressed.
        max_chunk_elements: bound on the pixels gathered at once.

    Returns:
        keep (K,) int64 indices into ``masks``, by decreasing score.
    """
    device = scores.device
    boxes = masks.boxes.long()
    nonempty = torch.nonzero(boxes[:, 2] > boxes[:, 0]).squeeze(1)
    if nonempty.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    order = nonempty[torch.sort(scores[nonempty], descending=True, stable=True).indices]
    boxes = boxes[order]
    areas = _count_in_windows(masks, order, None, boxes[:, :2], boxes[:, 2:], max_chunk_elements)
    # pairs (i < j in score order) whose boxes overlap, and the overlaps
    lo = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    hi = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    num = order.shape[0]
    upper = torch.ones(num, num, dtype=torch.bool, device=device).triu(1)
    pairs = torch.nonzero((hi > lo).all(dim=2) & upper)
    lo, hi = lo[pairs[:, 0], pairs[:, 1]], hi[pairs[:, 0], pairs[:, 1]]
    inter = _count_in_windows(
        masks, order[pairs[:, 0]], order[pairs[:, 1]], lo, hi, max_chunk_elements
    )
    iou = inter.double() / (areas[pairs[:, 0]] + areas[pairs[:, 1]] - inter).double()
    suppressing = pairs[iou > iou_threshold].cpu().numpy()
    # suppression graph in score order: row i marks the later masks that kept mask i removes
    graph = np.zeros((num, num), dtype=bool)
    graph[suppressing[:, 0], suppressing[:, 1]] = True
    removed = np.zeros(num, dtype=bool)
    kept = []
    current = 0
    while True:  # one iteration per kept mask
        kept.append(current)
        removed |= graph[current]
        later = np.flatnonzero(~removed[current + 1 :])
        if later.size == 0:
            break
        current += 1 + int(later[0])
    return order[torch.as_tensor(kept, dtype=torch.long, device=device)]
