"""Tiled inference: the tile grid, and tiles giving the objects of whole-image inference, each
once, wherever they lie relative to the tiles' borders."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from helpers import objguided_cfg
from scipy import ndimage
from torch import nn

from objguided_d2.modeling.mask_windows import MaskWindows
from objguided_d2.modeling.tiling import tile_grid


@pytest.mark.parametrize(
    "height, width, size, overlap",
    [(700, 700, 256, 64), (513, 1500, 512, 128), (300, 200, 512, 128), (1024, 1024, 512, 0)],
)
def test_tiles_cover_the_image_and_their_cores_partition_it(height, width, size, overlap):
    tiles = tile_grid(height, width, size, overlap)
    cover = np.zeros((height, width), dtype=int)
    cores = np.zeros((height, width), dtype=int)
    for tile in tiles:
        assert 0 <= tile.y0 < tile.y1 <= height and 0 <= tile.x0 < tile.x1 <= width
        assert tile.y1 - tile.y0 <= size and tile.x1 - tile.x0 <= size
        assert tile.y0 <= tile.core_y0 < tile.core_y1 <= tile.y1
        assert tile.x0 <= tile.core_x0 < tile.core_x1 <= tile.x1
        cover[tile.y0 : tile.y1, tile.x0 : tile.x1] += 1
        cores[tile.core_y0 : tile.core_y1, tile.core_x0 : tile.core_x1] += 1
    assert (cover >= 1).all() and (cores == 1).all()
    # neighbours overlap by the overlap at least, and a core keeps half of it from the border
    starts_x = sorted({t.x0 for t in tiles})
    for a, b in zip(starts_x, starts_x[1:]):
        assert a + size - b >= overlap
    for tile in tiles:
        if tile.x1 < width:
            assert tile.x1 - tile.core_x1 >= overlap // 2
        if tile.x0 > 0:
            assert tile.core_x0 - tile.x0 >= overlap // 2
    # as few tiles as that allows
    per_axis = [
        max(1, -(-(n - overlap) // (size - overlap))) if n > size else 1 for n in (height, width)
    ]
    assert len(tiles) == per_axis[0] * per_axis[1]


def test_tile_overlap_must_be_below_the_tile_size():
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(1000, 1000, 256, 256)
    cfg = objguided_cfg(compact=True, opts=["MODEL.OBJGUIDED.TILE_OVERLAP", 600])
    with pytest.raises(ValueError, match="MODEL.OBJGUIDED.TILE_OVERLAP"):
        build_model(cfg)


class BlobDetector(nn.Module):
    """A proposal generator that finds the bright connected blobs of channel 0 of the (normalized)
    input: its boxes follow the image content exactly, in whichever tile."""

    def forward(self, images, features, gt_instances=None):
        proposals = []
        for image, (height, width) in zip(images.tensor, images.image_sizes):
            labels, count = ndimage.label((image[0, :height, :width] > 0).numpy())
            slices = ndimage.find_objects(labels)
            boxes = torch.tensor(
                [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices],
                dtype=torch.float32,
            ).view(-1, 4)
            instances = Instances((height, width))
            instances.proposal_boxes = Boxes(boxes)
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            instances.objectness_logits = areas / 100  # distinct scores, larger blobs first
            instances.pred_classes = torch.zeros(count, dtype=torch.long)
            instances.proposal_keypoints = (boxes[:, :2] + boxes[:, 2:]) / 2
            proposals.append(instances[instances.objectness_logits.argsort(descending=True)])
        return proposals, {}


def blob_image(height: int, width: int, seed: int) -> tuple[torch.Tensor, list[tuple]]:
    """(3, H, W) uint8 image of bright rectangles (6 to 40 px, 12 px apart at least) on black,
    some across the tile borders of a 256-px, 64-px overlap grid, and their XYXY boxes."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width), dtype=np.uint8)
    taken = np.zeros((height, width), dtype=bool)
    boxes = []
    while len(boxes) < 60:
        h, w = rng.integers(6, 41, size=2)
        y, x = rng.integers(2, height - h - 2), rng.integers(2, width - w - 2)
        if taken[max(0, y - 12) : y + h + 12, max(0, x - 12) : x + w + 12].any():
            continue
        taken[y : y + h, x : x + w] = True
        image[y : y + h, x : x + w] = 255
        boxes.append((x, y, x + w, y + h))
    return torch.from_numpy(image).expand(3, -1, -1).contiguous(), boxes


@pytest.fixture(scope="module")
def blob_model():
    torch.manual_seed(0)
    # Masks are every pixel an ROI's samples reach (threshold just above 0), so that they depend
    # on the boxes alone and tiled and whole-image predictions can be compared exactly.
    cfg = objguided_cfg(
        compact=True,
        opts=[
            "MODEL.OBJGUIDED.MASK_THRESH_TEST", 1e-6,
            "MODEL.OBJGUIDED.TILE_SIZE", 256,
            "MODEL.OBJGUIDED.TILE_OVERLAP", 64,
        ],
    )  # fmt: skip
    model = build_model(cfg)
    model.proposal_generator = BlobDetector()
    return model.eval()


@pytest.mark.parametrize(
    "output_hw, flips",
    [((700, 650), ()), ((350, 325), ()), ((1000, 900), ()), ((700, 650), ("horizontal", "both"))],
)
def test_tiled_inference_gives_each_object_once_as_whole_image_inference(
    blob_model, output_hw, flips, monkeypatch
):
    """Also with test-time flips, which each tile then reads flipped about its own sides."""
    monkeypatch.setattr(blob_model, "mask_test_flips", flips)
    image, boxes = blob_image(700, 650, seed=4)
    tiles = tile_grid(700, 650, 256, 64)
    straddling = [b for b in boxes if any(b[0] < t.x1 < b[2] or b[1] < t.y1 < b[3] for t in tiles)]
    assert len(straddling) >= 10  # the case the tiling must handle
    inputs = [{"image": image, "height": output_hw[0], "width": output_hw[1]}]
    with torch.no_grad():
        tiled = blob_model(inputs)[0]["instances"]
        blob_model.tile_size = 1024
        try:
            whole = blob_model(inputs)[0]["instances"]
        finally:
            blob_model.tile_size = 256
    assert len(whole) == len(tiled) == len(boxes)
    scale = torch.tensor([output_hw[1] / 650, output_hw[0] / 700] * 2)
    expected = torch.tensor(sorted(boxes), dtype=torch.float32) * scale
    for predictions in (whole, tiled):
        assert isinstance(predictions.pred_masks, MaskWindows)
        order = sorted(
            range(len(predictions)), key=lambda i: predictions.pred_boxes.tensor[i].tolist()
        )
        torch.testing.assert_close(predictions.pred_boxes.tensor[order], expected)
    # identical masks, boxes and scores, object by object
    match = [
        int((whole.pred_boxes.tensor == box).all(dim=1).nonzero()[0, 0])
        for box in tiled.pred_boxes.tensor
    ]
    assert sorted(match) == list(range(len(whole)))
    torch.testing.assert_close(tiled.scores, whole.scores[match])
    assert torch.equal(tiled.pred_masks.to_masks(), whole.pred_masks.to_masks()[match])


def test_tiled_inference_of_an_empty_image_gives_nothing(blob_model):
    image = torch.zeros((3, 600, 300), dtype=torch.uint8)
    with torch.no_grad():
        (result,) = blob_model([{"image": image}])
    assert len(result["instances"]) == 0
    assert result["instances"].image_size == (600, 300)


def test_merging_tiles_keeps_an_object_found_in_two_tiles_once(blob_model):
    masks = torch.zeros((3, 40, 60), dtype=torch.bool)
    masks[0, 5:20, 5:25] = True
    masks[1, 5:20, 6:25] = True  # the same object, found again from another tile's core
    masks[2, 25:35, 40:55] = True
    parts = []
    for index, score in zip(range(3), (0.9, 0.8, 0.7)):
        part = Instances((40, 60))
        part.pred_masks = MaskWindows.from_masks(masks[index : index + 1]).tight()
        part.pred_boxes = Boxes(part.pred_masks.boxes)
        part.scores = torch.tensor([score])
        part.pred_classes = torch.zeros(1, dtype=torch.long)
        parts.append(part)
    merged = blob_model.roi_heads.merge_tiles(parts)
    assert merged.scores.tolist() == pytest.approx([0.9, 0.7])
    assert torch.equal(merged.pred_masks.to_masks(), masks[[0, 2]])
