"""RLE encoding and the IoU / intersection / union matrices of objguided_d2.evaluation.matching."""

import numpy as np
import pycocotools.mask as mask_util
import torch

from objguided_d2.evaluation.matching import (
    annotation_to_rle,
    box_iou,
    encode_masks,
    intersections_and_unions,
    mask_iou,
    rle_areas,
    rle_boxes,
)
from objguided_d2.modeling.mask_windows import MaskWindows


def rect(height, width, rows, cols):
    """bool (H, W) mask with the half-open row and column ranges set."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def test_encode_masks_round_trips_across_chunks():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(70, 5, 7, generator=generator) > 0.5  # more than one encoding chunk
    rles = encode_masks(masks)
    assert len(rles) == 70
    decoded = mask_util.decode(rles)  # (H, W, N)
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), masks.numpy())


def test_annotation_to_rle_reads_polygons_and_both_rle_forms():
    # Polygon corners in pixel-edge coordinates: (1, 1)-(4, 4) covers pixels 1..3.
    polygon = annotation_to_rle([[1, 1, 4, 1, 4, 4, 1, 4]], 6, 7)
    expected = np.zeros((6, 7), dtype=np.uint8)
    expected[1:4, 1:4] = 1
    np.testing.assert_array_equal(mask_util.decode(polygon), expected)

    # Uncompressed RLE, column-major runs: 1 background, 2 foreground, 3 background.
    uncompressed = annotation_to_rle({"size": [3, 2], "counts": [1, 2, 3]}, 3, 2)
    np.testing.assert_array_equal(mask_util.decode(uncompressed), [[0, 0], [1, 0], [1, 0]])

    compressed = {"size": [3, 2], "counts": uncompressed["counts"].decode()}
    assert annotation_to_rle(compressed, 3, 2) is compressed


def test_rle_boxes_are_tight_xyxy_boxes_in_pixel_edge_coordinates():
    rles = encode_masks(torch.stack([rect(6, 8, (1, 3), (3, 6)), rect(6, 8, (0, 6), (0, 1))]))
    np.testing.assert_array_equal(rle_boxes(rles), [[3, 1, 6, 3], [0, 0, 1, 6]])
    np.testing.assert_array_equal(rle_areas(rles), [6, 6])
    assert rle_boxes([]).shape == (0, 4) and rle_areas([]).shape == (0,)


def test_rle_areas_of_more_than_255_masks():
    masks = torch.zeros(300, 4, 5, dtype=torch.bool)
    for i, mask in enumerate(masks):
        mask.view(-1)[: i % 21] = True
    np.testing.assert_array_equal(rle_areas(encode_masks(masks)), [i % 21 for i in range(300)])


def test_mask_iou_of_shifted_squares():
    # 4x4 squares shifted by 2 columns: intersection 8, union 24.
    a = rect(6, 8, (0, 4), (0, 4))
    b = rect(6, 8, (0, 4), (2, 6))
    empty = torch.zeros(6, 8, dtype=torch.bool)
    iou = mask_iou(encode_masks(torch.stack([a, empty])), encode_masks(torch.stack([a, b])))
    np.testing.assert_allclose(iou, [[1.0, 1 / 3], [0.0, 0.0]])
    assert mask_iou([], encode_masks(a[None])).shape == (0, 1)
    assert mask_iou(encode_masks(a[None]), []).shape == (1, 0)


def test_box_iou_hand_values():
    pred = np.array([[0, 0, 2, 2], [10, 10, 10, 12]])  # the second box is degenerate
    gt = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [0, 0, 4, 1]])
    np.testing.assert_allclose(box_iou(pred, gt), [[1 / 7, 1.0, 2 / 6], [0, 0, 0]])
    assert box_iou(np.zeros((0, 4)), gt).shape == (0, 3)
    assert box_iou(pred, np.zeros((0, 4))).shape == (2, 0)


def test_intersections_and_unions_are_exact_pixel_counts():
    generator = torch.Generator().manual_seed(1)
    pred = torch.rand(6, 30, 40, generator=generator) > 0.3
    gt = torch.rand(5, 30, 40, generator=generator) > 0.6
    pred_rles, gt_rles = encode_masks(pred), encode_masks(gt)
    inter, union = intersections_and_unions(
        mask_iou(pred_rles, gt_rles), rle_areas(pred_rles), rle_areas(gt_rles)
    )
    expected_inter = (pred[:, None] & gt[None]).sum(dim=(2, 3)).numpy()
    expected_union = (pred[:, None] | gt[None]).sum(dim=(2, 3)).numpy()
    np.testing.assert_array_equal(inter, expected_inter)
    np.testing.assert_array_equal(union, expected_union)


def test_encode_masks_accepts_uint8():
    mask = rect(3, 4, (1, 2), (0, 4)).to(torch.uint8)
    np.testing.assert_array_equal(mask_util.decode(encode_masks(mask[None]))[..., 0], mask.numpy())


def test_windows_encode_to_the_rles_of_their_full_masks():
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(8, 9, 11, generator=generator) > 0.6
    masks[0] = False  # empty
    masks[1] = True  # starts on the first pixel and ends on the last
    masks[2] = False
    masks[2, -1, -1] = True  # only the last pixel
    masks[3, :, 4:6] = False  # two parts
    expected = encode_masks(masks)
    for windows in (MaskWindows.from_masks(masks), MaskWindows.from_masks(masks).tight()):
        assert encode_masks(windows) == expected
