"""Detectron2's baselines, where they fail on data this project trains on.

PointRend's mask head raises on a training batch without a foreground ROI (every image of the
batch a crop without an object): its point labels concatenate an empty list (detectron2 issue
#4383). The compact recipe's small crops of sparse images make such batches a matter of time.
"""

from __future__ import annotations

import torch
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY
from detectron2.projects.point_rend import PointRendMaskHead
from detectron2.structures import Instances


@ROI_MASK_HEAD_REGISTRY.register()
class EmptyBatchPointRendMaskHead(PointRendMaskHead):
    """Detectron2's ``PointRendMaskHead``, and a training batch without a foreground ROI gets no
    training points and a zero point loss (as Mask R-CNN's mask loss gives it) instead of an
    error. Every other batch, and inference, run detectron2's code unchanged. Use it with
    ``StandardROIHeads``: ``PointRendROIHeads`` accepts no other mask head name."""

    def _sample_train_points(
        self, coarse_mask: torch.Tensor, instances: list[Instances]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """coarse_mask: (R, C, S, S) logits of the R foreground ROIs. Returns their (R, P, 2)
        point coordinates in [0, 1] of each box and (R, P) point labels."""
        if coarse_mask.shape[0] > 0:
            return super()._sample_train_points(coarse_mask, instances)
        num_points = self.mask_point_train_num_points
        return coarse_mask.new_zeros((0, num_points, 2)), coarse_mask.new_zeros((0, num_points))
