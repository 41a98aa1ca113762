"""The object-guided segmentor: backbone + center-keypoint detector + object-guided mask heads.

Detectron2's ``GeneralizedRCNN`` cannot be reused because its ``detector_postprocess`` treats
``pred_masks`` as box-relative M x M masks; the ROI heads here paste the masks themselves,
directly at the original image resolution, each in the window of its tight box. Network inputs
larger than the tile size are segmented tile by tile (:mod:`.tiling`). With test-time flips, the
backbone also reads each flipped copy of the inputs, and the mask heads average each ROI's
segmentations over them.
"""

from collections.abc import Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    Backbone,
    build_backbone,
    build_proposal_generator,
    build_roi_heads,
)
from detectron2.structures import ImageList, Instances
from torch import nn
from tqdm import tqdm

from .roi_heads import FLIP_DIMS, FlippedBatch
from .tiling import tile_grid

__all__ = ["ObjGuidedSegmentor"]


@META_ARCH_REGISTRY.register()
class ObjGuidedSegmentor(nn.Module):
    """Yi et al. (IEEE TMI 2021): the proposal generator detects object centres and boxes, the ROI
    heads segment every box (ground-truth boxes in training).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: nn.Module,
        roi_heads: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str | None = None,
        tile_size: int = 512,
        tile_overlap: int = 128,
        mask_test_flips: Sequence[str] = (),
    ):
        """
        Args:
            backbone: gives the feature maps both heads read.
            proposal_generator: forward(images, features, gt_instances) -> (proposals, losses).
            roi_heads: forward(images, features, proposals, targets, output_sizes)
                -> (instances, losses).
            pixel_mean, pixel_std: per-channel normalization of the input; their length is the
                number of image channels the model takes.
            input_format: channel order of the input images (e.g. "BGR"), for tools that feed
                or draw them.
            tile_size, tile_overlap: inputs with a side above ``tile_size`` are segmented in
                tiles of that side, neighbours overlapping by ``tile_overlap`` pixels.
            mask_test_flips: at inference, each ROI's mask probabilities are averaged over the
                inputs and their copies flipped so (:data:`.roi_heads.FLIP_DIMS`); the detector
                reads the inputs alone.
        """
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.input_format = input_format
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(
                f"PIXEL_MEAN has {len(pixel_mean)} values but PIXEL_STD has {len(pixel_std)}"
            )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if not 0 <= tile_overlap < tile_size:
            raise ValueError(
                f"MODEL.OBJGUIDED.TILE_OVERLAP ({tile_overlap}) must be below the tile size "
                f"({tile_size}: MODEL.OBJGUIDED.TILE_SIZE, else the test image size)"
            )
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        unknown = sorted(set(mask_test_flips) - set(FLIP_DIMS))
        if unknown:
            raise ValueError(
                f"MODEL.OBJGUIDED.MASK_TEST_FLIPS has {unknown}; expected some of {list(FLIP_DIMS)}"
            )
        self.mask_test_flips = tuple(mask_test_flips)
        # Channels-last weights, as the inputs (preprocess_image): oneDNN's CPU convolutions then
        # skip reordering each weight (the demo's training step: about 5 % less time).
        self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        og = cfg.MODEL.OBJGUIDED
        tile_size = og.TILE_SIZE or cfg.INPUT.TEST_IMAGE_SIZE or cfg.INPUT.IMAGE_SIZE
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, backbone.output_shape()),
            "roi_heads": build_roi_heads(cfg, backbone.output_shape()),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "tile_size": tile_size,
            "tile_overlap": og.TILE_OVERLAP or tile_size // 4,
            "mask_test_flips": og.MASK_TEST_FLIPS,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: list[dict]):
        """
        Args:
            batched_inputs: dataset-mapper dicts with "image" (C, H, W) at the network-input
                size, in training "instances" (gt_boxes, gt_classes, gt_masks at that size), at
                inference optionally the original "height" / "width".

        Returns:
            in training, the dict of losses; at inference, see :meth:`inference`.
        """
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, mask_losses = self.roi_heads(images, features, proposals, gt_instances)
        return {**proposal_losses, **mask_losses}

    def inference(self, batched_inputs: list[dict], do_postprocess: bool = True):
        """
        Args:
            batched_inputs: as in :meth:`forward`.
            do_postprocess: if True, predict at each input's original "height" / "width" (the
                network-input size where they are missing); if False, at the network-input size.

        Returns:
            with ``do_postprocess``, ``[{"instances": Instances}]`` per image, else the list of
            Instances. Each holds pred_masks (N masks of H x W as
            :class:`.mask_windows.MaskWindows`), pred_boxes, scores, pred_classes.
        """
        assert not self.training
        input_sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        output_sizes = [
            _original_size(x, hw) if do_postprocess else hw
            for x, hw in zip(batched_inputs, input_sizes)
        ]
        # inputs that fit a tile run batched, the others one at a time in tiles
        whole = [i for i, hw in enumerate(input_sizes) if max(hw) <= self.tile_size]
        batched = self.predict_whole(
            [batched_inputs[i] for i in whole], [output_sizes[i] for i in whole]
        )
        results = [None] * len(batched_inputs)
        for i, instances in zip(whole, batched):
            results[i] = instances
        for i, x in enumerate(batched_inputs):
            if results[i] is None:
                results[i] = self.predict_tiled(x, output_sizes[i])
        if do_postprocess:
            return [{"instances": r} for r in results]
        return results

    def predict_whole(
        self, batched_inputs: list[dict], output_sizes: list[tuple[int, int]]
    ) -> list[Instances]:
        """Predictions of whole network inputs, batched, at ``output_sizes``."""
        if not batched_inputs:
            return []
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals, _ = self.proposal_generator(images, features)
        results, _ = self.roi_heads(
            images,
            features,
            proposals,
            output_sizes=output_sizes,
            flipped=self.flipped_batches(images),
        )
        return results

    def predict_tiled(self, batched_input: dict, output_size: tuple[int, int]) -> Instances:
        """Predictions of one network input, tile by tile (:func:`.tiling.tile_grid`), at
        ``output_size``: each tile keeps the objects whose keypoint lies in its core and pastes
        their masks into the whole image; mask NMS then runs across the tiles."""
        image = batched_input["image"]
        height, width = image.shape[-2:]
        tiles = tile_grid(height, width, self.tile_size, self.tile_overlap)
        parts = []
        name = batched_input.get("file_name", "")
        for tile in tqdm(tiles, desc=f"tiles of {name}", unit="tile", leave=False, disable=None):
            crop = {**batched_input, "image": image[:, tile.y0 : tile.y1, tile.x0 : tile.x1]}
            images = self.preprocess_image([crop])
            features = self.backbone(images.tensor)
            (proposals,), _ = self.proposal_generator(images, features)
            keypoints = proposals.proposal_keypoints + proposals.proposal_keypoints.new_tensor(
                [tile.x0, tile.y0]
            )
            (instances,), _ = self.roi_heads(
                images,
                features,
                [proposals[tile.holds(keypoints)]],
                output_sizes=[output_size],
                placements=[tile.placement((height, width))],
                flipped=self.flipped_batches(images),
            )
            parts.append(instances)
        return self.roi_heads.merge_tiles(parts)

    def flipped_batches(self, images: ImageList) -> list[FlippedBatch]:
        """The padded batch flipped as ``mask_test_flips`` asks, each with its backbone
        features."""
        batches = []
        for flip in self.mask_test_flips:
            dims = FLIP_DIMS[flip]
            tensor = images.tensor.flip(dims).contiguous(memory_format=torch.channels_last)
            flipped = ImageList(tensor, images.image_sizes)
            batches.append(FlippedBatch(dims, flipped, self.backbone(tensor)))
        return batches

    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Normalize, replicate a single-channel image to the model's channels, pad and batch
        (a channels-last (N, C, H, W) tensor)."""
        num_channels = len(self.pixel_mean)
        images = []
        for x in batched_inputs:
            image = x["image"].to(self.device)
            if image.shape[0] != num_channels:
                if image.shape[0] != 1:
                    raise ValueError(
                        f"image {x.get('file_name', '')!r} has {image.shape[0]} channels but the "
                        f"model takes {num_channels} (MODEL.PIXEL_MEAN has {num_channels} values)"
                    )
                # Grayscale microscopy fed to an RGB/BGR model: every channel sees the intensity.
                image = image.expand(num_channels, -1, -1)
            images.append((image - self.pixel_mean) / self.pixel_std)
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        # Channels-last through the whole network: its convolutions run at least as fast so, and
        # the ROI heads crop the feature maps in that layout without copying them.
        return ImageList(
            images.tensor.contiguous(memory_format=torch.channels_last), images.image_sizes
        )


def _original_size(batched_input: dict, image_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) the predictions of one image are returned at."""
    return (
        int(batched_input.get("height", image_size[0])),
        int(batched_input.get("width", image_size[1])),
    )
