"""Test-time flips (``MODEL.OBJGUIDED.TEST_FLIPS``): the network inputs flipped, with their
backbone features, which the detector and the mask heads read beside the inputs themselves.

A padded batch of H x W (multiples of every stride) flips onto itself: continuous coordinate x
becomes W - x, pixel k becomes W - 1 - k, and cell j of a stride-s output whose cell spans input
pixels [s j, s j + s) (the detector's heatmap) becomes cell W / s - 1 - j.
"""

from typing import NamedTuple

import torch
from detectron2.structures import ImageList

__all__ = ["FLIP_DIMS", "FlippedBatch", "flipped_batch"]

# Each flip of TEST_FLIPS as the tensor dims it flips ("both": turned by 180 degrees).
FLIP_DIMS = {"horizontal": (-1,), "vertical": (-2,), "both": (-2, -1)}


class FlippedBatch(NamedTuple):
    """The network inputs flipped along ``dims`` (values of :data:`FLIP_DIMS`), with their
    backbone features."""

    dims: tuple[int, ...]
    images: ImageList  # the flipped padded batch, same image_sizes
    features: dict[str, torch.Tensor]


def flipped_batch(images: ImageList, flip: str, backbone: torch.nn.Module) -> FlippedBatch:
    """``images`` (a padded, channels-last batch) flipped as ``flip`` names, read by
    ``backbone``."""
    dims = FLIP_DIMS[flip]
    tensor = images.tensor.flip(dims).contiguous(memory_format=torch.channels_last)
    return FlippedBatch(dims, ImageList(tensor, images.image_sizes), backbone(tensor))
