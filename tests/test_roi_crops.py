"""ROI pyramids, grouping and crops, checked against hand-computed values and the plain
``grid_sample`` crop of one ROI."""

import math

import pytest
import torch
from detectron2.modeling import build_backbone
from helpers import objguided_cfg

from objguided_d2.modeling.roi_crops import (
    build_roi_pyramid,
    crop_masks,
    crop_one_roi,
    crop_roi_groups,
    crop_rois,
    flip_rois,
    group_rois,
    jitter_boxes,
    keypoint_maps,
    valid_mask,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_pyramid_sizes_and_levels_near_the_limits():
    boxes = torch.tensor(
        [
            [10.0, 20.0, 30.0, 50.0],  # 20 x 30 -> 22 x 33 enlarged
            [0.0, 0.0, 7.2, 40.0],  # 1.1 * 7.2 / 4 = 1.98 < 2: stops before level 2
            [0.0, 0.0, 7.28, 40.0],  # 1.1 * 7.28 / 4 = 2.002: level 2 has 2 columns
            [5.0, 5.0, 6.0, 6.0],  # 1 px: 1.1 < 2 at level 0, skipped
            [0.0, 0.0, 100.0, 100.0],  # all five levels
        ]
    )
    pyramid = build_roi_pyramid(boxes)
    assert pyramid.strides == (1, 2, 4, 8, 16)
    assert pyramid.num_levels.tolist() == [4, 2, 3, 0, 5]
    assert pyramid.level_hw[0].tolist() == [[33, 22], [16, 11], [8, 5], [4, 2], [0, 0]]
    assert pyramid.level_hw[1].tolist() == [[44, 7], [22, 3], [0, 0], [0, 0], [0, 0]]
    assert pyramid.level_hw[2, :3].tolist() == [[44, 8], [22, 4], [11, 2]]
    assert pyramid.level_hw[3].abs().sum() == 0
    assert pyramid.level_hw[4].tolist() == [[110, 110], [55, 55], [27, 27], [13, 13], [6, 6]]
    # centres in pixel-index coordinates, sizes enlarged
    assert pyramid.centers[0].tolist() == [19.5, 34.5]
    assert torch.allclose(pyramid.sizes[0], torch.tensor([22.0, 33.0], dtype=torch.float64))


def test_pixel_grid_samples_whole_pixels_one_apart_and_crops_masks_exactly():
    boxes = torch.tensor([[10.3, 20.6, 30.1, 50.2], [3.0, 4.0, 70.0, 9.0]])
    authors = build_roi_pyramid(boxes)
    pyramid = build_roi_pyramid(boxes, pixel_grid=True)
    # the same sample counts at every level
    assert torch.equal(pyramid.level_hw, authors.level_hw)
    for roi in range(len(boxes)):
        (y, _), (x, _) = pyramid[torch.tensor([roi])].positions(0, pyramid.level_hw[roi, 0])
        for axis, positions in ((0, x[0]), (1, y[0])):
            assert torch.equal(positions, positions.round())
            assert torch.equal(positions.diff(), torch.ones_like(positions[1:]))
            # where the authors' grid starts, within half a pixel
            authors_start = authors.centers[roi, axis] - authors.sizes[roi, axis] / 2
            assert abs(positions[0] - authors_start) <= 0.5
    # a 1-px line crosses the crop at full strength, not as two half-pixels
    masks = torch.zeros(1, 64, 80, dtype=torch.bool)
    masks[0, :, 20] = True
    one = build_roi_pyramid(torch.tensor([[15.0, 25.3, 27.0, 40.0]]), pixel_grid=True)
    soft = crop_masks(masks, one, tuple(one.level_hw[0, 0].tolist()))
    assert set(soft.unique().tolist()) == {0.0, 1.0}
    assert (soft[0, 0].sum(dim=1) == 1).all()
    blended = build_roi_pyramid(torch.tensor([[15.0, 25.3, 27.0, 40.0]]))
    assert crop_masks(masks, blended, tuple(blended.level_hw[0, 0].tolist())).max() < 1


def test_pyramid_subset_and_custom_levels():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 40.0, 20.0]])
    pyramid = build_roi_pyramid(boxes, strides=(1, 4), enlarge=1.0, min_size=3.0)
    assert pyramid.level_hw.tolist() == [[[10, 10], [0, 0]], [[20, 40], [5, 10]]]
    sub = pyramid[torch.tensor([1])]
    assert len(sub) == 1 and sub.level_hw.tolist() == [[[20, 40], [5, 10]]]


@pytest.mark.parametrize("dims", [(-1,), (-2,), (-2, -1)])
def test_mirrored_grids_sample_the_mirror_image_of_each_rois_grid(dims):
    """In the image flipped along ``dims``, the mirrored grids read at sample k what the grids
    read at sample n - 1 - k, at every level: flip_rois then puts the crops of the flipped maps
    back onto the crops of the maps. The maps are linear ramps (bilinear crops are exact on
    them), cell j of a stride-s map on pixel s * j of its image."""
    image_hw = (48, 64)
    boxes = torch.tensor([[9.0, 10.0, 40.5, 30.0], [20.0, 8.0, 33.0, 38.5]])
    pyramid = build_roi_pyramid(boxes, strides=(1, 2, 4), enlarge=1.1)
    mirrored = pyramid.mirrored(dims, image_hw)
    slopes = torch.tensor([[1.0, 0.5], [-0.25, 2.0]])  # (channel, (x, y))

    def ramp(stride, flipped):
        y, x = torch.meshgrid(
            *(torch.arange(0, side, stride, dtype=torch.float32) for side in image_hw),
            indexing="ij",
        )
        for dim in dims if flipped else ():  # the flipped image's pixel is the mirror of this
            if dim == -1:
                x = image_hw[1] - 1 - x
            else:
                y = image_hw[0] - 1 - y
        return (slopes[:, 0, None, None] * x + slopes[:, 1, None, None] * y)[None]

    for level, stride in enumerate(pyramid.strides):
        pad_hw = pyramid.level_hw[:, level].amax(dim=0).tolist()
        image_of_roi = torch.zeros(len(boxes), dtype=torch.long)
        crops, valid = crop_rois(ramp(stride, False), image_of_roi, pyramid, level, pad_hw)
        flipped, _ = crop_rois(ramp(stride, True), image_of_roi, mirrored, level, pad_hw)
        back = flip_rois(flipped, pyramid.level_hw[:, level], dims)
        torch.testing.assert_close(back * valid, crops * valid)
        assert not torch.allclose(flipped * valid, crops * valid)


def test_flip_rois_flips_each_valid_region_and_keeps_the_padding_zero():
    hw = torch.tensor([[2, 3], [3, 4], [0, 0]])
    maps = torch.arange(1, 3 * 2 * 3 * 4 + 1, dtype=torch.float32).view(3, 2, 3, 4)
    maps = maps * valid_mask(hw, (3, 4))
    flipped = flip_rois(maps, hw, (-2, -1))
    torch.testing.assert_close(flipped[0, :, :2, :3], maps[0, :, :2, :3].flip(-2, -1))
    torch.testing.assert_close(flipped[1], maps[1].flip(-2, -1))
    torch.testing.assert_close(flipped * valid_mask(hw, (3, 4)), flipped)
    torch.testing.assert_close(flip_rois(maps, hw, (-1,)), flip_rois(flipped, hw, (-2,)))


def test_jittered_boxes_stay_within_their_shift_and_scale_bounds():
    torch.manual_seed(0)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]]).repeat(2000, 1)  # 20 x 40, centre (20, 40)
    jittered = jitter_boxes(boxes, 0.2)
    centers = (jittered[:, :2] + jittered[:, 2:]) / 2
    sizes = jittered[:, 2:] - jittered[:, :2]
    shift = (centers - torch.tensor([20.0, 40.0])) / torch.tensor([20.0, 40.0])
    scale = sizes / torch.tensor([20.0, 40.0])
    assert shift.abs().max() <= 0.1 + 1e-6 and scale.min() >= 0.8 - 1e-6 and scale.max() <= 1.2
    # uniform draws: both ends of each range are reached, and the axes vary independently
    assert shift.abs().max() > 0.09 and scale.min() < 0.81 and scale.max() > 1.19
    assert abs(torch.corrcoef(scale.T)[0, 1]) < 0.1
    assert torch.equal(jitter_boxes(boxes[:3], 0.0), boxes[:3])


def test_crop_of_linear_ramp_is_exact_at_the_cell_positions():
    # f(u, v) = 3 + 2u - v is reproduced exactly by bilinear sampling inside the map
    height, width = 40, 50  # a stride-4 map of a 160 x 200 input
    v, u = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    feature = (3.0 + 2.0 * u - v).float()[None, None].repeat(1, 2, 1, 1)
    feature[0, 1] *= -1
    box = torch.tensor([[40.0, 30.0, 100.0, 110.0]])  # 60 x 80 -> 66 x 88 enlarged
    pyramid = build_roi_pyramid(box)
    crops, valid = crop_rois(feature, torch.tensor([0]), pyramid, 2, (25, 20))
    h, w = pyramid.level_hw[0, 2].tolist()
    assert (h, w) == (22, 16)
    # stride 4: u = x / 4 with x_k = 69.5 - 33 + k * 66 / 15
    uk = (69.5 - 33 + torch.arange(w, dtype=torch.float64) * 66 / 15) / 4
    vk = (69.5 - 44 + torch.arange(h, dtype=torch.float64) * 88 / 21) / 4
    expected = 3.0 + 2.0 * uk[None, :] - vk[:, None]
    assert torch.allclose(crops[0, 0, :h, :w].double(), expected, atol=1e-4)
    assert torch.allclose(crops[0, 1, :h, :w].double(), -expected, atol=1e-4)
    reference = crop_one_roi(feature, pyramid, 2)
    assert reference.shape == (1, 2, h, w)
    assert torch.allclose(reference[0, 0].double(), expected, atol=1e-4)
    assert crops[0, :, h:].abs().sum() == 0 and crops[0, :, :, w:].abs().sum() == 0
    assert valid.dtype == torch.bool and valid.shape == (1, 1, 25, 20)
    assert valid[0, 0].sum() == h * w and valid[0, 0, :h, :w].all()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_crop_matches_the_grid_sample_crop_of_each_roi_with_zeros_outside_the_map(memory_format):
    torch.manual_seed(0)
    # stride 4 of 64 x 80
    features = torch.randn(2, 3, 16, 20).contiguous(memory_format=memory_format)
    boxes = torch.tensor(
        [
            [-6.0, -4.0, 20.0, 30.0],  # sticks out at the top-left
            [50.0, 40.0, 85.0, 70.0],  # sticks out at the bottom-right
            [10.0, 12.0, 40.0, 24.0],
        ]
    )
    batch_index = torch.tensor([1, 0, 1])
    pyramid = build_roi_pyramid(boxes)
    crops, _ = crop_rois(features, batch_index, pyramid, 2, (12, 12))
    assert crops.is_contiguous(memory_format=torch.channels_last)
    for r in range(3):
        reference = crop_one_roi(features[batch_index[r], None], pyramid[[r]], 2)[0]
        h, w = reference.shape[1:]
        assert pyramid.level_hw[r, 2].tolist() == [h, w]
        torch.testing.assert_close(crops[r, :, :h, :w], reference, atol=1e-5, rtol=0)
        assert crops[r, :, h:].abs().sum() == 0 and crops[r, :, :, w:].abs().sum() == 0


def test_crop_groups_equal_single_batch_crops_and_gradients():
    torch.manual_seed(1)
    boxes = torch.tensor(
        [[3.0, 4.0, 40.0, 30.0], [10.0, 10.0, 22.0, 19.0], [0.0, 20.0, 60.0, 63.0]]
    )
    batch_index = torch.tensor([0, 1, 1])
    pyramid = build_roi_pyramid(boxes)
    feature = torch.randn(2, 4, 32, 32, requires_grad=True)  # stride 2
    groups = group_rois(pyramid, min_saving=0)
    assert len(groups) == 3
    grouped = crop_roi_groups(feature, batch_index, pyramid, 1, groups)
    single, _ = crop_rois(feature, batch_index, pyramid, 1, pyramid.level_hw[:, 1].amax(0))
    for group, crops in zip(groups, grouped):
        assert crops.shape == (len(group.indices), 4, *group.pad_hw[1])
        h, w = group.pad_hw[1]
        assert torch.equal(crops, single[group.indices, :, :h, :w])
    weights = torch.randn_like(single)
    (grad_single,) = torch.autograd.grad((single * weights).sum(), feature)
    grouped_loss = sum(
        (crops * weights[g.indices, :, : crops.shape[2], : crops.shape[3]]).sum()
        for g, crops in zip(groups, grouped)
    )
    (grad_grouped,) = torch.autograd.grad(grouped_loss, feature)
    torch.testing.assert_close(grad_grouped, grad_single)
    # the gradient is the adjoint of the crop: <crop(f), g> = <f, grad>
    assert torch.allclose((grad_single * feature).sum(), (single * weights).sum(), rtol=1e-4)


def test_crop_masks_reads_each_rois_own_mask():
    masks = torch.zeros(3, 40, 50, dtype=torch.bool)
    masks[0, 10:30, 10:30] = True
    masks[1, 5:15, 20:45] = True
    masks[2] = True
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [20.0, 5.0, 45.0, 15.0]])
    pyramid = build_roi_pyramid(boxes)
    soft = crop_masks(masks, pyramid, (24, 30), mask_index=torch.tensor([0, 1]))
    for r in range(2):
        reference = crop_one_roi(masks[r, None, None].float(), pyramid[[r]], 0)[0]
        h, w = reference.shape[1:]
        torch.testing.assert_close(soft[r, :, :h, :w], reference, atol=1e-5, rtol=0)
        assert soft[r, :, h:].sum() == 0 and soft[r, :, :, w:].sum() == 0
    # 20 px box -> 22 samples at 8.5 + k * 22 / 21: samples 2..19 lie in [10, 29], first is out
    assert soft[0, 0, 2:20, 2:20].eq(1).all() and soft[0, 0, 0, :].max() == 0
    assert 0 < soft[0, 0, 1, 5] < 1
    # ROI 0 reading the all-ones mask 2 is 1 wherever the grid lies in the image
    ones = crop_masks(masks, pyramid[:1], (22, 22), mask_index=torch.tensor([2]))
    torch.testing.assert_close(ones, torch.ones_like(ones))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_masks_accepts_byte_and_float_masks(dtype):
    masks = torch.zeros(1, 30, 30, dtype=torch.bool)
    masks[0, 5:20, 8:25] = True
    pyramid = build_roi_pyramid(torch.tensor([[8.0, 5.0, 25.0, 20.0]]))
    expected = crop_masks(masks, pyramid, (16, 18))
    assert torch.equal(crop_masks(masks.to(dtype), pyramid, (16, 18)), expected)


def test_keypoint_maps_peak_at_the_keypoint_with_the_same_width_at_every_level():
    """An 11-px box (enlarge 1): level 0 samples x = -0.5 + 1.1 k (pixel index), level 1
    x = -0.5 + 2.75 k. A keypoint at pixel centre 5 (continuous 5.5) lies on sample 5, then
    sample 2; sigma 0.1 of the 11-px side is 1.1 px at both levels. A 4-px ROI padded into the
    same batch is zero outside its own 4 x 4 and 2 x 2 samples."""
    boxes = torch.tensor([[0.0, 0.0, 11.0, 11.0], [20.0, 20.0, 24.0, 24.0]])
    keypoints = torch.tensor([[5.5, 5.5], [22.0, 22.0]])
    pyramid = build_roi_pyramid(boxes, strides=(1, 2), enlarge=1.0)
    level0 = keypoint_maps(pyramid, keypoints, 0, (11, 11), sigma=0.1)
    level1 = keypoint_maps(pyramid, keypoints, 1, (5, 5), sigma=0.1)
    assert level0.shape == (2, 1, 11, 11) and level1.shape == (2, 1, 5, 5)
    assert level0.dtype == torch.float32
    assert level0[0, 0, 5, 5] == 1 and level1[0, 0, 2, 2] == 1
    assert level0[0, 0].argmax() == 5 * 11 + 5 and level1[0, 0].argmax() == 2 * 5 + 2
    torch.testing.assert_close(level0[0, 0, 5, 6], torch.tensor(math.exp(-0.5)))
    torch.testing.assert_close(level1[0, 0, 3, 2], torch.tensor(math.exp(-0.5 * 2.5**2)))
    for maps, side in ((level0, 4), (level1, 2)):
        assert (maps[1, 0, :side, :side] > 0).all()
        assert not maps[1, 0, side:].any() and not maps[1, 0, :, side:].any()


def test_valid_mask():
    mask = valid_mask(torch.tensor([[2, 3], [0, 4], [3, 1]]), (3, 4))
    assert mask.shape == (3, 1, 3, 4)
    assert mask.sum((1, 2, 3)).tolist() == [6, 0, 3]
    assert mask[0, 0, :2, :3].all() and mask[2, 0, :, 0].all()


def test_group_rois_partitions_the_rois_and_cuts_while_it_saves_padding():
    torch.manual_seed(5)
    xy = torch.rand(200, 2) * 400
    wh = torch.rand(200, 2) ** 2 * 90 + 0.5
    pyramid = build_roi_pyramid(torch.cat((xy, xy + wh), dim=1))
    kept = torch.nonzero(pyramid.num_levels > 0).squeeze(1)
    assert len(kept) < 200

    def padded_area(indices):
        return len(indices) * int(pyramid.level_hw[indices, 0].amax(0).prod())

    for min_saving in (0, 1000, 10**9):
        groups = group_rois(pyramid, min_saving=min_saving)
        members = torch.cat([g.indices for g in groups])
        assert sorted(members.tolist()) == kept.tolist()
        for group in groups:
            assert group.indices.tolist() == sorted(group.indices.tolist())
            levels = pyramid.num_levels[group.indices]
            assert (levels == group.num_levels).all()
            hw = pyramid.level_hw[group.indices]
            for level, pad in enumerate(group.pad_hw):
                assert list(pad) == hw[:, level].amax(0).tolist()
            # no cut between consecutive ROIs by height or by width saves more than min_saving
            for axis in (0, 1):
                order = group.indices[torch.sort(hw[:, 0, axis], stable=True).indices]
                for cut in range(1, len(order)):
                    saving = padded_area(order) - padded_area(order[:cut])
                    saving -= padded_area(order[cut:])
                    assert saving <= min_saving
        if min_saving == 10**9:  # never cut: one group per number of levels
            assert len(groups) == len(pyramid.num_levels[kept].unique())
    # the default cuts into fewer groups than cutting at any saving, padding more
    cut_all, default = group_rois(pyramid, min_saving=0), group_rois(pyramid)
    assert len(default) < len(cut_all)
    assert sum(padded_area(g.indices) for g in default) > sum(
        padded_area(g.indices) for g in cut_all
    )

    limited = group_rois(pyramid, max_group_pixels=4000)
    assert sorted(torch.cat([g.indices for g in limited]).tolist()) == kept.tolist()
    for group in limited:
        pad_area = group.pad_hw[0][0] * group.pad_hw[0][1]
        assert len(group.indices) == 1 or len(group.indices) * pad_area <= 4000


def test_group_rois_separates_two_sizes_and_keeps_near_sizes_together():
    boxes = torch.tensor([[0.0, 0.0, 40.0, 36.0]] * 5 + [[0.0, 0.0, 60.0, 50.0]] * 3)
    near = torch.tensor([[0.0, 0.0, 41.0, 36.0]] * 2)  # one pixel wider: cutting saves 195 px
    pyramid = build_roi_pyramid(torch.cat((boxes, near)))
    assert (pyramid.num_levels == 5).all()
    groups = group_rois(pyramid)
    assert [g.indices.tolist() for g in groups] == [[0, 1, 2, 3, 4, 8, 9], [5, 6, 7]]
    assert groups[0].pad_hw[0] == (39, 45) and groups[1].pad_hw[0] == (55, 66)
    assert len(group_rois(pyramid, min_saving=0)) == 3


def test_group_rois_without_kept_rois():
    pyramid = build_roi_pyramid(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert group_rois(pyramid) == []
    assert group_rois(build_roi_pyramid(torch.zeros(0, 4))) == []


@pytest.mark.parametrize("depth", [18, 50])
def test_crops_read_each_level_where_the_backbone_puts_an_input_pixel(depth):
    """Trace one bright pixel through the backbone with positive averaging weights (every layer
    then moves the pixel's response without reshaping it) and find the centroid of its response
    at each cropped level. The stem puts input pixel x exactly at u = x / s, where the crops
    read it; the decoder's maps add upsampled deeper maps, which F.interpolate's half-pixel
    convention moves further down-right, so their centroid lies at or beyond x / s, never on the
    up-left side where a (x + 0.5) / s - 0.5 crop would read."""
    cfg = objguided_cfg(depth, compact=depth == 18)
    backbone = build_backbone(cfg).eval()
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.fill_(1.0 / module.weight[0].numel())
                if module.bias is not None:
                    module.bias.zero_()
            elif hasattr(module, "running_var"):  # batch norm as the identity
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.weight.fill_(1.0)
                module.bias.zero_()
        pixel = (253.0, 258.0)  # (y, x)
        image = torch.zeros(1, 3, 512, 512)
        image[0, :, int(pixel[0]), int(pixel[1])] = 1.0
        response = backbone(image)
        background = backbone(torch.zeros_like(image))
    # a 63 px box centred on the pixel: odd sample counts (63, 31, 15, 7, 3), whose middle
    # sample at each level is the pixel itself
    y, x = pixel
    pyramid = build_roi_pyramid(torch.tensor([[x - 31, y - 31, x + 32, y + 32]]), enlarge=1.0)
    for level, name in enumerate(["stem", "dec4", "dec8", "dec16"], start=1):
        stride = backbone.output_shape()[name].stride
        energy = (response[name] - background[name]).sum(dim=1)[0].double()
        centroid = [
            (energy.sum(dim=1 - axis) * torch.arange(energy.shape[axis])).sum() / energy.sum()
            for axis in (0, 1)
        ]
        # where the crops read the pixel: the middle sample at this level
        (ys, _), (xs, _) = pyramid.positions(level, pyramid.level_hw[0, level].tolist())
        read = (ys[0, ys.shape[1] // 2].item(), xs[0, xs.shape[1] // 2].item())
        for axis in (0, 1):
            assert read[axis] == pytest.approx(pixel[axis] / stride)
            if name == "stem":
                assert centroid[axis].item() == pytest.approx(read[axis], abs=1e-6)
            else:
                assert centroid[axis].item() >= read[axis] - 1e-6, (name, axis)
