"""ROI pyramids and crops of the object-guided mask branch: size-adaptive crop grids of the boxes
at every level, their grouping into padded batches, and the bilinear crops of feature maps and
ground-truth masks. Pure tensor code (no detectron2 types), batched over ROIs.

Coordinates
    Boxes are XYXY in detectron2's continuous pixel coordinates (pixel k spans [k, k + 1]).
    Sample positions are in pixel-index coordinates (pixel k is centred on k), so a box's centre
    is ((x1 + x2) / 2 - 0.5, (y1 + y2) / 2 - 0.5). Cell j of a stride-s feature map is centred on
    input pixel s * j, i.e. input position x reads the map at u = x / s (bilinear, zero outside
    the map), as the authors crop: ResNet's padded, odd-kernel, strided convolutions and max-pool
    centre their cell j on input pixel s * j, which tests/test_roi_crops.py checks by tracing one
    bright pixel through the backbone (the decoder's upsampled parts lie further down-right).

ROI pyramid
    An ROI is its box scaled by ``enlarge`` about the centre: (w', h'). Level i (stride s_i) samples
    int(h' / s_i) x int(w' / s_i) points spanning the enlarged box end to end,
    x_k = cx - w'/2 + k * w' / (n - 1), k = 0..n-1 (same in y). Levels stop at the first one whose
    h' / s_i or w' / s_i is below ``min_size``; an ROI whose level 0 fails has no level (skipped).
    With ``pixel_grid``, the span is moved and shortened so that level 0 samples whole pixels one
    pixel apart (x_0 = round(cx - w'/2), span n_0 - 1): its crops and its soft ground truth are
    then the pixels themselves, not bilinear blends of neighbours, and its masks paste back onto
    the pixels they came from.

Padded ROI batches
    ROIs of different sizes travel as (R, C, Hp, Wp) tensors: ROI r occupies its top-left
    h_r x w_r corner (its "valid region", see :func:`valid_mask`) and is zero elsewhere. A
    zero-padded convolution (padding k // 2) gives inside the valid region exactly what it gives
    on the ROI alone iff its input is zero outside it; :mod:`.padded_layers` keeps that invariant.
    Crops come in channels-last memory format, which the elementwise ops keep: the convolutions on
    these small, many-channel maps run faster so on a CPU, and the gathers read channels-last
    feature maps without a transposed copy.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .bilinear import (
    bilinear_tap_rows,
    channel_rows,
    gather_bilinear,
    linear_taps,
    rows_to_channels_last,
)

__all__ = [
    "RoiGroup",
    "RoiPyramid",
    "build_roi_pyramid",
    "crop_masks",
    "crop_one_roi",
    "crop_roi_groups",
    "crop_rois",
    "flip_rois",
    "group_rois",
    "keypoint_maps",
    "valid_mask",
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

    def translated(self, offsets: torch.Tensor) -> RoiPyramid:
        """The same grids moved by (R, 2) (dx, dy) input pixels (e.g. from a tile into its
        image)."""
        return replace(self, centers=self.centers + offsets.to(self.centers.dtype))

    def mirrored(self, dims: Sequence[int], image_hw: Sequence[int]) -> RoiPyramid:
        """The same grids in the (H, W) image flipped along ``dims`` (-1: left-right, -2:
        up-down): sample k of a flipped axis lands on the mirror of sample n - 1 - k."""
        centers = self.centers.clone()
        for dim in dims:
            axis = -1 - dim  # centres are (x, y): tensor dim -1 is x, -2 is y
            centers[:, axis] = image_hw[dim] - 1 - centers[:, axis]
        return replace(self, centers=centers)

    def positions(
        self, level: int, pad_hw: Sequence[int]
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Sample positions of every ROI at ``level`` in that level's map coordinates.

        Returns ((y (R, Hp), y_valid (R, Hp)), (x (R, Wp), x_valid (R, Wp))): float64 positions
        u = x / s of x_k = c - size / 2 + k * size / (n - 1); padded entries
        invalid.
        """
        stride = self.strides[level]
        axes = []
        for axis, pad in ((1, pad_hw[0]), (0, pad_hw[1])):
            count = self.level_hw[:, level, 1 - axis]
            k = torch.arange(pad, dtype=torch.float64, device=count.device)
            size = self.sizes[:, axis, None]
            step = size / (count[:, None] - 1).clamp(min=1)
            pos = self.centers[:, axis, None] - size / 2 + k * step
            axes.append((pos / stride, k < count[:, None]))
        return axes[0], axes[1]


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
    pixel_grid: bool = False,
) -> RoiPyramid:
    """Crop grids of the enlarged boxes at every level.

    Args:
        boxes: (R, 4) XYXY boxes in network-input pixels (continuous coordinates).
        strides: stride of each level, shallowest first.
        enlarge: factor applied to the box width and height about its centre.
        min_size: smallest side (in level units) a level may have.
        pixel_grid: level 0 on whole pixels, one pixel apart (module docstring); False: the
            authors' grid, spanning the enlarged box end to end.

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
    if pixel_grid:
        spans = (sizes.floor() - 1).clamp(min=0)
        centers = (centers - sizes / 2).round() + spans / 2
        sizes = spans
    return RoiPyramid(
        centers=centers,
        sizes=sizes,
        level_hw=level_hw,
        num_levels=fits.sum(dim=1),
        strides=tuple(int(s) for s in strides),
    )


def jitter_boxes(boxes: torch.Tensor, amount: float) -> torch.Tensor:
    """(R, 4) XYXY boxes moved and resized at random, as a detector errs: each centre shifted by up
    to ``amount / 2`` of the box's width (x) and height (y), each side length scaled by a factor in
    [1 - amount, 1 + amount]; uniform draws, independent per box and axis (torch's global RNG)."""
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    sizes = boxes[:, 2:] - boxes[:, :2]
    noise = torch.rand(len(boxes), 4, dtype=boxes.dtype, device=boxes.device) * 2 - 1
    centers = centers + noise[:, :2] * (amount / 2) * sizes
    sizes = sizes * (1 + noise[:, 2:] * amount)
    return torch.cat([centers - sizes / 2, centers + sizes / 2], dim=1)


def flip_rois(maps: torch.Tensor, hw: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """(R, C, Hp, Wp) padded ROI maps with each ROI's top-left (h, w) region (``hw`` (R, 2))
    flipped along ``dims`` (-1: left-right, -2: up-down); the padding stays where it is."""
    for dim in dims:
        size = maps.shape[dim]
        extent = hw[:, 1 if dim == -1 else 0, None]
        k = torch.arange(size, device=maps.device)
        source = torch.where(k < extent, extent - 1 - k, k)  # (R, size)
        shape = [len(maps), 1, 1, 1]
        shape[dim] = size
        maps = maps.gather(dim, source.view(shape).expand_as(maps))
    return maps


def valid_mask(hw: torch.Tensor, pad_hw: Sequence[int]) -> torch.Tensor:
    """(R, 1, Hp, Wp) bool mask of each ROI's top-left h x w valid region; hw: (R, 2) (h, w)."""
    rows = torch.arange(pad_hw[0], device=hw.device)
    cols = torch.arange(pad_hw[1], device=hw.device)
    inside = (rows[None, :, None] < hw[:, 0, None, None]) & (
        cols[None, None, :] < hw[:, 1, None, None]
    )
    return inside[:, None]


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


def _consecutive_slices(lengths: Sequence[int]) -> list[slice]:
    """Slices of consecutive runs of the given lengths: [0, l0), [l0, l0 + l1), ..."""
    ends = list(itertools.accumulate(lengths))
    return [slice(end - length, end) for length, end in zip(lengths, ends)]


def _crop_taps(
    pyramid: RoiPyramid, level: int, pad_hw: Sequence[int], height: int, width: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Zero-padded bilinear taps of each ROI's crop grid on a height x width map, shaped to
    broadcast to (R, Hp, Wp)."""
    (y, y_valid), (x, x_valid) = pyramid.positions(level, pad_hw)
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
        rows_to_channels_last(part.view(*shape, channels))
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


def keypoint_maps(
    pyramid: RoiPyramid,
    keypoints: torch.Tensor,
    level: int,
    pad_hw: Sequence[int],
    sigma: float,
) -> torch.Tensor:
    """A Gaussian bump at each ROI's keypoint, sampled on its crop grid at ``level``: which of the
    objects in a crowded box the ROI is about.

    The bump is defined in input pixels, its standard deviation ``sigma`` times the ROI's mean
    enlarged side, so it covers the same part of the ROI at every level.

    Args:
        pyramid: the R ROIs.
        keypoints: (R, 2) (x, y) of each ROI's keypoint, network-input pixels (continuous
            coordinates, as the boxes).
        level: level of the crop grid.
        pad_hw: (Hp, Wp), at least the largest (h, w) of the level.
        sigma: the bump's standard deviation as a fraction of the ROI's mean side.

    Returns:
        (R, 1, Hp, Wp) float32, 1 at the keypoint, zero outside each ROI's valid region.
    """
    (y, y_valid), (x, x_valid) = pyramid.positions(level, pad_hw)
    stride = pyramid.strides[level]
    points = keypoints.to(torch.float64) - 0.5  # pixel-index coordinates, as the samples
    # a skipped ROI (no level) has no size: keep its width positive, its bump is never read
    width = (sigma * pyramid.sizes.mean(dim=1, keepdim=True)).clamp(min=0.5)
    bump_y = torch.exp(-0.5 * ((y * stride - points[:, 1:]) / width) ** 2) * y_valid
    bump_x = torch.exp(-0.5 * ((x * stride - points[:, :1]) / width) ** 2) * x_valid
    return (bump_y[:, :, None] * bump_x[:, None, :]).float()[:, None]


def crop_one_roi(feature: torch.Tensor, pyramid: RoiPyramid, level: int) -> torch.Tensor:
    """The plain computation of one ROI's crop (what :func:`crop_rois` gathers), with
    ``F.grid_sample``: the reference of the one-ROI-at-a-time mask branch.

    Args:
        feature: (1, C, H, W) the level's map of the ROI's image.
        pyramid: one ROI, which has ``level``.
        level: level to crop.

    Returns:
        (1, C, h, w) the ROI's crop at its own size.
    """
    height, width = feature.shape[-2:]
    (y, _), (x, _) = pyramid.positions(level, pyramid.level_hw[0, level].tolist())
    # grid_sample's normalized coordinates (align_corners=False): -1 and 1 are the map's outer
    # edges, so index position u lies at (2u + 1) / size - 1
    grid_y, grid_x = torch.meshgrid(
        (2 * y[0] + 1) / height - 1, (2 * x[0] + 1) / width - 1, indexing="ij"
    )
    grid = torch.stack((grid_x, grid_y), dim=-1)[None].to(feature.dtype)
    return F.grid_sample(feature, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
