"""Equal-N protocol. Untrained models emit arbitrary numbers of boxes, and ObjGuided's mask cost
depends on the box sizes (size-adaptive ROIs), so every architecture segments exactly the same N
ground-truth boxes of each image, after its own proposal stage:

* ObjGuided: backbone (encoder + decoder) and center-keypoint head run and decode as at inference;
  their proposals are then replaced by the N boxes (scores decreasing with the index), which the
  ROI heads segment, paste back at the original size and filter by mask NMS.
* Mask R-CNN / PointRend: backbone + FPN, the RPN and the box head on the RPN's proposals run as
  at inference (that cost does not depend on N); the box head's detections are then replaced by
  the N boxes (``forward_with_given_boxes``: mask head, PointRend's point head), whose masks are
  pasted back at the original size (``detector_postprocess``). The box head runs on exactly
  ``MODEL.RPN.POST_NMS_TOPK_TEST`` proposals, as many as a trained RPN keeps on crowded images:
  an untrained RPN keeps a few dozen valid boxes, which are repeated up to that number. In
  training no such correction is made: the baselines' ROI heads sample from fewer proposals than
  a trained RPN gives (the GT boxes and a few dozen), so their training s/iter is a lower bound.

The *dense* part is everything that does not depend on N (for ObjGuided the encoder, decoder,
detection heads and the full-resolution level-0 image conv), the *per-instance* part the rest
(ObjGuided: ROI pyramid, crops, S modules, seg head, paste-back, mask NMS; the baselines: mask
head, point head, paste-back). All models start from random weights (``MODEL.WEIGHTS ""``):
timing does not depend on them under this protocol, except that ObjGuided's mask NMS sees the
untrained masks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from objguided_d2.engine import Trainer, load_config

from .inputs import Sample

PROTOCOL = __doc__  # quoted by every report
# Relative config paths are read from the repository root, wherever the command runs.
REPO = Path(__file__).resolve().parents[2]
# Short names of ObjGuided configs accepted by --objguided-configs.
OBJGUIDED_CONFIGS = {
    "default": "configs/Base-ObjGuided.yaml",
    "fast": "configs/Base-ObjGuided-Fast.yaml",
}


def clock(device: torch.device) -> float:
    """Seconds of ``time.perf_counter``, after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Runner:
    """One architecture: its model, optimizer and the equal-N inference split in two stages."""

    # Whether :meth:`dense_only_losses` exists (a training step of the dense part alone).
    has_dense_training = False

    def __init__(self, label: str, config_file: str, cfg):
        self.label = label
        self.config_file = config_file
        self.cfg = cfg
        self.model = build_model(cfg)
        self.optimizer = Trainer.build_optimizer(cfg, self.model)
        self.device = self.model.device

    def dense(self, inputs: dict):
        """Everything that does not depend on the N boxes, for one test-mapper ``inputs`` dict
        ("image" (C, H, W) uint8, original "height" and "width"); returns the state (the
        preprocessed images and feature maps) :meth:`instances` continues from."""
        raise NotImplementedError

    def instances(self, state, inputs: dict, boxes: torch.Tensor) -> Instances:
        """Masks of the given (N, 4) XYXY boxes (network-input pixels): ``Instances`` at the
        original image size whose ``pred_masks`` are (M, height, width), M <= N."""
        raise NotImplementedError

    def dense_only_losses(self, batch: list[dict]) -> torch.Tensor:
        """The scalar loss of a training step of the dense part alone (where
        :attr:`has_dense_training`)."""
        raise NotImplementedError

    def dense_seconds_inside_instances(self) -> float:
        """Time of dense per-image work that :meth:`instances` ran last (counted as dense)."""
        return 0.0

    def segmented(self, boxes: torch.Tensor) -> int:
        """Number of the (N, 4) boxes that get a mask computed."""
        return len(boxes)

    def infer(self, sample: Sample) -> tuple[Instances, dict[str, float]]:
        """One timed inference: (result, {"dense": s, "instance": s, "total": s})."""
        boxes = sample.boxes.to(self.device)
        with torch.no_grad():
            start = clock(self.device)
            state = self.dense(sample.inputs)
            middle = clock(self.device)
            result = self.instances(state, sample.inputs, boxes)
            end = clock(self.device)
        shift = self.dense_seconds_inside_instances()
        return result, {
            "dense": middle - start + shift,
            "instance": end - middle - shift,
            "total": end - start,
        }

    def train_step(self, batch: list[dict], dense_only: bool = False) -> float:
        """One training iteration (forward, backward, optimizer step); its seconds."""
        self.model.train()
        # detectron2's heads log training statistics to an event storage
        with EventStorage():
            start = clock(self.device)
            if dense_only:
                loss = self.dense_only_losses(batch)
            else:
                loss = sum(self.model(batch).values())
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            seconds = clock(self.device) - start
        self.model.eval()
        return seconds


class ObjGuidedRunner(Runner):
    has_dense_training = True

    def __init__(self, label, config_file, cfg):
        super().__init__(label, config_file, cfg)
        self._level0_seconds = 0.0
        self._level0_start = 0.0

        # The level-0 image conv is dense per-image work that runs inside the ROI heads: time it
        # with hooks and move it to the dense part.
        def before(module, args):
            self._level0_start = clock(self.device)

        def after(module, args, output):
            self._level0_seconds += clock(self.device) - self._level0_start

        image_conv = self.model.roi_heads.image_conv
        image_conv.register_forward_pre_hook(before)
        image_conv.register_forward_hook(after)

    def dense(self, inputs):
        model = self.model
        images = model.preprocess_image([inputs])
        features = model.backbone(images.tensor)
        # The detector decodes as at inference; the given boxes replace its proposals.
        model.proposal_generator(images, features)
        self._level0_seconds = 0.0
        return images, features

    def instances(self, state, inputs, boxes):
        images, features = state
        proposals = Instances(images.image_sizes[0])
        proposals.proposal_boxes = Boxes(boxes)
        proposals.objectness_logits = torch.linspace(3, -3, len(boxes), device=boxes.device)
        proposals.pred_classes = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
        output_size = (int(inputs["height"]), int(inputs["width"]))
        (result,), _ = self.model.roi_heads(
            images, features, [proposals], output_sizes=[output_size]
        )
        return result

    def dense_seconds_inside_instances(self):
        return self._level0_seconds

    def segmented(self, boxes):
        return int((self.model.roi_heads.build_pyramid(boxes).num_levels > 0).sum())

    def dense_only_losses(self, batch):
        """Backbone and detection losses, plus the level-0 image conv (forward and backward, at
        zero weight): the training step of the dense part alone."""
        model = self.model
        images = model.preprocess_image(batch)
        gt_instances = [x["instances"].to(self.device) for x in batch]
        features = model.backbone(images.tensor)
        _, losses = model.proposal_generator(images, features, gt_instances)
        level0 = model.roi_heads.level0_map(images)
        return sum(losses.values()) + 0.0 * level0.sum()


class RCNNRunner(Runner):
    """Mask R-CNN and PointRend (detectron2's GeneralizedRCNN)."""

    def dense(self, inputs):
        model = self.model
        images = model.preprocess_image([inputs])
        features = model.backbone(images.tensor)
        (proposals,), _ = model.proposal_generator(images, features, None)
        # The box stage as at inference (StandardROIHeads' own step) on POST_NMS_TOPK_TEST
        # proposals: the untrained RPN's own, repeated. Its detections are replaced by the boxes.
        count = self.cfg.MODEL.RPN.POST_NMS_TOPK_TEST
        repeat = torch.arange(count, device=self.device) % max(len(proposals), 1)
        model.roi_heads._forward_box(features, [proposals[repeat]])
        return images, features

    def instances(self, state, inputs, boxes):
        images, features = state
        detections = Instances(images.image_sizes[0])
        # a copy: detector_postprocess scales the boxes in place
        detections.pred_boxes = Boxes(boxes.clone())
        detections.scores = torch.ones(len(boxes), device=boxes.device)
        detections.pred_classes = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
        (detections,) = self.model.roi_heads.forward_with_given_boxes(features, [detections])
        return detector_postprocess(detections, int(inputs["height"]), int(inputs["width"]))


def runner_specs(
    objguided_configs: list[str], mask_rcnn_config: str, pointrend_config: str
) -> list[tuple[str, str]]:
    """(label, config file) of every model benchmarked, ObjGuided configs first; ObjGuided configs
    are short names of :data:`OBJGUIDED_CONFIGS` or paths, the baselines' a path or ``"none"``."""
    specs = []
    for name in objguided_configs:
        path = OBJGUIDED_CONFIGS.get(name, name)
        label = name if name in OBJGUIDED_CONFIGS else Path(name).stem
        specs.append((f"objguided[{label}]", path))
    for label, path in (("mask_rcnn", mask_rcnn_config), ("pointrend", pointrend_config)):
        if path != "none":
            specs.append((label, path))
    return specs


def runner_config(config_file: str, device: str, size: int, opts: Sequence = ()):
    """The config of a benchmarked model: random weights, ``device``, trained and tested at
    ``size``, then ``opts`` (config KEY VALUE pairs)."""
    overrides = [
        "MODEL.WEIGHTS", "",
        "MODEL.DEVICE", device,
        "INPUT.IMAGE_SIZE", size,
        "INPUT.TEST_IMAGE_SIZE", size,
        # Weights stay fixed (learning rate 0) so that every timed training step does the same
        # work; the optimizer step still runs.
        "SOLVER.BASE_LR", 0.0,
        *opts,
    ]  # fmt: skip
    return load_config(str(REPO / config_file), overrides)


def build_runner(
    label: str, config_file: str, device: str, size: int, opts: Sequence = ()
) -> Runner:
    """The runner of one model (:func:`runner_config`), in eval mode."""
    cfg = runner_config(config_file, device, size, opts)
    objguided = cfg.MODEL.META_ARCHITECTURE == "ObjGuidedSegmentor"
    runner = (ObjGuidedRunner if objguided else RCNNRunner)(label, config_file, cfg)
    runner.model.eval()
    return runner
