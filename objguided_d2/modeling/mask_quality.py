"""A learned mask-quality score (a departure from the paper, after Mask Scoring R-CNN, Huang et al.,
CVPR 2019): a small head reads an ROI's level-0 features e1 and its mask probabilities and
predicts the IoU of the mask the ROI pastes with the object it covers best. Inference ranks each
detection by its keypoint score times that IoU, so that fragments of an object and masks that
stray onto a neighbour rank below whole objects, which the keypoint score alone cannot tell
apart.

The head learns from the ROIs it meets at test time: besides the (jittered) ground-truth boxes
the mask branch trains on, the detector's own top detections of each training image, segmented
as at inference. Its inputs are detached: the mask branch and the detector learn as without it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .roi_crops import valid_mask

__all__ = ["MaskIoUHead", "max_mask_ious"]


class MaskIoUHead(nn.Module):
    """IoU logits of padded ROI batches from their level-0 features and mask probabilities.

    The inputs, their mean over cells of ``pool`` x ``pool`` valid pixels, run through two 3 x 3
    convs; the mean over the valid cells feeds a linear predictor. Only valid pixels count, so an
    ROI gives the same output alone or padded in a group.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 32, pool: int = 4):
        """
        Args:
            in_channels: channels of e1.
            hidden_channels: channels of the two convs.
            pool: side of the cells the inputs are averaged over first (the quality of a whole
                mask needs its shape, not its pixels).
        """
        super().__init__()
        self.pool = pool
        # e1, the probabilities and the validity (where the ROI ends, a mask that reaches its
        # edge is cut off)
        self.conv1 = nn.Conv2d(in_channels + 2, hidden_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1)
        self.predictor = nn.Linear(hidden_channels, 1)

    def forward(
        self, e1: torch.Tensor, probs: torch.Tensor, valid_hw: torch.Tensor
    ) -> torch.Tensor:
        """(G,) IoU logits of (G, C, Hp, Wp) e1 and (G, 1, Hp, Wp) probabilities, each ROI valid
        in its top-left (h, w) of (G, 2) int64 ``valid_hw``."""
        valid = valid_mask(valid_hw, probs.shape[-2:]).to(probs.dtype)
        x = torch.cat([e1, probs, valid], dim=1) * valid
        cell_valid = F.avg_pool2d(valid, self.pool, ceil_mode=True)
        x = F.avg_pool2d(x, self.pool, ceil_mode=True) / cell_valid.clamp(min=1e-6)
        inside = (cell_valid > 0).to(x.dtype)
        x = F.relu(self.conv1(x * inside)) * inside
        x = F.relu(self.conv2(x)) * inside
        pooled = x.sum(dim=(2, 3)) / inside.sum(dim=(2, 3)).clamp(min=1)
        return self.predictor(pooled)[:, 0]


def max_mask_ious(masks: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """(K,) IoU of each of (K, H, W) bool masks with the (N, H, W) bool ground-truth mask it
    overlaps best; 0 for an empty mask or without ground truth."""
    if len(masks) == 0 or len(gt_masks) == 0:
        return masks.new_zeros(len(masks), dtype=torch.float32)
    flat = masks.flatten(1).float()
    gt = gt_masks.flatten(1).float()
    intersection = flat @ gt.T
    union = flat.sum(dim=1, keepdim=True) + gt.sum(dim=1) - intersection
    return (intersection / union.clamp(min=1)).amax(dim=1)
