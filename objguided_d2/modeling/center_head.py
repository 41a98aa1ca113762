"""Center-keypoint detector of the paper (Sec. II-A, CenterNet style) as a proposal generator.

Box convention. Boxes are detectron2's continuous XYXY in network-input pixels: pixel (row i,
column j) covers [j, j + 1) x [i, i + 1), so the tight box of a mask whose columns run a..b has
x1 = a, x2 = b + 1 (what ``BitMasks.get_bounding_boxes`` gives). With the output stride s (4)::

    ct     = ((x1 + x2) / 2, (y1 + y2) / 2) / s       center in output cells
    ct_int = floor(ct)                                 the cell that carries the object
    offset = ct - ct_int                               in [0, 1)
    wh     = (x2 - x1, y2 - y1) / s                    size in output cells

and decoding inverts it exactly: (x1, y1, x2, y2) = (ct_int + offset -/+ wh / 2) * s. Output cell j
thus covers input [j * s, (j + 1) * s), the half-pixel-correct feature alignment the ROI geometry
also uses. The authors' inclusive pixel boxes (cx = (a + b) / 2, w = b - a + 1) give the same sizes
with centers 0.5 input px (1/8 cell) up-left of these.

With interior keypoints (``center_point="interior"``), ct is the object's innermost pixel (given
in input pixels by the mapper) instead of the box centre, and the size head predicts the four
distances from ct to the box sides::

    sides = (ct_x - x1 / s, ct_y - y1 / s, x2 / s - ct_x, y2 / s - ct_y)   left, top, right, bottom
    (x1, y1, x2, y2) = (ct_int + offset - sides[:2], ct_int + offset + sides[2:]) * s

With ``cropped_objects="whole"``, the targets are those of the whole objects (``gt_whole_boxes``
and the whole objects' interior points, from the mapper), and a size that a side beyond the
training canvas enters (the crop cut it off) is not regressed.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

__all__ = [
    "CenterKeypointProposalGenerator",
    "CenterTargets",
    "center_focal_loss",
    "decode_centers",
    "draw_gaussians",
    "encode_center_targets",
    "gaussian_radius",
]


def gaussian_radius(height: torch.Tensor, width: torch.Tensor, min_overlap: float) -> torch.Tensor:
    """CenterNet's Gaussian radius of boxes of the given sizes (output cells), before truncation.

    The smallest root of three quadratics that bound the IoU of a box shifted within the radius,
    with CenterNet's own divisors kept so that radii match the authors' (square sides 4, 8, 16,
    32 give 1.09, 2.19, 4.37, 8.75).

    Args:
        height, width: (N,) box sizes.
        min_overlap: IoU the shifted box must keep.

    Returns:
        (N,) float64 radii.
    """
    h, w = height.double(), width.double()
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def draw_gaussians(
    shape: tuple[int, int, int, int],
    batch_index: torch.Tensor,
    classes: torch.Tensor,
    centers: torch.Tensor,
    radii: torch.Tensor,
) -> torch.Tensor:
    """Render unnormalized Gaussians exp(-(dx^2 + dy^2) / (2 sigma^2)), sigma = (2r + 1) / 6, over
    the (2r + 1)^2 window of each object, merged by element-wise max per class channel.

    Args:
        shape: (B, C, H, W) of the heatmap.
        batch_index, classes: (N,) int64 image and class channel of each object.
        centers: (N, 2) int64 (x, y) cells.
        radii: (N,) int64 radii >= 0.

    Returns:
        (B, C, H, W) float32 heatmap on the device of ``centers``.
    """
    _, num_classes, height, width = shape
    heatmap = torch.zeros(shape, device=centers.device)
    if len(centers) == 0:
        return heatmap
    max_radius = int(radii.max())
    steps = torch.arange(-max_radius, max_radius + 1, device=centers.device)
    dy, dx = (d.flatten() for d in torch.meshgrid(steps, steps, indexing="ij"))
    xs = centers[:, :1] + dx  # (N, (2R + 1)^2)
    ys = centers[:, 1:] + dy
    sigma = (2 * radii[:, None] + 1) / 6.0
    values = torch.exp(-(dx**2 + dy**2) / (2 * sigma**2))
    window = (dx.abs() <= radii[:, None]) & (dy.abs() <= radii[:, None])
    inside = window & (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    channel = (batch_index * num_classes + classes)[:, None]
    flat_index = (channel * height + ys) * width + xs
    heatmap.view(-1).scatter_reduce_(0, flat_index[inside], values[inside], reduce="amax")
    return heatmap


class CenterTargets(NamedTuple):
    """Detection targets of a batch; M objects survive (centre inside the output map)."""

    heatmap: torch.Tensor  # (B, C, H, W) Gaussians, exactly 1 at each centre cell
    index: torch.Tensor  # (M,) flat cell index (b * H + y) * W + x of each object's centre
    # (M, 2) box width, height or, with interior keypoints, (M, 4) distances from the keypoint
    # to the box's left, top, right, bottom sides; in output cells
    sizes: torch.Tensor
    offset: torch.Tensor  # (M, 2) sub-cell centre offset in [0, 1)
    size_weights: torch.Tensor  # (M, 2 or 4) 1 for a size the size head regresses, else 0


def encode_center_targets(
    boxes: torch.Tensor,
    classes: torch.Tensor,
    batch_index: torch.Tensor,
    heatmap_shape: tuple[int, int, int, int],
    stride: int,
    min_overlap: float,
    points: torch.Tensor | None = None,
    cut_sides: torch.Tensor | None = None,
) -> CenterTargets:
    """Encode boxes as CenterNet targets (convention in the module docstring).

    Args:
        boxes: (N, 4) XYXY boxes in network-input pixels.
        classes: (N,) int64 class of each box.
        batch_index: (N,) int64 image of each box.
        heatmap_shape: (B, C, H, W) of the output maps.
        stride: input pixels per output cell.
        min_overlap: IoU that fixes the Gaussian radius (see :func:`gaussian_radius`).
        points: (N, 2) interior keypoints (x, y) in network-input pixels; None: box centres.
        cut_sides: (N, 4) bool, the box sides (left, top, right, bottom) that lie beyond the
            training canvas: the sizes they enter are not regressed. None: none.
    """
    _, _, height, width = heatmap_shape
    boxes = boxes.float() / stride
    box_sizes = boxes[:, 2:] - boxes[:, :2]
    if points is None:
        centers = (boxes[:, :2] + boxes[:, 2:]) / 2
        sizes = box_sizes
    else:
        centers = points.float() / stride
        sizes = torch.cat([centers - boxes[:, :2], boxes[:, 2:] - centers], dim=1)
    if cut_sides is None:
        cut_sides = torch.zeros(len(boxes), 4, dtype=torch.bool, device=boxes.device)
    if points is None:  # a width needs both its sides, a height too
        cut_sides = cut_sides[:, :2] | cut_sides[:, 2:]
    size_weights = (~cut_sides).float()
    centers_int = centers.floor().long()
    inside = (
        (centers_int[:, 0] >= 0)
        & (centers_int[:, 0] < width)
        & (centers_int[:, 1] >= 0)
        & (centers_int[:, 1] < height)
    )
    centers, sizes, centers_int = centers[inside], sizes[inside], centers_int[inside]
    size_weights = size_weights[inside]
    classes, batch_index, box_sizes = classes[inside], batch_index[inside], box_sizes[inside]

    radii = gaussian_radius(box_sizes[:, 1].ceil(), box_sizes[:, 0].ceil(), min_overlap)
    radii = radii.long().clamp(min=0)  # .long() truncates like the authors' int()
    heatmap = draw_gaussians(heatmap_shape, batch_index, classes, centers_int, radii)
    index = (batch_index * height + centers_int[:, 1]) * width + centers_int[:, 0]
    return CenterTargets(heatmap, index, sizes, centers - centers_int, size_weights)


def center_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """Penalty-reduced focal loss (paper Eq. 1) computed from logits.

    ``-[sum_{y=1} (1-p)^a log p + sum_{y<1} (1-y)^b p^a log(1-p)] / max(#{y=1}, 1)``. The logs come
    from ``logsigmoid``, so saturated logits never give log(0).

    Args:
        logits: (B, C, H, W) heatmap logits.
        target: (B, C, H, W) Gaussian heatmap, 1 at positives.
    """
    logits = logits.float()
    prob = logits.sigmoid()
    positive = target == 1
    per_pixel = torch.where(
        positive,
        (1 - prob).pow(alpha) * F.logsigmoid(logits),
        (1 - target).pow(beta) * prob.pow(alpha) * F.logsigmoid(-logits),
    )
    return -per_pixel.sum() / positive.sum().clamp(min=1)


def decode_centers(
    heatmap_logits: torch.Tensor,
    sizes: torch.Tensor,
    offset: torch.Tensor,
    stride: int,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K heatmap peaks (3x3 max-pool) over all classes and their boxes.

    Args:
        heatmap_logits: (B, C, H, W).
        sizes: (B, 2, H, W) width-height or (B, 4, H, W) left-top-right-bottom distance maps
            (see :class:`CenterTargets`).
        offset: (B, 2, H, W) offset map.
        stride: input pixels per output cell.
        topk: peaks kept per image (at most C * H * W).

    Returns:
        logits (B, K) of the peaks, sorted descending (non-peaks fill the tail with -inf);
        classes (B, K) int64; boxes (B, K, 4) XYXY and keypoints (B, K, 2) (x, y), both in
        network-input pixels.
    """
    num_images, num_classes, height, width = heatmap_logits.shape
    # Peaks are found on logits: sigmoid is monotonic, and its saturation at 1.0 would tie
    # distinct neighbours.
    pooled = F.max_pool2d(heatmap_logits, kernel_size=3, stride=1, padding=1)
    peak_logits = heatmap_logits.float().masked_fill(pooled != heatmap_logits, float("-inf"))
    k = min(topk, num_classes * height * width)
    logits, flat_index = peak_logits.flatten(1).topk(k, dim=1)
    classes = flat_index // (height * width)
    cell = flat_index % (height * width)

    sizes_at = sizes.float().flatten(2).gather(2, cell[:, None, :].expand(-1, len(sizes[0]), -1))
    offset_at = offset.float().flatten(2).gather(2, cell[:, None, :].expand(-1, 2, -1))  # (B, 2, K)
    centers = torch.stack([cell % width, cell // width], dim=1) + offset_at
    low, high = box_extents(sizes_at)
    boxes = torch.cat([centers - low, centers + high], dim=1) * stride
    return logits, classes, boxes.transpose(1, 2), (centers * stride).transpose(1, 2)


def box_extents(sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far boxes reach before and after their keypoint along x and y, each (N, 2, ...), from
    (N, 2, ...) widths and heights (box-centre keypoints) or (N, 4, ...) distances to the left,
    top, right and bottom sides (interior keypoints)."""
    if sizes.shape[1] == 2:
        return sizes / 2, sizes / 2
    return sizes[:, :2], sizes[:, 2:]


def _beyond_canvas(boxes: torch.Tensor, canvas_hw: tuple[int, int]) -> torch.Tensor:
    """(N, 4) bool: which sides (left, top, right, bottom) of the XYXY boxes lie beyond a canvas
    of ``canvas_hw``."""
    height, width = canvas_hw
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    return torch.stack([x1 < 0, y1 < 0, x2 > width, y2 > height], dim=1)


def _two_conv_head(
    in_channels: int, hidden: int, out_channels: int, first_kernel: int, last_kernel: int
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, first_kernel, padding=first_kernel // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, last_kernel, padding=last_kernel // 2),
    )


@PROPOSAL_GENERATOR_REGISTRY.register()
class CenterKeypointProposalGenerator(nn.Module):
    """Heatmap / width-height / offset heads on one feature map, CenterNet targets and losses,
    and peak decoding into proposals (one per detected centre, no box NMS).
    """

    @configurable
    def __init__(
        self,
        *,
        in_feature: str,
        in_channels: int,
        stride: int,
        num_classes: int,
        head_channels: int = 256,
        wh_kernel_size: int = 7,
        heatmap_prior_bias: float = -2.19,
        gaussian_min_overlap: float = 0.7,
        max_objects: int = 500,
        focal_alpha: float = 2.0,
        focal_beta: float = 4.0,
        loss_weights: dict[str, float] | None = None,
        regression_loss: str = "l1",
        center_point: str = "box",
        cropped_objects: str = "visible",
        log_wh: bool = False,
        size_prior: float = 0.0,
        topk: int = 500,
        score_thresh: float = 0.3,
    ):
        """
        Args:
            in_feature: name of the feature map the heads run on.
            in_channels: its channels.
            stride: its stride (input pixels per output cell).
            num_classes: heatmap channels.
            head_channels: hidden channels of each head.
            wh_kernel_size: kernel of both width-height convs.
            heatmap_prior_bias: initial bias of the heatmap logits.
            gaussian_min_overlap: IoU that fixes the Gaussian radius.
            max_objects: detection targets kept per image (in the order given).
            focal_alpha, focal_beta: exponents of :func:`center_focal_loss`.
            loss_weights: weights of "loss_heatmap", "loss_wh", "loss_offset" (missing: 1).
            regression_loss: "l1" or "smooth_l1" for sizes and offset.
            center_point: an object's keypoint: "box", its box centre, with a width-height size
                head (paper); "interior", its innermost pixel (``gt_interior_points`` of the
                ground truth), with a head for the distances to the four box sides.
            cropped_objects: "visible": an object that the training crop cuts is its visible
                part (``gt_boxes``; paper and authors); "whole": the whole object
                (``gt_whole_boxes``), its sizes regressed only where the crop keeps both sides.
            log_wh: the size head predicts the log of its sizes (regressed against the log of the
                targets, decoded with exp) instead of the sizes (the authors).
            size_prior: a typical object diameter (input pixels) at which the size head starts:
                its output bias encodes that box; 0: a zero bias (the authors).
            topk: peaks decoded per image.
            score_thresh: minimum center score of a proposal.
        """
        super().__init__()
        if regression_loss not in ("l1", "smooth_l1"):
            raise ValueError(
                f"regression_loss must be 'l1' or 'smooth_l1', got {regression_loss!r}"
            )
        if center_point not in ("box", "interior"):
            raise ValueError(
                f"MODEL.OBJGUIDED.CENTER_POINT must be 'box' or 'interior', got {center_point!r}"
            )
        self.in_feature = in_feature
        self.stride = stride
        self.num_classes = num_classes
        self.gaussian_min_overlap = gaussian_min_overlap
        self.max_objects = max_objects
        self.focal_alpha = focal_alpha
        self.focal_beta = focal_beta
        self.loss_weights = loss_weights or {}
        self.regression_loss = regression_loss
        if cropped_objects not in ("visible", "whole"):
            raise ValueError(
                "MODEL.OBJGUIDED.CROPPED_OBJECTS must be 'visible' or 'whole', "
                f"got {cropped_objects!r}"
            )
        self.center_point = center_point
        self.cropped_objects = cropped_objects
        self.log_wh = log_wh
        self.topk = topk
        self.score_thresh = score_thresh

        self.heatmap_head = _two_conv_head(in_channels, head_channels, num_classes, 3, 1)
        size_channels = 2 if center_point == "box" else 4
        self.wh_head = _two_conv_head(
            in_channels, head_channels, size_channels, wh_kernel_size, wh_kernel_size
        )
        self.offset_head = _two_conv_head(in_channels, head_channels, 2, 3, 1)
        # Weights keep PyTorch's default init (authors); biases as CenterNet: a low prior on the
        # heatmap (sigmoid(-2.19) = 0.1) and zero on the regression heads.
        nn.init.constant_(self.heatmap_head[-1].bias, heatmap_prior_bias)
        for head in (self.wh_head, self.offset_head):
            for conv in (head[0], head[-1]):
                nn.init.zeros_(conv.bias)
        if size_prior > 0:
            # Adam moves a bias by about the learning rate per step: from zero, a short schedule
            # never reaches sizes of several cells (widths and heights, or half of them for the
            # distances to the four sides).
            prior_cells = size_prior / stride / (1 if center_point == "box" else 2)
            bias = math.log(prior_cells) if log_wh else prior_cells
            nn.init.constant_(self.wh_head[-1].bias, bias)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        og = cfg.MODEL.OBJGUIDED
        feature = input_shape[og.IN_FEATURE]
        return {
            "in_feature": og.IN_FEATURE,
            "in_channels": feature.channels,
            "stride": feature.stride,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "head_channels": og.HEAD_CHANNELS,
            "wh_kernel_size": og.WH_KERNEL_SIZE,
            "heatmap_prior_bias": og.HEATMAP_PRIOR_BIAS,
            "gaussian_min_overlap": og.GAUSSIAN_MIN_OVERLAP,
            "max_objects": og.MAX_OBJECTS,
            "focal_alpha": og.FOCAL_ALPHA,
            "focal_beta": og.FOCAL_BETA,
            "loss_weights": {
                "loss_heatmap": og.HEATMAP_LOSS_WEIGHT,
                "loss_wh": og.WH_LOSS_WEIGHT,
                "loss_offset": og.OFFSET_LOSS_WEIGHT,
            },
            "regression_loss": og.REGRESSION_LOSS,
            "center_point": og.CENTER_POINT,
            "cropped_objects": og.CROPPED_OBJECTS,
            "log_wh": og.WH_LOG_SPACE,
            "size_prior": cfg.INPUT.OBJECT_SIZE if og.WH_INIT_OBJECT_SIZE else 0.0,
            "topk": og.TOPK_CENTERS,
            "score_thresh": og.SCORE_THRESH_TEST,
        }

    def forward(
        self,
        images: ImageList,
        features: dict[str, torch.Tensor],
        gt_instances: list[Instances] | None = None,
    ) -> tuple[list[Instances], dict[str, torch.Tensor]]:
        """
        Args:
            images: the padded batch; only ``image_sizes`` is used.
            features: must hold ``in_feature`` (B, C, H, W).
            gt_instances: per image, ``gt_boxes`` (network-input pixels) and ``gt_classes``;
                required in training.

        Returns:
            proposals: per image, Instances with ``proposal_boxes``, ``objectness_logits``
                (logit of the center score), ``pred_classes`` and ``proposal_keypoints`` (x, y)
                (the detected keypoints in network-input pixels), sorted by score.
            losses: {"loss_heatmap", "loss_wh", "loss_offset"} in training, else {}.
        """
        heatmap_logits, wh, offset = self.predict_maps(features[self.in_feature])
        losses = {}
        if self.training:
            losses = self.losses(heatmap_logits, wh, offset, gt_instances)
        with torch.no_grad():
            proposals = self.decode(heatmap_logits, wh, offset, images.image_sizes)
        return proposals, losses

    def predict_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, H, W) features -> heatmap logits (B, num_classes, H, W), size maps (B, 2 or 4,
        H, W; see :class:`CenterTargets`) and offset maps (B, 2, H, W)."""
        return self.heatmap_head(x), self.wh_head(x), self.offset_head(x)

    def encode(
        self, gt_instances: list[Instances], heatmap_shape: tuple[int, int, int, int]
    ) -> CenterTargets:
        """Targets of the first ``max_objects`` ground-truth instances of each image."""
        cut_sides = None
        if self.cropped_objects == "whole":
            if not all(inst.has("gt_whole_boxes") for inst in gt_instances):
                raise ValueError(
                    "MODEL.OBJGUIDED.CROPPED_OBJECTS 'whole' needs gt_whole_boxes in the training "
                    "instances (BioDatasetMapper adds them with this key)"
                )
            boxes = [inst.gt_whole_boxes.tensor[: self.max_objects] for inst in gt_instances]
            cut_sides = torch.cat(
                [_beyond_canvas(b, inst.image_size) for b, inst in zip(boxes, gt_instances)]
            )
        else:
            boxes = [inst.gt_boxes.tensor[: self.max_objects] for inst in gt_instances]
        points = None
        if self.center_point == "interior":
            points = torch.cat([i.gt_interior_points[: self.max_objects] for i in gt_instances])
        classes = [inst.gt_classes[: self.max_objects] for inst in gt_instances]
        batch_index = torch.cat(
            [
                torch.full((len(b),), i, dtype=torch.long, device=b.device)
                for i, b in enumerate(boxes)
            ]
        )
        return encode_center_targets(
            torch.cat(boxes),
            torch.cat(classes),
            batch_index,
            heatmap_shape,
            self.stride,
            self.gaussian_min_overlap,
            points,
            cut_sides,
        )

    def losses(
        self,
        heatmap_logits: torch.Tensor,
        wh: torch.Tensor,
        offset: torch.Tensor,
        gt_instances: list[Instances],
    ) -> dict[str, torch.Tensor]:
        """Weighted focal heatmap loss and size / offset regression at the GT centres."""
        targets = self.encode(gt_instances, tuple(heatmap_logits.shape))
        losses = {
            "loss_heatmap": center_focal_loss(
                heatmap_logits, targets.heatmap, self.focal_alpha, self.focal_beta
            ),
            "loss_wh": self._regression_loss(
                wh, targets.index, self.wh_target(targets.sizes), targets.size_weights
            ),
            "loss_offset": self._regression_loss(offset, targets.index, targets.offset),
        }
        return {name: loss * self.loss_weights.get(name, 1.0) for name, loss in losses.items()}

    def wh_target(self, sizes: torch.Tensor) -> torch.Tensor:
        """What the size head regresses for (M, 2 or 4) sizes in output cells."""
        # sizes are at least half a pixel: the clamp only guards log(0) of degenerate input
        return sizes.clamp(min=1e-2).log() if self.log_wh else sizes

    def _regression_loss(
        self,
        prediction: torch.Tensor,
        index: torch.Tensor,
        target: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over the elements of weight 1 (all without ``weights`` (M, D)) of the (smooth)
        L1 between the (B, D, H, W) map at the flat cell ``index`` (M,) and ``target`` (M, D);
        0, still in the graph, when there is none."""
        at_centers = prediction.float().permute(0, 2, 3, 1).flatten(0, 2)[index]
        if self.regression_loss == "smooth_l1":
            loss = F.smooth_l1_loss(at_centers, target, reduction="none", beta=1.0)
        else:
            loss = F.l1_loss(at_centers, target, reduction="none")
        if weights is None:
            return loss.sum() / max(target.numel(), 1)
        return (loss * weights).sum() / weights.sum().clamp(min=1)

    def decoded_sizes(self, wh: torch.Tensor) -> torch.Tensor:
        """The size head's (B, 2 or 4, H, W) output as sizes in output cells (float32)."""
        return wh.float().exp() if self.log_wh else wh.float()

    def decode(
        self,
        heatmap_logits: torch.Tensor,
        wh: torch.Tensor,
        offset: torch.Tensor,
        image_sizes: list[tuple[int, int]],
    ) -> list[Instances]:
        """Proposals whose center score exceeds ``score_thresh``, boxes clipped to each image."""
        logits, classes, boxes, keypoints = decode_centers(
            heatmap_logits, self.decoded_sizes(wh), offset, self.stride, self.topk
        )
        keep = logits.sigmoid() > self.score_thresh
        proposals = []
        for i, image_size in enumerate(image_sizes):
            image_boxes = Boxes(boxes[i][keep[i]])
            image_boxes.clip(image_size)
            instances = Instances(image_size)
            instances.proposal_boxes = image_boxes
            instances.objectness_logits = logits[i][keep[i]]
            instances.pred_classes = classes[i][keep[i]]
            instances.proposal_keypoints = keypoints[i][keep[i]]
            proposals.append(instances)
        return proposals
