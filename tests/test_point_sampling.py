"""Uncertainty point sampling of the refinement heads, checked against per-ROI references."""

import pytest
import torch
import torch.nn.functional as F

from objguided_d2.modeling.point_sampling import (
    point_counts,
    point_sample_rois,
    sample_uncertain_points,
    select_uncertain_points,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _padded(rois, pad_hw, fill=float("nan")):
    """Stack (C, h, w) ROIs top-left into an (R, C, Hp, Wp) batch padded with ``fill``."""
    batch = torch.full((len(rois), rois[0].shape[0], *pad_hw), fill)
    for r, roi in enumerate(rois):
        batch[r, :, : roi.shape[1], : roi.shape[2]] = roi
    return batch


def _reference_sample(roi, points):
    """grid_sample(align_corners=True) of one (C, h, w) ROI at (P, 2) normalized points."""
    grid = (2 * points - 1)[None, None].to(roi.dtype)
    return F.grid_sample(roi[None], grid, align_corners=True)[0, :, 0]


def test_point_counts():
    hw = torch.tensor([[10, 10], [3, 2], [0, 5], [7, 9]])
    assert point_counts(hw, 8, 1.0).tolist() == [12, 0, 0, 7]
    assert point_counts(hw, 8, 0.75).tolist() == [9, 0, 0, 5]
    assert point_counts(hw, 8, 3.0).tolist() == [36, 0, 0, 21]


def test_point_sample_rois_reads_only_each_rois_valid_region():
    torch.manual_seed(0)
    sizes = [(5, 9), (12, 4), (1, 6), (12, 10)]
    rois = [torch.randn(3, h, w).double() for h, w in sizes]
    batch = _padded(rois, (12, 10)).double()  # NaN padding: any read of it would show
    points = torch.rand(4, 50, 2).double()
    points[:, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).double()
    samples = point_sample_rois(batch, torch.tensor(sizes), points)
    assert samples.shape == (4, 3, 50)
    for r, roi in enumerate(rois):
        torch.testing.assert_close(samples[r], _reference_sample(roi, points[r]))
    # the corners are the ROI's corner pixels
    assert torch.equal(samples[0, :, 1], rois[0][:, -1, -1])
    assert torch.equal(samples[0, :, 2], rois[0][:, 0, -1])


def test_biased_selection_is_the_exact_top_of_each_rois_candidates():
    torch.manual_seed(1)
    sizes = [(16, 24), (9, 9), (30, 7), (2, 3)]
    rois = [torch.sigmoid(3 * torch.randn(1, h, w)) for h, w in sizes]
    probs = _padded(rois, (30, 24), fill=0.5)  # padding as uncertain as can be: must not count
    valid_hw = torch.tensor(sizes)
    num_candidates = point_counts(valid_hw, 8, 3.0)
    num_points = point_counts(valid_hw, 8, 0.75)
    assert num_points.tolist() == [36, 7, 19, 0]
    generator = torch.Generator().manual_seed(7)
    points, point_valid = sample_uncertain_points(probs, valid_hw, generator=generator)
    candidates = torch.rand(
        4, int(num_candidates.max()), 2, generator=torch.Generator().manual_seed(7)
    )
    again = select_uncertain_points(probs, valid_hw, candidates, num_candidates, num_points)
    assert torch.equal(points, again[0]) and torch.equal(point_valid, again[1])
    assert points.shape == (4, 36, 2) and point_valid.sum(1).tolist() == [36, 7, 19, 0]
    for r, roi in enumerate(rois):
        mine = candidates[r, : num_candidates[r]]
        uncertainty = -(2 * _reference_sample(roi, mine)[0] - 1).abs()
        top = torch.argsort(uncertainty, descending=True, stable=True)[: num_points[r]]
        assert torch.equal(points[r, : num_points[r]], mine[top])


def test_biased_points_lie_in_the_uncertain_band():
    # ROI 0: p = 0.5 on columns 8..15 of 24, 1 left of it, 0 right of it; ROI 1: the same band
    # on rows 4..9 of 16 (transposed)
    first = torch.zeros(1, 16, 24)
    first[..., :8], first[..., 8:16] = 1.0, 0.5
    second = torch.zeros(1, 16, 12)
    second[:, :4], second[:, 4:10] = 1.0, 0.5
    probs = _padded([first, second], (16, 24), fill=0.0)
    valid_hw = torch.tensor([[16, 24], [16, 12]])
    generator = torch.Generator().manual_seed(3)
    points, point_valid = sample_uncertain_points(probs, valid_hw, generator=generator)
    columns = points[0, point_valid[0], 0] * 23
    rows = points[1, point_valid[1], 1] * 15
    assert len(columns) == 36 and len(rows) == 18
    assert ((columns >= 8) & (columns <= 15)).all()
    assert ((rows >= 4) & (rows <= 9)).all()


def test_uniform_sampling_covers_the_roi_evenly():
    valid_hw = torch.tensor([[64, 64], [20, 10], [2, 2]])
    probs = torch.rand(3, 1, 64, 64)
    generator = torch.Generator().manual_seed(11)
    points, point_valid = sample_uncertain_points(
        probs, valid_hw, oversample_ratio=3, importance_ratio=3, mode="uniform", generator=generator
    )
    assert point_valid.sum(1).tolist() == [1536, 75, 0]
    assert points.shape == (3, 1536, 2) and point_valid[0].all()
    cloud = points[0]
    quadrants = torch.bincount((cloud[:, 0] >= 0.5).long() * 2 + (cloud[:, 1] >= 0.5).long())
    chi_square = ((quadrants - 384.0) ** 2 / 384.0).sum()
    assert chi_square < 16.27  # 3 degrees of freedom, p = 0.001
    cell = (cloud * 8).long().clamp(max=7)
    cells = torch.bincount(cell[:, 0] * 8 + cell[:, 1], minlength=64)
    assert (cells > 0).all()
    assert torch.allclose(cloud.mean(0), torch.full((2,), 0.5), atol=0.03)
    # no uncertainty selection: other probabilities give the same points
    same, _ = sample_uncertain_points(
        1 - probs, valid_hw, importance_ratio=3, mode="uniform", generator=generator.manual_seed(11)
    )
    assert torch.equal(same, points)


def test_sampling_is_reproducible_and_handles_rois_without_points():
    probs = torch.rand(2, 1, 8, 8)
    valid_hw = torch.tensor([[8, 8], [3, 2]])
    first = sample_uncertain_points(probs, valid_hw, generator=torch.Generator().manual_seed(5))
    second = sample_uncertain_points(probs, valid_hw, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[1].sum(1).tolist() == [6, 0]
    points, point_valid = sample_uncertain_points(torch.zeros(0, 1, 4, 4), torch.zeros(0, 2).long())
    assert points.shape == (0, 0, 2) and point_valid.shape == (0, 0)


def test_invalid_settings_are_rejected():
    probs, valid_hw = torch.rand(1, 1, 8, 8), torch.tensor([[8, 8]])
    with pytest.raises(ValueError, match="beta"):
        sample_uncertain_points(probs, valid_hw, oversample_ratio=1, importance_ratio=2)
    with pytest.raises(ValueError, match="mode"):
        sample_uncertain_points(probs, valid_hw, mode="random")
