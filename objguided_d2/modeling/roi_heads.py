"""Object-guided mask heads (Yi et al., TMI 2021, Sec. II-B and II-C).

Every box is cropped, enlarged, at up to five levels with a size-adaptive grid (see
:mod:`.roi_crops`): a two-conv stem on the image (stride 1), the backbone's stride-2 stem and the
decoder's stride-4/8/16 maps (the "object guidance"). The crops are fused top-down by the "S"
modules (:class:`.fusion.FusionBlock` with instance norm) into e2 (level 1) and e1 (level 0), and
a two-conv head predicts mask logits at the ROI's own level-0 resolution. Training uses the
ground-truth boxes and adds the auxiliary refinement: point heads on e1 and [e1, e2] at the most
uncertain points of each predicted mask. Inference pastes the masks back into their windows of the
image, filters them with mask NMS and writes out the kept ones as full-image masks
(:mod:`.mask_windows`); given flipped copies of the batch (:class:`FlippedBatch`), each ROI's
probabilities are the mean of its segmentations in the batch and in each copy. Optionally
(``keypoint_guidance_sigma``, a departure from the paper), each ROI's crops also carry a Gaussian
at its keypoint, so that a box holding several objects says which one is meant, and
(``mask_iou_head``) a learned score of each mask's IoU (:mod:`.mask_quality`) joins its ranking,
as may the agreement of its flipped views (``mask_flip_agreement_power``), and the scores decay
with the masks' overlaps before NMS (``mask_matrix_nms_sigma``).

The branch's computation is written once (:meth:`ObjGuidedROIHeads.mask_branch`) and runs two
ways: on padded groups of ROIs (:func:`.roi_crops.group_rois`), each layer in its padded-batch
variant (:mod:`.padded_layers`), or, with ``batch_rois=False``, one unpadded ROI at a time with
plain PyTorch layers (``grid_sample`` crops, ``F.interpolate``, ``nn.InstanceNorm2d``): the
reference the batched path is tested against.
"""

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
from detectron2.structures import BitMasks, Boxes, ImageList, Instances
from torch import nn

from .fusion import FusionBlock
from .mask_quality import MaskIoUHead, max_mask_ious
from .mask_windows import MaskWindows, mask_nms, matrix_nms_decay, paste_mask_windows
from .point_sampling import point_sample_rois, sample_uncertain_points
from .roi_crops import (
    RoiGroup,
    RoiPyramid,
    build_roi_pyramid,
    crop_masks,
    crop_one_roi,
    crop_roi_groups,
    flip_rois,
    group_rois,
    jitter_boxes,
    keypoint_maps,
    valid_mask,
)
from .tiling import Placement

__all__ = ["FlippedBatch", "GroupOutput", "ObjGuidedROIHeads"]

# Test-time flips (MODEL.OBJGUIDED.MASK_TEST_FLIPS) as the tensor dims they flip.
FLIP_DIMS = {"horizontal": (-1,), "vertical": (-2,), "both": (-2, -1)}


class GroupOutput(NamedTuple):
    """Mask-branch outputs of one :class:`RoiGroup` of G ROIs (padded, zero outside each ROI)."""

    logits: torch.Tensor  # (G, 1, H0, W0) mask logits at level 0
    e1: torch.Tensor  # (G, C0, H0, W0) input of the seg head (level 0)
    # (G, C1, H1, W1) level-1 map entering S0 (S1's output, the raw crop for 2-level ROIs);
    # None for 1-level ROIs
    e2: torch.Tensor | None
    valid_hw: torch.Tensor  # (G, L, 2) int64 (h, w) of each ROI at each of the L levels


class RoiProbabilities(NamedTuple):
    """What inference reads of the mask branch for G ROIs, over the views of the input."""

    probs: torch.Tensor  # (G, 1, H0, W0) level-0 mask probabilities, the mean over the views
    valid_hw: torch.Tensor  # (G, L, 2) int64 (h, w) of each ROI at each of the L levels
    e1: torch.Tensor  # (G, C0, H0, W0) level-0 features in the input's view
    # (G,) mean IoU of each ROI's mask in a flipped view with its mask in the input; None
    # unless the agreement is scored and there are flipped views
    view_agreement: torch.Tensor | None

    def select(self, which: torch.Tensor) -> "RoiProbabilities":
        """The ROIs that ``which`` indexes (a bool mask or indices)."""
        return RoiProbabilities(*(None if t is None else t[which] for t in self))


class FlippedBatch(NamedTuple):
    """The network inputs flipped along ``dims`` (:data:`FLIP_DIMS`), with their backbone
    features: a test-time view for the mask branch."""

    dims: tuple[int, ...]
    images: ImageList  # the flipped padded batch, same image_sizes
    features: dict[str, torch.Tensor]


class _View(NamedTuple):
    """The maps ROIs are cropped from in the batch flipped along ``dims`` (none: the batch)."""

    dims: tuple[int, ...]
    level_maps: list[torch.Tensor]
    image_hw: tuple[int, int]  # the padded batch's (H, W), which the flips mirror


def _one_roi_groups(pyramid: RoiPyramid) -> list[RoiGroup]:
    """One group per kept ROI, padded to nothing: the one-ROI-at-a-time reference computation."""
    kept = torch.nonzero(pyramid.num_levels > 0).squeeze(1)
    level_hw = pyramid.level_hw[kept].tolist()
    return [
        RoiGroup(indices=index[None], pad_hw=tuple(tuple(hw) for hw in sizes[:num_levels]))
        for index, sizes, num_levels in zip(kept, level_hw, pyramid.num_levels[kept].tolist())
    ]


@ROI_HEADS_REGISTRY.register()
class ObjGuidedROIHeads(nn.Module):
    """The object-guided segmentation branch as detectron2 ROI heads.

    ``forward(images, features, proposals, targets=None, output_sizes=None)``:

    * training: masks of the ground-truth boxes of ``targets``; returns
      ``(proposals, {"loss_mask", "loss_refine"})``;
    * inference: masks of the proposals' boxes; returns per image Instances of size
      ``output_sizes[i]`` (default: the network-input size) with ``pred_boxes``, ``scores``
      (the proposals' center scores), ``pred_classes`` and bool full-image ``pred_masks``.
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: Sequence[str],
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        image_conv_channels: int = 64,
        instance_norm_affine: bool = False,
        box_enlarge: float = 1.1,
        box_enlarge_test: float | None = None,
        train_box_jitter: float = 0.0,
        min_roi_size: float = 2.0,
        roi_pixel_grid: bool = False,
        mask_loss_weight: float = 2.0,
        mask_dice_weight: float = 0.0,
        keypoint_guidance_sigma: float = 0.0,
        mask_thresh_test: float = 0.53,
        box_refine_steps: int = 0,
        box_refine_enlarge: float | None = None,
        paste_normalized: bool = True,
        mask_confidence_score: bool = False,
        mask_confidence_power: float = 1.0,
        mask_flip_agreement_power: float = 0.0,
        mask_iou_head: bool = False,
        mask_iou_loss_weight: float = 1.0,
        mask_iou_train_detections: int = 16,
        mask_iou_score_power: float = 1.0,
        mask_largest_component: bool = False,
        mask_nms_thresh: float = 0.2,
        mask_matrix_nms_sigma: float = 0.0,
        detections_per_image: int = 1000,
        max_train_rois_per_image: int = 0,
        refine_enabled: bool = True,
        refine_sampling: str = "biased",
        refine_oversample_ratio: float = 3.0,
        refine_importance_ratio: float = 0.75,
        refine_point_density: int = 8,
        refine_loss_weight: float = 1.0,
        batch_rois: bool = True,
        max_group_pixels: int = 1 << 20,
        max_inference_pixels: int = 1 << 17,
    ):
        """
        Args:
            in_features: feature maps cropped at levels 1.. (shallowest first), e.g.
                ["stem", "dec4", "dec8", "dec16"].
            in_channels, in_strides: their channels and strides (strides increasing, > 1).
            pixel_mean, pixel_std: the per-channel normalization of ``images`` (the backbone's
                input); the level-0 image conv undoes it and reads x / 255 - 0.5 of the image's
                values x, as the authors' code does.
            image_conv_channels: channels of the level-0 image conv (the authors' 64).
            instance_norm_affine: learnable gamma / eta in the S modules' instance norm (paper's
                Eq. 6) or none (authors' code).
            box_enlarge: ROIs are the boxes scaled by this about their centre.
            box_enlarge_test: the same at inference, for the predicted boxes; None: ``box_enlarge``.
            train_box_jitter: in training, the ground-truth boxes' random shift (up to half this
                fraction of their size) and rescaling (1 +- this) before enlargement; 0: none
                (see :func:`.roi_crops.jitter_boxes`).
            min_roi_size: levels stop at the first whose ROI side is below this.
            roi_pixel_grid: level-0 crops on whole pixels, one pixel apart (see
                :func:`.roi_crops.build_roi_pyramid`); False: the authors' grid.
            mask_loss_weight: weight of the mask BCE.
            mask_dice_weight: weight of a soft Dice loss added to the mask BCE (0: none, as the
                paper).
            keypoint_guidance_sigma: 0 (paper) or the width, as a fraction of the ROI's mean side,
                of a Gaussian at each ROI's keypoint that a learned 1x1 projection adds to its
                crops at every level (see :func:`.roi_crops.keypoint_maps`), so that the branch
                knows which object of a crowded box to segment. Training places it at the
                ground-truth keypoints (``gt_interior_points``, else the box centres), inference
                at the detector's (``proposal_keypoints``, else the box centres).
            mask_thresh_test: pasted value at or above which a pixel is foreground.
            box_refine_steps: at inference, times each predicted box is replaced by the tight
                box of the mask the branch segments from it (the box is kept where that mask is
                empty) before the masks are segmented; 0: the detector's boxes (paper).
            box_refine_enlarge: the ROIs' enlargement in those refinement passes (a wide one
                lets the mask reach past a box that is too small); None: ``box_enlarge_test``.
            paste_normalized: paste the masks back as the weighted mean of their samples, resized
                bilinearly, or as the authors' summed votes, resized by nearest neighbour (see
                :func:`.mask_windows.paste_mask_windows`).
            mask_confidence_score: at inference, score each detection by its keypoint score times
                its mask's mean probability over the ROI pixels at or above
                ``mask_thresh_test`` (0 for an empty mask); False: the keypoint score (paper).
            mask_confidence_power: the confidence's exponent in that product (above 1, the
                masks' confidence weighs more than the keypoint score in the ranking).
            mask_flip_agreement_power: at inference with flipped views (``predict``'s
                ``flipped``), multiply each detection's score by the mean IoU of its ROI mask
                (at ``mask_thresh_test``) in each flipped view with its mask in the input, to
                this power: a mask the views disagree on is one the branch is unsure of. 0: none
                (paper).
            mask_iou_head: learn a :class:`.mask_quality.MaskIoUHead` and, at inference, multiply
                each detection's score by its predicted mask IoU to ``mask_iou_score_power``
                (after the confidence, with ``mask_confidence_score``); False: none (paper).
            mask_iou_loss_weight: weight of its loss, the BCE of its IoU logits against the IoU
                of each training ROI's pasted mask with the object it covers best.
            mask_iou_train_detections: the detector's top detections per training image the head
                also learns from (segmented as at inference, from ROIs ``box_enlarge_test`` times
                their boxes), besides the ground-truth ROIs.
            mask_iou_score_power: the predicted IoU's exponent in the score.
            mask_largest_component: at inference, keep each pasted mask's largest 8-connected
                component only (before mask NMS; the box refinement sees whole masks); False:
                every fragment (paper and authors).
            mask_nms_thresh: mask IoU above which a lower-scored mask is suppressed.
            mask_matrix_nms_sigma: before that NMS, decay each mask's score by its overlaps with
                the masks scored above it (:func:`.mask_windows.matrix_nms_decay`, SOLOv2's
                Matrix NMS, this Gaussian sigma), so that an overlapping mask drops in the
                ranking instead of out of it; 0: none (paper).
            detections_per_image: most masks returned per image.
            max_train_rois_per_image: GT instances per image segmented in training, drawn at
                random when there are more; 0 = all (authors).
            refine_enabled: train the auxiliary refinement point heads.
            refine_sampling: "biased" or "uniform" (see :func:`sample_uncertain_points`).
            refine_oversample_ratio, refine_importance_ratio, refine_point_density: k, beta, D.
            refine_loss_weight: weight of the point-head BCE.
            batch_rois: run ROIs in padded groups; False runs them one at a time with plain
                PyTorch layers (the reference).
            max_group_pixels: bound on G * H0 * W0 of a group (memory of its level-0 maps).
            max_inference_pixels: at inference, the bound on a group and on the level-0 pixels
                of the groups segmented at once: the branch holds about 1 kB per level-0 pixel on
                a CPU (a 2048-px image with 267 objects at test size 1024: peak RSS 1.4 GB with
                this bound, 1.5 GB with twice it, in about the same time).
        """
        super().__init__()
        if list(in_strides) != sorted(set(in_strides)) or in_strides[0] <= 1:
            raise ValueError(f"ROI feature strides must increase from above 1, got {in_strides}")
        if refine_sampling not in ("biased", "uniform"):
            raise ValueError(
                f"refine_sampling must be 'biased' or 'uniform', got {refine_sampling!r}"
            )
        if not 0.0 <= train_box_jitter < 1.0:
            raise ValueError(f"train_box_jitter must be in [0, 1), got {train_box_jitter}")
        self.in_features = list(in_features)
        self.strides = (1, *in_strides)
        self.box_enlarge = box_enlarge
        self.box_enlarge_test = box_enlarge if box_enlarge_test is None else box_enlarge_test
        self.train_box_jitter = train_box_jitter
        self.min_roi_size = min_roi_size
        self.roi_pixel_grid = roi_pixel_grid
        self.mask_loss_weight = mask_loss_weight
        self.mask_dice_weight = mask_dice_weight
        self.keypoint_guidance_sigma = keypoint_guidance_sigma
        self.mask_thresh_test = mask_thresh_test
        self.box_refine_steps = box_refine_steps
        self.box_refine_enlarge = box_refine_enlarge or self.box_enlarge_test
        self.paste_normalized = paste_normalized
        self.mask_confidence_score = mask_confidence_score
        self.mask_confidence_power = mask_confidence_power
        self.mask_flip_agreement_power = mask_flip_agreement_power
        self.mask_iou_loss_weight = mask_iou_loss_weight
        self.mask_iou_train_detections = mask_iou_train_detections
        self.mask_iou_score_power = mask_iou_score_power
        self.mask_largest_component = mask_largest_component
        self.mask_nms_thresh = mask_nms_thresh
        self.mask_matrix_nms_sigma = mask_matrix_nms_sigma
        self.detections_per_image = detections_per_image
        self.max_train_rois_per_image = max_train_rois_per_image
        self.refine_enabled = refine_enabled
        self.refine_sampling = refine_sampling
        self.refine_oversample_ratio = refine_oversample_ratio
        self.refine_importance_ratio = refine_importance_ratio
        self.refine_point_density = refine_point_density
        self.refine_loss_weight = refine_loss_weight
        self.batch_rois = batch_rois
        self.max_group_pixels = max_group_pixels
        self.max_inference_pixels = max_inference_pixels

        # The image conv reads (x * std + mean) / 255 - 0.5 of the normalized image x: values of
        # order 1, as the instance-normed object guidance it is fused with in S0.
        level0_scale = torch.tensor(pixel_std, dtype=torch.float32) / 255
        level0_shift = torch.tensor(pixel_mean, dtype=torch.float32) / 255 - 0.5
        self.register_buffer("level0_scale", level0_scale.view(-1, 1, 1), persistent=False)
        self.register_buffer("level0_shift", level0_shift.view(-1, 1, 1), persistent=False)
        self.image_conv = nn.Sequential(
            nn.Conv2d(len(pixel_mean), image_conv_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(image_conv_channels, image_conv_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        channels = [image_conv_channels, *in_channels]
        norm = "IN_AFFINE" if instance_norm_affine else "IN"
        # fusions[i] is the paper's S_i: it fuses level i + 1 into level i and keeps level i's
        # channels, so an ROI whose top level is i + 1 can start from its raw crop.
        self.fusions = nn.ModuleList(
            FusionBlock(channels[i + 1], channels[i], channels[i], norm)
            for i in range(len(channels) - 1)
        )
        self.seg_conv = nn.Conv2d(channels[0], channels[0], 3, padding=1)
        self.seg_predictor = nn.Conv2d(channels[0], 1, 3, padding=1)
        self.keypoint_projections = None
        if keypoint_guidance_sigma > 0:
            self.keypoint_projections = nn.ModuleList(
                nn.Conv2d(1, c, 1, bias=False) for c in channels
            )
        self.mask_iou_head = MaskIoUHead(channels[0]) if mask_iou_head else None
        if refine_enabled:
            self.point_head0 = nn.Conv1d(channels[0], 1, 1)
            self.point_head1 = nn.Conv1d(channels[0] + channels[1], 1, 1)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        og = cfg.MODEL.OBJGUIDED
        return {
            "in_features": og.ROI_FEATURES,
            "in_channels": [input_shape[f].channels for f in og.ROI_FEATURES],
            "in_strides": [input_shape[f].stride for f in og.ROI_FEATURES],
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "image_conv_channels": og.IMAGE_CONV_CHANNELS,
            "instance_norm_affine": og.INSTANCE_NORM_AFFINE,
            "box_enlarge": og.BOX_ENLARGE,
            "box_enlarge_test": og.BOX_ENLARGE_TEST or None,
            "train_box_jitter": og.TRAIN_BOX_JITTER,
            "min_roi_size": og.MIN_ROI_SIZE,
            "roi_pixel_grid": og.ROI_PIXEL_GRID,
            "mask_loss_weight": og.MASK_LOSS_WEIGHT,
            "mask_dice_weight": og.MASK_DICE_WEIGHT,
            "keypoint_guidance_sigma": og.KEYPOINT_GUIDANCE_SIGMA,
            "mask_thresh_test": og.MASK_THRESH_TEST,
            "box_refine_steps": og.BOX_REFINE_STEPS,
            "box_refine_enlarge": og.BOX_REFINE_ENLARGE or None,
            "paste_normalized": og.PASTE_NORMALIZED,
            "mask_confidence_score": og.MASK_CONFIDENCE_SCORE,
            "mask_confidence_power": og.MASK_CONFIDENCE_POWER,
            "mask_flip_agreement_power": og.MASK_FLIP_AGREEMENT_POWER,
            "mask_iou_head": og.MASK_IOU_HEAD.ENABLED,
            "mask_iou_loss_weight": og.MASK_IOU_HEAD.LOSS_WEIGHT,
            "mask_iou_train_detections": og.MASK_IOU_HEAD.TRAIN_DETECTIONS,
            "mask_iou_score_power": og.MASK_IOU_HEAD.SCORE_POWER,
            "mask_largest_component": og.MASK_LARGEST_COMPONENT,
            "mask_nms_thresh": og.MASK_NMS_THRESH,
            "mask_matrix_nms_sigma": og.MASK_MATRIX_NMS_SIGMA,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "max_train_rois_per_image": og.MAX_TRAIN_ROIS_PER_IMAGE,
            "refine_enabled": og.REFINE.ENABLED,
            "refine_sampling": og.REFINE.SAMPLING,
            "refine_oversample_ratio": og.REFINE.OVERSAMPLE_RATIO,
            "refine_importance_ratio": og.REFINE.IMPORTANCE_RATIO,
            "refine_point_density": og.REFINE.POINT_DENSITY,
            "refine_loss_weight": og.REFINE.LOSS_WEIGHT,
        }

    def forward(
        self,
        images: ImageList,
        features: dict[str, torch.Tensor],
        proposals: list[Instances],
        targets: list[Instances] | None = None,
        output_sizes: Sequence[tuple[int, int]] | None = None,
        placements: Sequence[Placement] | None = None,
        flipped: Sequence[FlippedBatch] = (),
    ) -> tuple[list[Instances], dict[str, torch.Tensor]]:
        """
        Args:
            images: the normalized, padded batch (level 0 convolves ``images.tensor``).
            features: backbone maps, at least ``in_features``.
            proposals: per image, ``proposal_boxes`` (network-input pixels),
                ``objectness_logits``, ``pred_classes`` and optionally ``proposal_keypoints``,
                sorted by score; in training, read by the mask-IoU head only.
            targets: per image, ``gt_boxes``, ``gt_masks`` (BitMasks at the network-input
                size) and optionally ``gt_interior_points``; required in training.
            output_sizes: per image, the (height, width) to predict at; boxes and masks are
                scaled per axis from ``images.image_sizes[i]``.
            placements: per image, where it lies in a larger image it is a tile of: the
                predictions are then that image's, scaled from its ``image_hw`` to
                ``output_sizes[i]``. Default: every input is its own image.
            flipped: at inference, flipped copies of the batch: each ROI is also segmented in
                each (from its mirrored grids) and its probabilities averaged over them all.
        """
        if self.training:
            if targets is None:
                raise ValueError("ObjGuidedROIHeads needs targets (gt_boxes, gt_masks) in training")
            return proposals, self.losses(images, features, targets, proposals)
        if output_sizes is None:
            output_sizes = images.image_sizes
        if placements is None:
            placements = [Placement((0, 0), tuple(hw)) for hw in images.image_sizes]
        return self.predict(images, features, proposals, output_sizes, placements, flipped), {}

    # ---------------------------------------------------------------------------------------
    # The mask branch on ROI groups
    # ---------------------------------------------------------------------------------------

    def build_pyramid(self, boxes: torch.Tensor, enlarge: float | None = None) -> RoiPyramid:
        """ROI crop grids of (R, 4) XYXY boxes (network-input pixels) at every level, the boxes
        scaled by ``enlarge`` (default: ``box_enlarge`` in training, else ``box_enlarge_test``)."""
        if enlarge is None:
            enlarge = self.box_enlarge if self.training else self.box_enlarge_test
        return build_roi_pyramid(
            boxes, self.strides, enlarge, self.min_roi_size, self.roi_pixel_grid
        )

    def group(self, pyramid: RoiPyramid) -> list[RoiGroup]:
        """The batches ROIs run in (skipped ROIs belong to none)."""
        if not self.batch_rois:
            return _one_roi_groups(pyramid)
        bound = self.max_group_pixels if self.training else self.max_inference_pixels
        return group_rois(pyramid, max_group_pixels=bound)

    def level_maps(
        self, images: ImageList, features: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """The maps the ROIs are cropped from, level 0 (the image conv) first, channels-last:
        the crops' gathers read them without a transposed copy."""
        return [self.level0_map(images)] + [
            features[f].contiguous(memory_format=torch.channels_last) for f in self.in_features
        ]

    def segment(
        self,
        level_maps: list[torch.Tensor],
        batch_index: torch.Tensor,
        pyramid: RoiPyramid,
        groups: Sequence[RoiGroup],
        keypoints: torch.Tensor | None = None,
    ) -> list[GroupOutput]:
        """Run the mask branch on every group.

        Args:
            level_maps: :meth:`level_maps` of the batch.
            batch_index: (R,) int64 image of each ROI of ``pyramid``.
            pyramid: the R ROIs.
            groups: batches of ROIs (see :meth:`group`).
            keypoints: (R, 2) (x, y) keypoint of each ROI, network-input pixels; needed with
                keypoint guidance.

        Returns:
            one :class:`GroupOutput` per group.
        """
        if not groups:
            return []
        if self.keypoint_projections is not None and keypoints is None:
            raise ValueError("keypoint guidance needs the ROIs' keypoints")
        if not self.batch_rois:
            return self._segment_one_roi_at_a_time(
                level_maps, batch_index, pyramid, groups, keypoints
            )
        # One gather per level for all groups: a single gradient accumulation per feature map.
        num_levels = max(group.num_levels for group in groups)
        level_crops = [
            iter(
                crop_roi_groups(
                    level_maps[level],
                    batch_index,
                    pyramid,
                    level,
                    [group for group in groups if group.num_levels > level],
                )
            )
            for level in range(num_levels)
        ]
        crops = [
            self.add_keypoint_guidance(
                [next(level_crops[level]) for level in range(g.num_levels)], pyramid, keypoints, g
            )
            for g in groups
        ]
        valid_hw = [pyramid.level_hw[g.indices, : g.num_levels] for g in groups]
        return self.mask_branch(crops, valid_hw)

    def _segment_one_roi_at_a_time(
        self,
        level_maps: list[torch.Tensor],
        batch_index: torch.Tensor,
        pyramid: RoiPyramid,
        groups: Sequence[RoiGroup],
        keypoints: torch.Tensor | None,
    ) -> list[GroupOutput]:
        """The reference: groups of one ROI, cropped with ``grid_sample`` and run unpadded."""
        crops, valid_hw = [], []
        for group in groups:
            one = pyramid[group.indices]
            image = int(batch_index[group.indices[0]])
            maps = [level_map[image, None] for level_map in level_maps[: group.num_levels]]
            levels = [crop_one_roi(m, one, level) for level, m in enumerate(maps)]
            crops.append(self.add_keypoint_guidance(levels, pyramid, keypoints, group))
            valid_hw.append(one.level_hw[:, : group.num_levels])
        outputs = self.mask_branch(crops)
        return [out._replace(valid_hw=hw) for out, hw in zip(outputs, valid_hw)]

    def add_keypoint_guidance(
        self,
        crops: list[torch.Tensor],
        pyramid: RoiPyramid,
        keypoints: torch.Tensor | None,
        group: RoiGroup,
    ) -> list[torch.Tensor]:
        """A group's crops (per level (G, C_i, Hp_i, Wp_i)), each plus its level's projection of
        the Gaussian at the ROIs' keypoints (zero outside each ROI, as the crops); the crops as
        they are without keypoint guidance."""
        if self.keypoint_projections is None:
            return crops
        rois, points = pyramid[group.indices], keypoints[group.indices]
        return [
            crop + project(keypoint_maps(rois, points, level, pad_hw, self.keypoint_guidance_sigma))
            for level, (crop, project, pad_hw) in enumerate(
                zip(crops, self.keypoint_projections, group.pad_hw)
            )
        ]

    def mask_branch(
        self,
        crops: Sequence[Sequence[torch.Tensor]],
        valid_hw: Sequence[torch.Tensor] | None = None,
    ) -> list[GroupOutput]:
        """The S modules top-down over the crops of each group of ROIs, then the seg head.

        Args:
            crops: per group, per level (shallowest first, as many as the group's ROIs have) a
                (G, C_i, H_i, W_i) crop: a single whole ROI (G = 1), or a padded ROI batch (zero
                outside each ROI).
            valid_hw: for padded batches, per group the (G, L, 2) int64 (h, w) of each ROI at
                each level; None for whole ROIs.

        Returns:
            Per group its :class:`GroupOutput` (``valid_hw`` as given, None for whole ROIs).
        """
        tops = [levels[-1] for levels in crops]
        e2 = [levels[-1] if len(levels) == 2 else None for levels in crops]
        # Level by level over all groups, so that each S module runs once per level.
        for level in reversed(range(max(len(levels) for levels in crops) - 1)):
            members = [g for g, levels in enumerate(crops) if len(levels) > level + 1]
            lows, skips = [tops[g] for g in members], [crops[g][level] for g in members]
            block = self.fusions[level]
            if valid_hw is None:
                fused = [block(low, skip) for low, skip in zip(lows, skips)]
            else:
                sizes = [(valid_hw[g][:, level + 1], valid_hw[g][:, level]) for g in members]
                fused = block(lows, skips, sizes)
            for g, x in zip(members, fused):
                tops[g] = x
                if level == 1:
                    e2[g] = x
        outputs = []
        for g, e1 in enumerate(tops):
            hw = None if valid_hw is None else valid_hw[g]
            valid0 = None if hw is None else valid_mask(hw[:, 0], e1.shape[-2:])
            logits = self.seg_head(e1, valid0)
            outputs.append(GroupOutput(logits=logits, e1=e1, e2=e2[g], valid_hw=hw))
        return outputs

    def seg_head(self, e1: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits (G, 1, H0, W0) of the level-0 map e1 (G, C0, H0, W0); ``valid`` (G, 1, H0,
        W0) for a padded ROI batch, whose logits are then zero outside each ROI."""
        hidden = F.relu(self.seg_conv(e1))
        if valid is None:
            return self.seg_predictor(hidden)
        # seg_conv writes outside each ROI (bias, border taps): the predictor must read zeros
        return self.seg_predictor(hidden * valid) * valid

    def level0_map(self, images: ImageList) -> torch.Tensor:
        """(N, C0, H, W) level-0 map: the image conv at stride 1 on the image at the authors'
        scale, channels-last (its convolutions run faster so on a CPU, and the crops' gathers read
        it as it is)."""
        image = images.tensor * self.level0_scale + self.level0_shift
        return self.image_conv(image.contiguous(memory_format=torch.channels_last))

    # ---------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------

    def losses(
        self,
        images: ImageList,
        features: dict[str, torch.Tensor],
        targets: list[Instances],
        proposals: Sequence[Instances] = (),
    ) -> dict[str, torch.Tensor]:
        """Mask BCE on the ground-truth boxes and, with refinement, the point-head BCE; with the
        mask-IoU head, its BCE on those ROIs and on the top ``proposals`` of each image.

        ``loss_mask`` = weight * mean over ROIs of each ROI's mean BCE against its soft (bilinearly
        cropped) ground truth plus ``mask_dice_weight`` * its soft Dice loss; ``loss_refine`` =
        weight * mean over ROIs and point heads of the mean BCE at the sampled points (authors'
        averaging); ``loss_mask_iou`` = weight * mean over ROIs of the BCE of the IoU logit
        against the pasted mask's IoU (:meth:`_mask_iou_losses`).
        """
        boxes, keypoints, batch_index, gt_masks = self._training_rois(
            targets, images.tensor.shape[-2:]
        )
        pyramid = self.build_pyramid(boxes)
        groups = self.group(pyramid)
        level_maps = self.level_maps(images, features)
        outputs = self.segment(level_maps, batch_index, pyramid, groups, keypoints)

        mask_losses, refine_losses = [], []
        for group, out in zip(groups, outputs):
            gt = crop_masks(gt_masks, pyramid[group.indices], group.pad_hw[0], group.indices)
            valid0 = valid_mask(out.valid_hw[:, 0], gt.shape[-2:]).to(gt.dtype)
            bce = F.binary_cross_entropy_with_logits(out.logits, gt, reduction="none")
            loss = (bce * valid0).sum(dim=(1, 2, 3)) / valid0.sum(dim=(1, 2, 3))
            if self.mask_dice_weight > 0:
                loss = loss + self.mask_dice_weight * soft_dice_loss(out.logits, gt, valid0)
            mask_losses.append(loss)
            if self.refine_enabled:
                refine_losses.extend(self._refine_losses(out, gt))

        # DDP needs a gradient for every parameter in every step, but S3 idles when no ROI
        # reaches 5 levels, point_head1 when none has 2 and the whole branch when there is no
        # ROI: a zero-weighted sum keeps them all in the graph.
        idle = sum(p.sum() for p in self.parameters()) * 0.0
        losses = {"loss_mask": self.mask_loss_weight * _mean(mask_losses, idle) + idle}
        if self.refine_enabled:
            losses["loss_refine"] = self.refine_loss_weight * _mean(refine_losses, idle)
        if self.mask_iou_head is not None:
            iou_losses = self._mask_iou_losses(
                level_maps, targets, proposals, [(batch_index, pyramid, groups, outputs)]
            )
            losses["loss_mask_iou"] = self.mask_iou_loss_weight * _mean(iou_losses, idle)
        return losses

    def _training_rois(
        self, targets: list[Instances], padded_hw: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ground-truth boxes (R, 4), their keypoints (R, 2), their image (R,) and their masks
        (R, H, W) bool, padded to the batch's padded size; at most ``max_train_rois_per_image``
        random ones per image, the boxes (not the keypoints) jittered by ``train_box_jitter``."""
        boxes, keypoints, batch_index, masks = [], [], [], []
        for image_index, target in enumerate(targets):
            keep = torch.arange(len(target), device=target.gt_boxes.device)
            if 0 < self.max_train_rois_per_image < len(target):
                keep = torch.randperm(len(target), device=keep.device)
                keep = keep[: self.max_train_rois_per_image]
            if not isinstance(target.gt_masks, BitMasks):
                raise TypeError(
                    "ObjGuidedROIHeads needs gt_masks as BitMasks (INPUT.MASK_FORMAT 'bitmask'), "
                    f"got {type(target.gt_masks).__name__}"
                )
            image_masks = target.gt_masks.tensor[keep]
            height, width = image_masks.shape[1:]
            boxes.append(target.gt_boxes.tensor[keep])
            keypoints.append(_keypoints(target, "gt_interior_points", target.gt_boxes)[keep])
            batch_index.append(torch.full_like(keep, image_index))
            masks.append(F.pad(image_masks, (0, padded_hw[1] - width, 0, padded_hw[0] - height)))
        boxes = torch.cat(boxes)
        if self.train_box_jitter > 0:
            boxes = jitter_boxes(boxes, self.train_box_jitter)
        return boxes, torch.cat(keypoints), torch.cat(batch_index), torch.cat(masks)

    def _mask_iou_losses(
        self,
        level_maps: list[torch.Tensor],
        targets: Sequence[Instances],
        proposals: Sequence[Instances],
        segmented: list[tuple[torch.Tensor, RoiPyramid, list[RoiGroup], list[GroupOutput]]],
    ) -> list[torch.Tensor]:
        """Per group of ROIs, the (G,) BCE of the mask-IoU head's logits against the IoU of each
        ROI's pasted mask with the ground-truth object it overlaps best: the ROIs ``segmented``
        ((batch index, pyramid, groups, outputs) of the mask loss's), and the top
        ``mask_iou_train_detections`` of each image's ``proposals``, segmented here as at
        inference. The head reads detached inputs."""
        detection_boxes, detection_keypoints, detection_index = _proposal_rois(
            [p[: self.mask_iou_train_detections] for p in proposals]
        )
        if len(detection_boxes):
            with torch.no_grad():
                pyramid = self.build_pyramid(detection_boxes, self.box_enlarge_test)
                groups = self.group(pyramid)
                outputs = self.segment(
                    level_maps, detection_index, pyramid, groups, detection_keypoints
                )
            segmented = [*segmented, (detection_index, pyramid, groups, outputs)]
        losses = []
        for batch_index, pyramid, groups, outputs in segmented:
            for group, out in zip(groups, outputs):
                probs = out.logits.detach().sigmoid()
                logits = self.mask_iou_head(out.e1.detach(), probs, out.valid_hw[:, 0])
                ious = torch.zeros_like(logits)
                rois = group.indices
                for image_index in batch_index[rois].unique().tolist():
                    mine = batch_index[rois] == image_index
                    target = targets[image_index]
                    windows = self._paste_masks(probs[mine], pyramid[rois[mine]], target.image_size)
                    if self.mask_largest_component:
                        windows = windows.largest_components()
                    ious[mine] = max_mask_ious(windows.to_masks(), target.gt_masks.tensor)
                losses.append(F.binary_cross_entropy_with_logits(logits, ious, reduction="none"))
        return losses

    def _refine_losses(self, out: GroupOutput, gt: torch.Tensor) -> list[torch.Tensor]:
        """Per-ROI mean BCE of each point head at the group's uncertain points (ROIs without a
        point contribute nothing): up to two (G',) tensors."""
        hw0 = out.valid_hw[:, 0]
        points, point_valid = sample_uncertain_points(
            out.logits.detach().sigmoid(),
            hw0,
            density=self.refine_point_density,
            oversample_ratio=self.refine_oversample_ratio,
            importance_ratio=self.refine_importance_ratio,
            mode=self.refine_sampling,
        )
        has_points = point_valid.any(dim=1)
        if not has_points.any():
            return []
        point_valid = point_valid.to(gt.dtype)
        labels = point_sample_rois(gt, hw0, points)[:, 0]
        e1_points = point_sample_rois(out.e1, hw0, points)
        point_logits = [self.point_head0(e1_points)]
        if out.e2 is not None:
            e2_points = point_sample_rois(out.e2, out.valid_hw[:, 1], points)
            point_logits.append(self.point_head1(torch.cat([e1_points, e2_points], dim=1)))
        losses = []
        for logits in point_logits:
            bce = F.binary_cross_entropy_with_logits(logits[:, 0], labels, reduction="none")
            per_roi = (bce * point_valid).sum(dim=1) / point_valid.sum(dim=1).clamp(min=1)
            losses.append(per_roi[has_points])
        return losses

    # ---------------------------------------------------------------------------------------
    # Inference
    # ---------------------------------------------------------------------------------------

    def predict(
        self,
        images: ImageList,
        features: dict[str, torch.Tensor],
        proposals: list[Instances],
        output_sizes: Sequence[tuple[int, int]],
        placements: Sequence[Placement],
        flipped: Sequence[FlippedBatch] = (),
    ) -> list[Instances]:
        """Masks of the proposals (their boxes first refined ``box_refine_steps`` times; each
        ROI's probabilities averaged over the batch and its ``flipped`` copies), pasted
        at ``output_sizes`` of the images the inputs are placed in, mask-NMSed and capped; each
        image's ``pred_boxes`` are the boxes segmented from and its ``pred_masks``
        :class:`.mask_windows.MaskWindows` of the kept masks' tight boxes."""
        boxes, keypoints, batch_index = _proposal_rois(proposals)
        scores = torch.cat([p.objectness_logits.sigmoid() for p in proposals])
        classes = torch.cat([p.pred_classes for p in proposals])
        # With autograd off, inference mode skips the view and version tracking of each of the
        # branch's thousands of small operations. Its tensors stay inside: the returned fields
        # are ordinary tensors, which callers may modify in place.
        with torch.inference_mode(not torch.is_grad_enabled()):
            image_hw = tuple(images.tensor.shape[-2:])
            views = [_View((), self.level_maps(images, features), image_hw)] + [
                _View(f.dims, self.level_maps(f.images, f.features), image_hw) for f in flipped
            ]
            for _ in range(self.box_refine_steps):
                boxes = self._refined_boxes(
                    views, batch_index, boxes, keypoints, images.image_sizes
                )
            kept_masks = self._kept_masks(
                views, batch_index, boxes, keypoints, scores, output_sizes, placements
            )
        # refined boxes and the scores of the kept masks are inference tensors
        boxes = boxes.clone()
        results = []
        for placement, output_hw, (kept, windows, keep, kept_scores) in zip(
            placements, output_sizes, kept_masks
        ):
            (y0, x0), (height, width) = placement
            origin = boxes.new_tensor([x0, y0]).repeat(2)
            scale = boxes.new_tensor([output_hw[1] / width, output_hw[0] / height]).repeat(2)
            instances = Instances(tuple(output_hw))
            instances.pred_boxes = Boxes((boxes[kept] + origin) * scale)
            instances.scores = kept_scores.clone()
            instances.pred_classes = classes[kept]
            instances.pred_masks = windows.tight(keep)
            results.append(instances)
        return results

    def merge_tiles(self, parts: Sequence[Instances]) -> Instances:
        """One image's predictions from those of its tiles (:meth:`predict` with placements):
        mask NMS across them, so that an object detected twice, with keypoints in the cores of
        two tiles, is kept once."""
        merged = Instances.cat(list(parts))
        return merged[mask_nms(merged.pred_masks, merged.scores, self.mask_nms_thresh)]

    def _refined_boxes(
        self,
        views: Sequence[_View],
        batch_index: torch.Tensor,
        boxes: torch.Tensor,
        keypoints: torch.Tensor,
        image_hws: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """(R, 4) boxes -> the tight boxes of the masks segmented from them in the network inputs
        of ``image_hws`` (each box kept where its mask is empty or its ROI too small to
        segment)."""
        refined = boxes.clone()
        pyramid = self.build_pyramid(boxes, self.box_refine_enlarge)
        for _, indices, windows, _ in self._pasted_masks(
            views, batch_index, pyramid, pyramid, keypoints, image_hws, image_hws
        ):
            found = windows.nonempty()
            refined[indices[found]] = windows.boxes[found].to(refined.dtype)
        return refined

    def _roi_probabilities(
        self,
        views: Sequence[_View],
        batch_index: torch.Tensor,
        pyramid: RoiPyramid,
        groups: Sequence[RoiGroup],
        keypoints: torch.Tensor,
        with_agreement: bool = False,
    ) -> list[RoiProbabilities]:
        """Per group, its ROIs' mask probabilities, the mean over the views (in a flipped one,
        segmented from the mirrored grids and keypoints, then flipped back), and what the
        scores read of them (:class:`RoiProbabilities`; the views' agreement only
        ``with_agreement`` and where ``mask_flip_agreement_power`` asks for it)."""
        total = first = None
        segmented = []  # per view, per group: the (G, 1, Hp, Wp) masks at mask_thresh_test
        for view in views:
            points = keypoints.clone()
            for dim in view.dims:  # (x, y) in continuous coordinates: x -> W - x
                points[:, -1 - dim] = view.image_hw[dim] - points[:, -1 - dim]
            mirrored = pyramid.mirrored(view.dims, view.image_hw)
            outputs = self.segment(view.level_maps, batch_index, mirrored, groups, points)
            probs = [flip_rois(o.logits.sigmoid(), o.valid_hw[:, 0], view.dims) for o in outputs]
            if with_agreement and self.mask_flip_agreement_power:
                thresh = self.mask_thresh_test
                segmented.append(
                    [_segmented(p, o.valid_hw[:, 0], thresh) for p, o in zip(probs, outputs)]
                )
            total = probs if total is None else [t + p for t, p in zip(total, probs)]
            first = outputs if first is None else first
        agreements = [None] * len(total)
        if len(segmented) > 1:
            agreements = [
                torch.stack([_mask_ious(masks, input_masks) for masks in flipped]).mean(0)
                for input_masks, *flipped in zip(*segmented)
            ]
        return [
            RoiProbabilities(t / len(views), out.valid_hw, out.e1, agreement)
            for t, out, agreement in zip(total, first, agreements)
        ]

    def _pasted_masks(
        self,
        views: Sequence[_View],
        batch_index: torch.Tensor,
        pyramid: RoiPyramid,
        placed: RoiPyramid,
        keypoints: torch.Tensor,
        image_hws: Sequence[tuple[int, int]],
        output_sizes: Sequence[tuple[int, int]],
        with_mask_scores: bool = False,
    ) -> Iterator[tuple[int, torch.Tensor, MaskWindows, torch.Tensor | None]]:
        """Segment the ROIs of ``pyramid`` and paste their masks, ``placed`` in images of
        ``image_hws`` (the same ROIs, translated where an input is a tile), at ``output_sizes``,
        a few groups at a time: the branch's feature maps then grow with the groups' pixels, not
        with all the ROIs' pixels. Yields (image, (K,) int64 ROI indices, their K masks'
        windows, their (K,) :meth:`_mask_scores` with ``with_mask_scores``, else None), group by
        group."""
        for chunk in _group_chunks(self.group(pyramid), self.max_inference_pixels):
            outputs = self._roi_probabilities(
                views, batch_index, pyramid, chunk, keypoints, with_agreement=with_mask_scores
            )
            for group, output in zip(chunk, outputs):
                for image_index in batch_index[group.indices].unique().tolist():
                    mine = batch_index[group.indices] == image_index
                    indices = group.indices[mine]
                    probs = output.probs[mine]
                    mask_scores = None
                    if with_mask_scores:
                        mask_scores = self._mask_scores(output.select(mine))
                    windows = self._paste_masks(
                        probs, placed[indices], image_hws[image_index], output_sizes[image_index]
                    )
                    yield image_index, indices, windows, mask_scores

    def _paste_masks(
        self,
        probs: torch.Tensor,
        rois: RoiPyramid,
        input_hw: Sequence[int],
        output_hw: Sequence[int] | None = None,
    ) -> MaskWindows:
        """The binary masks of (K, 1, Hp, Wp) ROI probabilities pasted into an ``input_hw``
        image at ``output_hw`` (default ``input_hw``), thresholded at ``mask_thresh_test``."""
        return paste_mask_windows(
            probs,
            rois,
            input_hw,
            output_hw,
            threshold=self.mask_thresh_test,
            normalize=self.paste_normalized,
        )

    def _mask_scores(self, rois: RoiProbabilities) -> torch.Tensor | None:
        """(K,) factor of each detection's score from its mask: the product of its
        :func:`mask_confidence` to ``mask_confidence_power``, its views' agreement to
        ``mask_flip_agreement_power`` and its predicted IoU to ``mask_iou_score_power``, of those
        that are on; None with none."""
        valid_hw = rois.valid_hw[:, 0]
        factors = []
        if self.mask_confidence_score:
            confidence = mask_confidence(rois.probs, valid_hw, self.mask_thresh_test)
            factors.append(confidence**self.mask_confidence_power)
        if rois.view_agreement is not None:
            factors.append(rois.view_agreement**self.mask_flip_agreement_power)
        if self.mask_iou_head is not None:
            iou = self.mask_iou_head(rois.e1, rois.probs, valid_hw).sigmoid()
            factors.append(iou**self.mask_iou_score_power)
        return math.prod(factors) if factors else None

    def _kept_masks(
        self,
        views: Sequence[_View],
        batch_index: torch.Tensor,
        boxes: torch.Tensor,
        keypoints: torch.Tensor,
        scores: torch.Tensor,
        output_sizes: Sequence[tuple[int, int]],
        placements: Sequence[Placement],
    ) -> list[tuple[torch.Tensor, MaskWindows, torch.Tensor, torch.Tensor]]:
        """Per image: the kept ROIs ((K,) int64 indices into ``boxes``), the pasted masks'
        windows of all its ROIs, which of them are kept ((K,) int64) and the kept ones' (K,)
        scores (``scores``, times the factor :meth:`_mask_scores` gives).
        ``keypoints`` (R, 2): the ROIs' keypoints; ``batch_index`` (R,) their images."""
        pyramid = self.build_pyramid(boxes)
        # the ROIs in the images the inputs are placed in, where their masks are pasted
        origins = boxes.new_tensor([p.origin[::-1] for p in placements], dtype=torch.float64)
        placed = pyramid.translated(origins.view(-1, 2)[batch_index])
        image_rois = [[] for _ in placements]
        image_windows = [[] for _ in placements]
        image_scores = [[] for _ in placements]
        for image_index, indices, windows, mask_scores in self._pasted_masks(
            views,
            batch_index,
            pyramid,
            placed,
            keypoints,
            [p.image_hw for p in placements],
            output_sizes,
            with_mask_scores=True,
        ):
            if self.mask_largest_component:
                windows = windows.largest_components()
            image_rois[image_index].append(indices)
            image_windows[image_index].append(windows)
            image_scores[image_index].append(
                scores[indices] if mask_scores is None else scores[indices] * mask_scores
            )

        kept_masks = []
        for output_hw, order, windows, image_score in zip(
            output_sizes, image_rois, image_windows, image_scores
        ):
            if not windows:  # no ROI in this image
                order.append(batch_index.new_zeros(0))
                windows.append(MaskWindows.empty(output_hw, boxes.device))
                image_score.append(scores.new_zeros(0))
            order, windows, image_score = (
                torch.cat(order),
                MaskWindows.cat(windows),
                torch.cat(image_score),
            )
            if self.mask_matrix_nms_sigma:
                image_score = matrix_nms_decay(windows, image_score, self.mask_matrix_nms_sigma)
            keep = mask_nms(windows, image_score, self.mask_nms_thresh)
            keep = keep[: self.detections_per_image]
            kept_masks.append((order[keep], windows, keep, image_score[keep]))
        return kept_masks


def _group_chunks(groups: Sequence[RoiGroup], max_pixels: int) -> list[list[RoiGroup]]:
    """Consecutive groups whose level-0 pixels (G * H0 * W0 each) add up to at most
    ``max_pixels`` (a chunk always takes at least one group)."""
    chunks, pixels = [], 0
    for group in groups:
        size = len(group.indices) * group.pad_hw[0][0] * group.pad_hw[0][1]
        if not chunks or pixels + size > max_pixels:
            chunks.append([])
            pixels = 0
        chunks[-1].append(group)
        pixels += size
    return chunks


def _proposal_rois(
    proposals: Sequence[Instances],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The proposals' (R, 4) boxes, (R, 2) keypoints and (R,) int64 images, image after image."""
    if not proposals:
        empty = torch.zeros(0, 4)
        return empty, empty[:, :2], torch.zeros(0, dtype=torch.long)
    boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])
    keypoints = torch.cat(
        [_keypoints(p, "proposal_keypoints", p.proposal_boxes) for p in proposals]
    )
    batch_index = torch.cat(
        [
            torch.full((len(p),), i, dtype=torch.long, device=boxes.device)
            for i, p in enumerate(proposals)
        ]
    )
    return boxes, keypoints, batch_index


def _keypoints(instances: Instances, field: str, boxes: Boxes) -> torch.Tensor:
    """(N, 2) (x, y) keypoints of the instances: their ``field``, else their boxes' centres."""
    return instances.get(field) if instances.has(field) else boxes.get_centers()


def _segmented(probs: torch.Tensor, valid_hw: torch.Tensor, threshold: float) -> torch.Tensor:
    """(R, 1, Hp, Wp) bool: the valid pixels of each ROI at or above ``threshold``; probs
    (R, 1, Hp, Wp), valid_hw (R, 2) (h, w)."""
    return (probs >= threshold) & valid_mask(valid_hw, probs.shape[-2:])


def _mask_ious(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(R,) IoU of two (R, 1, Hp, Wp) bool masks of each ROI; 0 where both are empty."""
    overlap = (first & second).sum(dim=(1, 2, 3))
    union = (first | second).sum(dim=(1, 2, 3))
    return overlap / union.clamp(min=1)


def mask_confidence(probs: torch.Tensor, valid_hw: torch.Tensor, threshold: float) -> torch.Tensor:
    """(R,) mean probability of each ROI over its valid pixels at or above ``threshold`` (the
    pixels it segments), 0 where there is none; probs (R, 1, Hp, Wp), valid_hw (R, 2) (h, w)."""
    foreground = _segmented(probs, valid_hw, threshold)
    return (probs * foreground).sum(dim=(1, 2, 3)) / foreground.sum(dim=(1, 2, 3)).clamp(min=1)


def soft_dice_loss(logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of each ROI's probabilities with its ground truth, over its valid pixels: (G,)
    from (G, 1, H, W) logits, soft targets and 0/1 validity. The +1 smoothing gives an ROI
    without foreground a loss that falls to 0 as its probabilities do."""
    prob = logits.sigmoid() * valid
    gt = gt * valid
    overlap = (prob * gt).sum(dim=(1, 2, 3))
    total = prob.sum(dim=(1, 2, 3)) + gt.sum(dim=(1, 2, 3))
    return 1 - (2 * overlap + 1) / (total + 1)


def _mean(values: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """Mean of the concatenated (K_i,) tensors; ``empty`` (a graph-connected zero) if none."""
    return torch.cat(values).mean() if values else empty
