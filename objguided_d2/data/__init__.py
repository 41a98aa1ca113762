"""Datasets, the shared dataset mapper and synthetic data."""

from .builtin import (
    DATASETS_ROOT_ENV,
    datasets_root,
    register_builtin_datasets,
    register_coco_instances_dataset,
    register_dataset_specs,
    register_label_folder_dataset,
    register_synthetic_neural_dataset,
)
from .formats import (
    annotations_to_label_image,
    label_image_to_annotations,
    read_label_image,
    save_coco_json,
)
from .image_io import ImageReadError, read_image
from .mapper import BioDatasetMapper, build_bio_augmentations, median_object_size
from .synthetic import generate_neural_scene, generate_synthetic_neural
from .transforms import RandomSquareCrop, ResizeToInput, ScaleShiftTransform

# The standard dataset names (lazy: nothing is read until a dataset is used).
register_builtin_datasets()

__all__ = [
    "DATASETS_ROOT_ENV",
    "BioDatasetMapper",
    "ImageReadError",
    "RandomSquareCrop",
    "ResizeToInput",
    "ScaleShiftTransform",
    "annotations_to_label_image",
    "build_bio_augmentations",
    "datasets_root",
    "generate_neural_scene",
    "generate_synthetic_neural",
    "label_image_to_annotations",
    "median_object_size",
    "read_image",
    "read_label_image",
    "register_builtin_datasets",
    "register_coco_instances_dataset",
    "register_dataset_specs",
    "register_label_folder_dataset",
    "register_synthetic_neural_dataset",
    "save_coco_json",
]
