"""Paste-back and mask NMS of the object-guided mask branch, on mask windows.

Every predicted mask lives in its ROI's window of the image (:class:`MaskWindows`): paste-back
writes the windows, mask NMS reads them, and the predictions carry the kept masks as windows of
their tight boxes, so that memory grows with the objects' area, not with the image's area times
their number. The evaluators and the exports read the windows; a caller that wants full-image
masks asks for them (:meth:`MaskWindows.to_masks`, ``np.asarray``, iteration). Pure tensor code
(no detectron2 types), batched over ROIs; connected components alone run in SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from .bilinear import linear_taps, tap_matrix
from .roi_crops import RoiPyramid

__all__ = [
    "MaskWindows",
    "mask_nms",
    "mask_to_boxes",
    "matrix_nms_decay",
    "overlapping_box_pairs",
    "paste_mask_windows",
]


@dataclass
class MaskWindows:
    """Binary masks of R objects in one H x W image, each stored as a window of the image that
    holds all of the mask (ragged, concatenated).

    Paste-back writes them and mask NMS reads them; the predictions' ``pred_masks`` are the kept
    masks cropped to their tight boxes (:meth:`tight`). Works as an ``Instances`` field (length,
    indexing, ``to``, ``cat``), and reads as full-image masks where a caller asks: :meth:`to_masks`,
    ``np.asarray`` (N, H, W), or iterating, one (H, W) mask at a time (detectron2's
    ``instances_to_coco_json`` and ``Visualizer`` so read them).

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

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def shape(self) -> tuple[int, int, int]:
        """(N, H, W), the shape of the full-image masks."""
        return (len(self), *self.image_hw)

    def __getitem__(self, item: int | slice | torch.Tensor) -> MaskWindows:
        """The masks ``item`` (an index, a slice, (K,) int64 indices or an (N,) bool mask)."""
        index = torch.arange(len(self), device=self.device)[item]
        return self.select(index.reshape(-1))

    def select(self, index: torch.Tensor) -> MaskWindows:
        """The masks ``index`` ((K,) int64), in that order, their windows copied out."""
        sizes = self.shapes[index].prod(dim=1)
        offsets = torch.cumsum(sizes, 0) - sizes
        within = torch.arange(int(sizes.sum()), device=self.device)
        within -= torch.repeat_interleave(offsets, sizes)
        return MaskWindows(
            pixels=self.pixels[torch.repeat_interleave(self.offsets[index], sizes) + within],
            origins=self.origins[index],
            shapes=self.shapes[index],
            boxes=self.boxes[index],
            image_hw=self.image_hw,
        )

    def tight(self, index: torch.Tensor | None = None) -> MaskWindows:
        """The masks ``index`` ((K,) int64, default all), each in the window of its tight box
        (an empty mask in a 0 x 0 window at the image origin)."""
        if index is None:
            index = torch.arange(len(self), device=self.device)
        boxes = self.boxes[index]
        corner = boxes[:, [1, 0]].long()  # (y1, x1)
        shapes = (boxes[:, [3, 2]].long() - corner).clamp(min=0)
        crops = [self.crop(i, c, s).reshape(-1) for i, c, s in zip(index, corner, shapes)]
        return MaskWindows(
            pixels=torch.cat([self.pixels[:0], *crops]),
            origins=corner,
            shapes=shapes,
            boxes=boxes,
            image_hw=self.image_hw,
        )

    def largest_components(self) -> MaskWindows:
        """Each mask reduced to its largest 8-connected component (the first in raster order
        of equally large ones), in its own window, with its new tight box."""
        pixels = self.pixels.cpu().numpy().copy()
        boxes = self.boxes.clone()
        for i, (start, (height, width)) in enumerate(
            zip(self.offsets.tolist(), self.shapes.tolist())
        ):
            window = pixels[start : start + height * width].reshape(height, width)
            labels, count = ndimage.label(window, structure=np.ones((3, 3), dtype=bool))
            if count < 2:
                continue
            largest = np.bincount(labels.ravel())[1:].argmax() + 1
            window &= labels == largest
            tight = mask_to_boxes(torch.from_numpy(window)[None])[0]
            boxes[i] = tight.to(boxes) + self.origins[i].flip(0).repeat(2).to(boxes)
        return MaskWindows(
            pixels=torch.from_numpy(pixels).to(self.device),
            origins=self.origins,
            shapes=self.shapes,
            boxes=boxes,
            image_hw=self.image_hw,
        )

    def to(self, device: torch.device | str) -> MaskWindows:
        return MaskWindows(
            pixels=self.pixels.to(device),
            origins=self.origins.to(device),
            shapes=self.shapes.to(device),
            boxes=self.boxes.to(device),
            image_hw=self.image_hw,
        )

    def window(self, i: int) -> torch.Tensor:
        """Mask ``i``'s window, (h, w) bool."""
        height, width = (int(v) for v in self.shapes[i])
        start = int(self.offsets[i])
        return self.pixels[start : start + height * width].view(height, width)

    def crop(self, i: int, corner: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        """Mask ``i`` in the image window at ``corner`` (y, x) of ``shape`` (h, w): (h, w) bool,
        False outside the mask's own window."""
        (y0, x0), (height, width) = (int(v) for v in corner), (int(v) for v in shape)
        out = torch.zeros((height, width), dtype=torch.bool, device=self.device)
        (oy, ox), (wh, ww) = (int(v) for v in self.origins[i]), (int(v) for v in self.shapes[i])
        top, left = max(y0, oy), max(x0, ox)
        bottom, right = min(y0 + height, oy + wh), min(x0 + width, ox + ww)
        if bottom > top and right > left:
            out[top - y0 : bottom - y0, left - x0 : right - x0] = self.window(i)[
                top - oy : bottom - oy, left - ox : right - ox
            ]
        return out

    def __iter__(self):
        """Full-image (H, W) bool masks, one at a time."""
        for i in range(len(self)):
            yield self.crop(i, (0, 0), self.image_hw)

    def __array__(self, dtype=None, copy=None):
        masks = self.to_masks().cpu().numpy()
        return masks if dtype is None else masks.astype(dtype)

    def nonempty(self) -> torch.Tensor:
        """(N,) bool: whether each mask has a pixel."""
        return self.boxes[:, 2] > self.boxes[:, 0]

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
    normalize: bool = True,
    max_chunk_bytes: int = 1 << 28,
) -> MaskWindows:
    """Paste level-0 ROI probabilities back into the image as binary masks, each in its ROI's
    window of the image (:meth:`MaskWindows.to_masks` gives full-image masks).

    Each ROI sample (position from the pyramid) splats p * w onto its 4 integer neighbours with
    bilinear weights w. With ``normalize``, the canvas value is sum(p * w) / sum(w) (0 where
    nothing lands) and, when ``output_hw`` differs, the canvas is resized bilinearly
    (align_corners=False, x_out + 0.5 = (x_in + 0.5) * W / w per axis); without, the canvas is
    sum(p * w), the authors' vote, and it is resized by nearest neighbour (x_in = floor((x_out +
    0.5) * w / W)), which thresholding first and resizing the binary mask would give. Pixels at
    or above ``threshold`` are foreground. Splatting and resizing are separable, so both run as
    batched matmuls on each ROI's window.

    Args:
        probs: (R, 1, Hp, Wp) level-0 ROI probabilities, ROI r valid in its level-0 (h, w).
        pyramid: the R ROIs (their boxes in the ``input_hw`` image).
        input_hw: (h, w) image the boxes refer to.
        output_hw: (H, W) size of the masks; default ``input_hw``.
        threshold: canvas value at or above which a pixel is foreground.
        normalize: divide the votes by their weights and resize bilinearly, or keep the summed
            votes and resize by nearest neighbour (the authors).
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
        (y, y_valid), (x, x_valid) = part.positions(0, (pad_h, pad_w))
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
            splat.append(tap_matrix(taps, weights, origin[:, axis], length))
        splat_y, splat_x = splat  # (R, Hp, win_h), (R, Wp, win_w)
        p = probs[start : start + chunk, 0].float()
        soft = splat_y.transpose(1, 2) @ p @ splat_x
        if normalize:
            weights = splat_y.sum(dim=1)[:, :, None] * splat_x.sum(dim=1)[:, None, :]
            soft = torch.where(weights > 0, soft / weights.clamp(min=1e-30), 0.0)
        if resize:
            soft, origin = _resize_windows(
                soft, origin, (in_h, in_w), (out_h, out_w), (res_h, res_w), nearest=not normalize
            )
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


def _resize_windows(
    soft: torch.Tensor,
    origin: torch.Tensor,
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    res_hw: tuple[int, int],
    nearest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize (R, h, w) canvas windows at ``origin`` (R, 2) (y, x) of an ``in_hw`` image to the
    (R, *res_hw) windows of the ``out_hw`` image that hold them: the resized windows and their
    origins. Bilinear (align_corners=False) or nearest neighbour."""
    resized_axes, resized_origin = [], []
    for axis in (0, 1):
        size_in, size_out, res_len = in_hw[axis], out_hw[axis], res_hw[axis]
        scale = size_out / size_in
        first_out = ((origin[:, axis] - 0.5) * scale - 0.5).floor().long()
        start = first_out.clamp(min=0, max=size_out - res_len)
        k = torch.arange(res_len, device=soft.device, dtype=torch.float64)
        if nearest:
            src = (start[:, None] + k + 0.5) * size_in / size_out  # exact where it is whole
            src = src.floor().long().clamp(max=size_in - 1)
            taps = torch.stack((src, src))
            weights = torch.stack((torch.ones_like(src), torch.zeros_like(src))).double()
        else:
            src = (start[:, None] + k + 0.5) / scale - 0.5
            lengths = torch.full_like(start[:, None], size_in)
            taps, weights = linear_taps(src, lengths, torch.ones_like(src, dtype=torch.bool), True)
        resized_axes.append(tap_matrix(taps, weights, origin[:, axis], soft.shape[1 + axis]))
        resized_origin.append(start)
    resized = resized_axes[0] @ soft @ resized_axes[1].transpose(1, 2)
    return resized, torch.stack(resized_origin, dim=1)


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


def overlapping_box_pairs(boxes: torch.Tensor, max_block_pairs: int = 1 << 20) -> torch.Tensor:
    """(P, 2) int64 pairs (i, j), i < j, of the (N, 4) integer XYXY boxes that overlap, sorted
    by i then j; compared a block of at most ``max_block_pairs`` pairs at a time."""
    num = boxes.shape[0]
    rows = max(1, max_block_pairs // max(num, 1))
    pairs = [boxes.new_zeros((0, 2))]
    for start in range(0, num, rows):
        block = boxes[start : start + rows]
        lo = torch.maximum(block[:, None, :2], boxes[None, :, :2])
        hi = torch.minimum(block[:, None, 2:], boxes[None, :, 2:])
        later = (
            torch.arange(num, device=boxes.device)
            > torch.arange(start, start + len(block), device=boxes.device)[:, None]
        )
        found = torch.nonzero((hi > lo).all(dim=2) & later)
        pairs.append(found + found.new_tensor([start, 0]))
    return torch.cat(pairs)


def _ranked_overlaps(
    masks: MaskWindows, scores: torch.Tensor, max_chunk_elements: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-empty masks by decreasing score ((M,) int64 indices into ``masks``; ties keep the
    lower index first), the (P, 2) pairs (i, j), i < j, of positions in that order whose tight
    boxes overlap, and their (P,) float64 mask IoUs. Areas and intersections read only the tight
    box of each mask and the box overlaps of those pairs."""
    boxes = masks.boxes.long()
    nonempty = torch.nonzero(boxes[:, 2] > boxes[:, 0]).squeeze(1)
    order = nonempty[torch.sort(scores[nonempty], descending=True, stable=True).indices]
    boxes = boxes[order]
    areas = _count_in_windows(masks, order, None, boxes[:, :2], boxes[:, 2:], max_chunk_elements)
    pairs = overlapping_box_pairs(boxes)
    lo = torch.maximum(boxes[pairs[:, 0], :2], boxes[pairs[:, 1], :2])
    hi = torch.minimum(boxes[pairs[:, 0], 2:], boxes[pairs[:, 1], 2:])
    inter = _count_in_windows(
        masks, order[pairs[:, 0]], order[pairs[:, 1]], lo, hi, max_chunk_elements
    )
    iou = inter.double() / (areas[pairs[:, 0]] + areas[pairs[:, 1]] - inter).double()
    return order, pairs, iou


def matrix_nms_decay(
    masks: MaskWindows,
    scores: torch.Tensor,
    sigma: float,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """SOLOv2's Matrix NMS with its Gaussian kernel: (N,) ``scores`` decayed by each mask's
    overlap with the masks scored above it. Mask j's score is multiplied by the smallest, over
    the masks i above it, of exp(-sigma * (IoU(i, j)^2 - c_i^2)), at most 1, where c_i is mask
    i's largest IoU with a mask above it: a mask that overlaps a near duplicate of a better one
    is decayed as that duplicate is, not twice. Empty masks keep their scores."""
    decayed = scores.clone()
    order, pairs, iou = _ranked_overlaps(masks, scores, max_chunk_elements)
    if pairs.shape[0] == 0:
        return decayed
    below = pairs[:, 1]
    largest_iou = iou.new_zeros(len(order)).scatter_reduce(0, below, iou, "amax")
    factor = torch.exp(-sigma * (iou**2 - largest_iou[pairs[:, 0]] ** 2))
    decay = iou.new_ones(len(order)).scatter_reduce(0, below, factor, "amin")
    decayed[order] = scores[order] * decay.to(scores.dtype)
    return decayed


def mask_nms(
    masks: MaskWindows,
    scores: torch.Tensor,
    iou_threshold: float,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Greedy mask NMS: a mask whose IoU with a higher-scored kept mask exceeds the threshold is
    suppressed. Empty masks are dropped (never kept); ties in score keep the lower index first.

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
    order, pairs, iou = _ranked_overlaps(masks, scores, max_chunk_elements)
    # suppressions (i, j), i < j in score order, grouped by i
    suppressing = pairs[iou > iou_threshold].cpu().numpy()
    first = np.searchsorted(suppressing[:, 0], np.arange(len(order) + 1))
    removed = np.zeros(len(order), dtype=bool)
    kept = []
    for i in range(len(order)):
        if not removed[i]:
            kept.append(i)
            removed[suppressing[first[i] : first[i + 1], 1]] = True
    return order[torch.as_tensor(kept, dtype=torch.long, device=device)]
