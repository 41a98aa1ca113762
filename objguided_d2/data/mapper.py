"""The dataset mapper every architecture of the project trains and tests with."""

import math
from collections.abc import Iterable

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
from scipy import ndimage

from .formats import segmentation_to_rle
from .image_io import read_image
from .transforms import RandomSquareCrop, ResizeToInput

__all__ = [
    "BioDatasetMapper",
    "build_bio_augmentations",
    "interior_points",
    "largest_components",
    "median_object_size",
    "tight_boxes",
]

# Masks are decoded at the original resolution a chunk at a time, to bound memory on large images
# with hundreds of instances.
_DECODE_BUDGET_BYTES = 64 * 2**20


def build_bio_augmentations(cfg, is_train: bool) -> list:
    """The paper's augmentations from ``cfg.INPUT`` (see :mod:`objguided_d2.data.transforms`)."""
    size = cfg.INPUT.IMAGE_SIZE
    if not is_train:
        test_size = cfg.INPUT.TEST_IMAGE_SIZE or size
        return [ResizeToInput(test_size, cfg.INPUT.TEST_RESIZE, cfg.INPUT.TEST_SCALE)]
    crop = cfg.INPUT.SQUARE_CROP
    if crop.ENABLED:
        augmentations = [RandomSquareCrop(size, tuple(crop.SCALES), crop.CENTER_MARGIN)]
    else:
        augmentations = [RandomSquareCrop(size, random_center=False)]
    if cfg.INPUT.HFLIP_TRAIN:
        augmentations.append(T.RandomFlip(prob=0.5, horizontal=True, vertical=False))
    if cfg.INPUT.VFLIP_TRAIN:
        augmentations.append(T.RandomFlip(prob=0.5, horizontal=False, vertical=True))
    return augmentations


def median_object_size(dataset_dicts: Iterable[dict], resize: ResizeToInput) -> float:
    """Median diameter, sqrt(box width x height), of the non-crowd objects of ``dataset_dicts``
    in pixels after ``resize`` (0 when there is none): the object size a model trained on them
    sees at test time."""
    diameters = []
    for record in dataset_dicts:
        height, width = record["height"], record["width"]
        out_h, out_w = resize.output_hw(height, width)
        for annotation in record.get("annotations", []):
            if annotation.get("iscrowd", 0):
                continue
            box = BoxMode.convert(annotation["bbox"], annotation["bbox_mode"], BoxMode.XYXY_ABS)
            box_w, box_h = (box[2] - box[0]) * out_w / width, (box[3] - box[1]) * out_h / height
            diameters.append(math.sqrt(max(box_w, 0) * max(box_h, 0)))
    return float(np.median(diameters)) if diameters else 0.0


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool masks -> (N, 4) float32 XYXY boxes, (x1, y1) the first and (x2, y2) one past
    the last pixel; an empty mask gives zeros."""
    columns, rows = masks.any(axis=1), masks.any(axis=2)
    width, height = columns.shape[1], rows.shape[1]
    boxes = np.stack(
        [
            columns.argmax(axis=1),
            rows.argmax(axis=1),
            width - columns[:, ::-1].argmax(axis=1),
            height - rows[:, ::-1].argmax(axis=1),
        ],
        axis=1,
    ).astype(np.float32)
    boxes[~columns.any(axis=1)] = 0
    return boxes


def largest_components(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool masks reduced each to its largest 4-connected component (the first in raster
    order among equally large ones); empty masks stay empty."""
    out = np.zeros_like(masks)
    for index, (x1, y1, x2, y2) in enumerate(tight_boxes(masks).astype(int)):
        labels, count = ndimage.label(masks[index, y1:y2, x1:x2])  # 4-connectivity
        if count:
            largest = np.bincount(labels.ravel())[1:].argmax() + 1
            out[index, y1:y2, x1:x2] = labels == largest
    return out


def interior_points(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, H, W) bool masks and their (N, 4) tight boxes -> (N, 2) float32 (x, y) of each mask's
    innermost pixel (its largest Euclidean distance to the background or the canvas edge; the
    first in raster order among ties), at the pixel centre; an empty mask gives its box centre."""
    points = (boxes[:, :2] + boxes[:, 2:]) / 2
    for index, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        if x2 > x1 and y2 > y1:
            # One pixel of background around the box: the canvas edge counts as outside.
            window = np.pad(masks[index, y1:y2, x1:x2], 1)
            y, x = np.unravel_index(ndimage.distance_transform_edt(window).argmax(), window.shape)
            points[index] = (x1 + x - 0.5, y1 + y - 0.5)
    return points.astype(np.float32)


class BioDatasetMapper:
    """Reads an image robustly, applies the augmentations, builds bitmask ground truth.

    Input: a detectron2 dataset dict (file_name, height, width, image_id, annotations with COCO
    RLE or polygon segmentations). Output: the dict without "annotations", plus
    "image": uint8 tensor (C, H', W') in ``image_format`` (C = 3 for "BGR"/"RGB", 1 for "L"), and
    in training "instances": Instances of size (H', W') with gt_boxes (Boxes, XYXY, tight boxes of
    the masks), gt_classes (int64), gt_masks (BitMasks) and, with ``interior_points``,
    gt_interior_points ((N, 2) float, see :func:`interior_points`). With ``largest_component``, each
    augmented mask keeps only its largest 4-connected component (the authors' code: a resized
    thin protrusion falls apart into fragments). Instances whose box is under
    ``min_instance_size`` px in width or height after the augmentations are dropped; crowd
    annotations are ignored. With ``whole_objects``, also gt_whole_boxes (Boxes: the whole
    objects' boxes, reaching beyond the canvas where the augmentations cut an object) and, with
    ``interior_points``, the whole objects' innermost pixels, possibly off the canvas, instead
    of the visible parts'. "height"/"width" stay the original size, for mapping predictions back.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: list,
        image_format: str,
        min_instance_size: int,
        largest_component: bool = False,
        interior_points: bool = False,
        whole_objects: bool = False,
    ):
        """
        Args:
            is_train: build "instances" from the annotations.
            augmentations: detectron2 Augmentations / Transforms, applied in order. Their
                transforms must accept (H, W, N) uint8 masks in ``apply_segmentation``.
            image_format: "BGR", "RGB" or "L".
            min_instance_size: minimal box width and height (px) of a kept instance.
            largest_component: keep each mask's largest 4-connected component only.
            interior_points: add each instance's innermost pixel (the detector's keypoint with
                ``MODEL.OBJGUIDED.CENTER_POINT "interior"``).
            whole_objects: add the whole objects' boxes, and take the interior points of the
                whole objects (``MODEL.OBJGUIDED.CROPPED_OBJECTS "whole"``).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.min_instance_size = min_instance_size
        self.largest_component = largest_component
        self.interior_points = interior_points
        self.whole_objects = whole_objects

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        return {
            "is_train": is_train,
            "augmentations": build_bio_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "min_instance_size": cfg.INPUT.MIN_INSTANCE_SIZE,
            "largest_component": cfg.INPUT.GT_LARGEST_COMPONENT,
            "interior_points": cfg.MODEL.OBJGUIDED.CENTER_POINT == "interior",
            "whole_objects": cfg.MODEL.OBJGUIDED.CROPPED_OBJECTS == "whole",
        }

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = dict(dataset_dict)  # the caller's dict is reused across epochs
        annotations = dataset_dict.pop("annotations", [])
        image = read_image(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        original_size = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.is_train:
            dataset_dict["instances"] = self._instances(
                annotations, transforms, original_size, image.shape[:2]
            )
        return dataset_dict

    def _instances(self, annotations, transforms, original_size, output_size) -> Instances:
        height, width = original_size
        annotations = [a for a in annotations if not a.get("iscrowd", 0)]
        rles = [segmentation_to_rle(a["segmentation"], height, width) for a in annotations]
        classes = np.array([a["category_id"] for a in annotations], np.int64)
        whole_boxes = np.zeros((0, 4), np.float32)
        if rles:
            # Instances whose box leaves the output canvas are never decoded.
            boxes = mask_util.toBbox(rles)
            boxes[:, 2:] += boxes[:, :2]
            boxes = transforms.apply_box(boxes)
            inside = (
                (boxes[:, 2] > 0)
                & (boxes[:, 0] < output_size[1])
                & (boxes[:, 3] > 0)
                & (boxes[:, 1] < output_size[0])
            )
            rles = [rle for rle, keep in zip(rles, inside) if keep]
            classes = classes[inside]
            whole_boxes = boxes[inside].astype(np.float32)
        masks, whole_points = self._transform_masks(
            rles,
            transforms,
            original_size,
            output_size,
            whole_points=self.interior_points and self.whole_objects,
        )
        if self.largest_component:
            masks = largest_components(masks)
        boxes = tight_boxes(masks)
        keep = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        keep = keep >= self.min_instance_size
        instances = Instances(output_size)
        instances.gt_boxes = Boxes(torch.from_numpy(boxes[keep]))
        instances.gt_classes = torch.from_numpy(classes[keep])
        instances.gt_masks = BitMasks(torch.from_numpy(masks[keep]))
        if self.whole_objects:
            instances.gt_whole_boxes = Boxes(torch.from_numpy(whole_boxes[keep]))
        if self.interior_points:
            if whole_points is None:
                points = interior_points(masks[keep], boxes[keep])
            else:
                points = whole_points[keep]
            instances.gt_interior_points = torch.from_numpy(points)
        return instances

    @staticmethod
    def _transform_masks(
        rles, transforms, original_size, output_size, whole_points: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, H', W') bool masks of ``rles`` after ``transforms`` and, with ``whole_points``, the
        (N, 2) float32 :func:`interior_points` of the masks before them, transformed (else None)."""
        chunk = max(1, _DECODE_BUDGET_BYTES // (original_size[0] * original_size[1]))
        warped = [np.zeros((0, *output_size), bool)]
        points = [np.zeros((0, 2), np.float32)]
        for start in range(0, len(rles), chunk):
            decoded = mask_util.decode(rles[start : start + chunk])  # (H, W, n), Fortran order
            masks = transforms.apply_segmentation(decoded)  # (H', W', n)
            warped.append(masks.transpose(2, 0, 1).astype(bool))
            if whole_points:
                whole = decoded.transpose(2, 0, 1).view(bool)
                points.append(transforms.apply_coords(interior_points(whole, tight_boxes(whole))))
        return np.concatenate(warped), (
            np.concatenate(points).astype(np.float32) if whole_points else None
        )
