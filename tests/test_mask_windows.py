"""Paste-back and mask NMS on mask windows, checked against full-canvas references and brute
force."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Instances

from objguided_d2.modeling.mask_windows import (
    MaskWindows,
    mask_nms,
    mask_to_boxes,
    matrix_nms_decay,
    overlapping_box_pairs,
    paste_mask_windows,
)
from objguided_d2.modeling.roi_crops import build_roi_pyramid, crop_masks

pytestmark = pytest.mark.usefixtures("single_thread")


def _level0_positions(center, size, count):
    """Level-0 sample positions of one ROI axis in pixel-index coordinates (reference)."""
    k = torch.arange(count, dtype=torch.float64)
    return center - size / 2 + k * size / (count - 1)


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


def _reference_canvas(probs, box, height, width, normalize=True):
    """Bilinear splat of one ROI's level-0 probabilities on the full canvas, normalized by the
    weights or not (the authors' votes)."""
    x1, y1, x2, y2 = box
    w, h = (x2 - x1) * 1.1, (y2 - y1) * 1.1
    ys = _level0_positions((y1 + y2) / 2 - 0.5, h, int(h)).numpy()
    xs = _level0_positions((x1 + x2) / 2 - 0.5, w, int(w)).numpy()
    y, x = np.meshgrid(ys, xs, indexing="ij")
    num, den = np.zeros((height, width)), np.zeros((height, width))
    for ty, wy in ((np.floor(y), 1 - (y - np.floor(y))), (np.floor(y) + 1, y - np.floor(y))):
        for tx, wx in ((np.floor(x), 1 - (x - np.floor(x))), (np.floor(x) + 1, x - np.floor(x))):
            inside = (ty >= 0) & (ty < height) & (tx >= 0) & (tx < width)
            at = (ty[inside].astype(int), tx[inside].astype(int))
            np.add.at(num, at, (probs.numpy() * wy * wx)[inside])
            np.add.at(den, at, (wy * wx)[inside])
    if not normalize:
        return torch.from_numpy(num)
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


def test_matrix_nms_decay_follows_the_better_masks_overlaps_and_their_own():
    masks = torch.zeros(4, 40, 40, dtype=torch.bool)
    masks[0, 0:10, 0:10] = True  # the best: kept as it is
    masks[1, 0:10, 0:5] = True  # IoU 1/2 with 0: decayed by exp(-2 / 4)
    # IoU 0.3 with 0 and 0.6 with 1, whose own IoU 1/2 with 0 compensates: by exp(-2 * 0.11)
    masks[2, 0:10, 2:5] = True
    masks[3, 30:40, 30:40] = True  # disjoint: kept as it is
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    decayed = matrix_nms_decay(MaskWindows.from_masks(masks), scores, sigma=2.0)
    expected = scores * torch.tensor([1.0, math.exp(-0.5), math.exp(-2 * (0.36 - 0.25)), 1.0])
    torch.testing.assert_close(decayed, expected)
    empty = MaskWindows.from_masks(torch.zeros(2, 8, 8, dtype=torch.bool))
    unchanged = torch.tensor([0.5, 0.4])
    assert torch.equal(matrix_nms_decay(empty, unchanged, 2.0), unchanged)


def test_matrix_nms_decay_matches_the_dense_formula_on_random_overlaps():
    generator = torch.Generator().manual_seed(11)
    num, size = 30, 48
    masks = torch.zeros(num, size, size, dtype=torch.bool)
    for r in range(num):
        y, x = torch.randint(0, size - 6, (2,), generator=generator).tolist()
        h, w = torch.randint(2, 24, (2,), generator=generator).tolist()
        masks[r, y : y + h, x : x + w] = True
    scores = torch.rand(num, generator=generator)
    # SOLOv2's dense form, over the masks sorted by score
    order = torch.argsort(scores, descending=True)
    flat = masks[order].flatten(1).double()
    inter = flat @ flat.T
    iou = (inter / (flat.sum(1)[:, None] + flat.sum(1)[None, :] - inter)).triu(diagonal=1)
    largest = iou.max(dim=0).values
    decay = torch.exp(-2.0 * (iou**2 - largest[:, None] ** 2)).min(dim=0).values.clamp(max=1)
    expected = torch.empty_like(scores)
    expected[order] = scores[order] * decay.float()
    windows = _random_windows(masks, torch.Generator().manual_seed(12))
    torch.testing.assert_close(
        matrix_nms_decay(windows, scores, 2.0, max_chunk_elements=300), expected
    )


def testoverlapping_box_pairs_block_by_block_are_alloverlapping_box_pairs():
    generator = torch.Generator().manual_seed(3)
    corners = torch.randint(0, 200, (300, 2), generator=generator)
    boxes = torch.cat([corners, corners + torch.randint(1, 30, (300, 2), generator=generator)], 1)
    lo = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    hi = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    expected = torch.nonzero((hi > lo).all(dim=2).triu(1))
    for block in (1, 299, 1000, 1 << 20):
        assert torch.equal(overlapping_box_pairs(boxes, max_block_pairs=block), expected)


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


@pytest.mark.parametrize("out_hw", [(384, 512), (780, 1040), (192, 256), (400, 300)])
def test_paste_of_the_authors_thresholds_the_summed_votes_then_resizes_by_nearest(out_hw):
    masks, pyramid, soft = _crop_shapes(384, 512)
    boxes = BitMasks(masks).get_bounding_boxes().tensor
    pasted = paste_mask_windows(
        soft, pyramid, (384, 512), out_hw, threshold=0.53, normalize=False
    ).to_masks()
    rows = ((torch.arange(out_hw[0]) + 0.5) * 384 / out_hw[0]).floor().long()
    cols = ((torch.arange(out_hw[1]) + 0.5) * 512 / out_hw[1]).floor().long()
    for r in range(len(masks)):
        h, w = pyramid.level_hw[r, 0].tolist()
        votes = _reference_canvas(soft[r, 0, :h, :w].double(), boxes[r].tolist(), 384, 512, False)
        undecided = (votes - 0.53).abs() < 1e-5
        binary = votes >= 0.53
        assert torch.equal(
            pasted[r] & ~undecided[rows][:, cols], binary[rows][:, cols] & ~undecided[rows][:, cols]
        ), r
    if out_hw == (384, 512):
        # the votes of samples spaced more than a pixel apart weigh less than one: the authors'
        # masks lie inside the normalized ones
        normalized = paste_mask_windows(soft, pyramid, (384, 512), threshold=0.53).to_masks()
        assert not (pasted & ~normalized).any() and pasted.sum() < normalized.sum()


def test_windows_work_as_an_instances_field_and_read_as_full_masks():
    generator = torch.Generator().manual_seed(2)
    masks = torch.rand(6, 12, 10, generator=generator) > 0.7
    masks[2] = False
    windows = _random_windows(masks, generator)
    tight = windows.tight()
    assert torch.equal(tight.to_masks(), masks)
    assert tight.shapes[2].tolist() == [0, 0] and tight.nonempty().tolist() == [
        True,
        True,
        False,
        True,
        True,
        True,
    ]
    # tight windows hold the masks' boxes only
    assert tight.pixels.numel() < windows.pixels.numel()
    assert tight.shape == (6, 12, 10) and len(tight) == 6

    instances = Instances((12, 10), pred_masks=tight, scores=torch.arange(6.0))
    for item, expected in [
        (torch.tensor([True, False, True, False, False, True]), [0, 2, 5]),
        (torch.tensor([4, 1]), [4, 1]),
        (slice(1, 3), [1, 2]),
        (3, [3]),
    ]:
        picked = instances[item].pred_masks
        assert isinstance(picked, MaskWindows)
        assert torch.equal(picked.to_masks(), masks[expected])
    joined = Instances.cat([instances[:2], instances[4:]]).pred_masks
    assert torch.equal(joined.to_masks(), masks[[0, 1, 4, 5]])
    moved = instances.to("cpu").pred_masks
    # one full mask at a time, or all as an array (detectron2's COCO JSON and Visualizer)
    assert all(torch.equal(mask, expected) for mask, expected in zip(moved, masks, strict=True))
    np.testing.assert_array_equal(np.asarray(moved), masks.numpy())


def test_largest_components_keep_each_masks_largest_8_connected_part_and_its_box():
    masks = torch.zeros(3, 20, 24, dtype=torch.bool)
    masks[0, 2:8, 3:9] = True  # 36 px
    masks[0, 8, 9] = True  # touches the square diagonally: the same component
    masks[0, 12:15, 15:22] = True  # 21 px, apart
    masks[1, 5:7, 5:7] = True  # one component: unchanged
    # masks[2] empty
    windows = _random_windows(masks, torch.Generator().manual_seed(0))

    largest = windows.largest_components()

    expected = masks.clone()
    expected[0, 12:15, 15:22] = False
    assert torch.equal(largest.to_masks(), expected)
    torch.testing.assert_close(largest.boxes, mask_to_boxes(expected))
    assert torch.equal(largest.tight().to_masks(), expected)
    assert torch.equal(windows.to_masks(), masks)  # the input is left as it was
