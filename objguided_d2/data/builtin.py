"""Dataset registration: the standard names, and functions that register a user's own data.

Standard names, registered when ``objguided_d2`` is imported (lazily: no file is read until a
dataset is used):

- ``dsb2018_{train,val,test}``, ``plant_{train,val,test}``, ``neural_{train,val,test}``: COCO JSON
  files ``<root>/<dataset>/<dataset>_<split>.json`` written by the converters in ``datasets/``.
  Using one that is not prepared raises FileNotFoundError naming the expected layout and the
  command that prepares it.
- ``synthetic_neural_train`` (100 images, seed 0) and ``synthetic_neural_val`` (20 images, seed
  1): generated into ``<root>/synthetic_neural/{train,val}/`` on first use, then reused.
- ``dsb2018_mini_train`` (48 images) and ``dsb2018_mini_val`` (16 images): real nuclei bundled
  with the package (``objguided_d2/data/bundled/dsb2018_mini``, see its README), ready to use.

``<root>`` is ``$OBJGUIDED_DATASETS`` (default ``./datasets``, relative to the working directory),
read at import; :func:`register_builtin_datasets` registers the names again from another root.
"""

import functools
import logging
import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .convert import (
    SPLITS,
    THING_CLASSES,
    converted_json_path,
    label_folder_records,
    pair_images_with_labels,
)
from .synthetic import SYNTHETIC_THING_CLASSES, generate_synthetic_neural

__all__ = [
    "BUNDLED_DSB2018_MINI",
    "DATASETS_ROOT_ENV",
    "datasets_root",
    "register_builtin_datasets",
    "register_dataset_specs",
    "register_coco_instances_dataset",
    "register_label_folder_dataset",
    "register_synthetic_neural_dataset",
]

logger = logging.getLogger(__name__)

DATASETS_ROOT_ENV = "OBJGUIDED_DATASETS"

_LAYOUTS = {
    "dsb2018": (
        "the Kaggle DSB2018 layout <source>/stage1_train/<id>/images/<id>.png with one binary PNG "
        "per nucleus in <source>/stage1_train/<id>/masks/; the train/val ids are listed in "
        "datasets/splits/dsb2018/, test is every other id",
        "python datasets/prepare_dsb2018.py --source <folder holding stage1_train/>",
    ),
    "plant": (
        "CVPPP leaf segmentation, <source>/**/<name>_rgb.png with <name>_label.png (palette or "
        "colour-coded), or the authors' layout <source>/{train,val,test}/<name>.png with "
        "colour-coded <source>/masks/<name>.png",
        "python datasets/prepare_plant.py --source <plant data folder>",
    ),
    "neural": (
        "the authors' layout <source>/{train,val,test}/<name>.<ext> with colour-coded "
        "<source>/mask/<name>.png",
        "python datasets/prepare_neural.py --source <neural data folder>",
    ),
}
_SYNTHETIC_SETS = {
    "synthetic_neural_train": {"num_images": 100, "seed": 0},
    "synthetic_neural_val": {"num_images": 20, "seed": 1},
}
_COCO_HINT = "Write one with a converter in datasets/ (see datasets/README.md)."
BUNDLED_DSB2018_MINI = Path(__file__).resolve().parent / "bundled" / "dsb2018_mini"


def datasets_root() -> str:
    """``$OBJGUIDED_DATASETS``, default ``datasets``."""
    return os.path.expanduser(os.getenv(DATASETS_ROOT_ENV, "datasets"))


def _load_coco(name: str, json_file: str, image_root: str, hint: str) -> list:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"Dataset '{name}' is not prepared: {json_file} does not exist. {hint}"
        )
    records = load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])
    missing = next((r["file_name"] for r in records if not os.path.isfile(r["file_name"])), None)
    if missing is not None:
        raise FileNotFoundError(
            f"Dataset '{name}': image {missing}, listed in {json_file}, does not exist. {hint}"
        )
    # detectron2 keeps an annotation whose "segmentation" is empty ([]), without the key.
    unsegmented = []
    for record in records:
        annotations = record["annotations"]
        record["annotations"] = [a for a in annotations if "segmentation" in a]
        unsegmented += [(record, a) for a in annotations if "segmentation" not in a]
    if unsegmented:
        record, annotation = unsegmented[0]
        logger.warning(
            f"Dataset '{name}' ({json_file}): dropped {len(unsegmented)} annotation(s) with an "
            f"empty segmentation, e.g. id {annotation.get('id')} of image {record['file_name']}"
        )
    return records


def register_coco_instances_dataset(name: str, json_file, image_root=None, *, hint=_COCO_HINT):
    """Register a COCO instances JSON (RLE or polygon masks) as dataset ``name``.

    Args:
        json_file: the JSON; read when the dataset is first used.
        image_root: folder that relative ``file_name`` entries are joined to; default: the JSON's
            folder (where the converters of ``datasets/`` make them relative to).
        hint: appended to the error raised when the JSON or an image is missing.

    Category ids become contiguous 0-based ids in JSON order; ``thing_classes`` and the id mapping
    are set in the metadata when the dataset is loaded, as by detectron2's register_coco_instances.
    Annotations with an empty segmentation are dropped with a warning. Evaluation compares with
    the loaded annotations (what training sees), not with the file itself: the metadata has no
    ``json_file``, so detectron2's COCOEvaluator converts them.
    """
    json_file = os.path.abspath(json_file)
    image_root = os.path.abspath(image_root or os.path.dirname(json_file))
    DatasetCatalog.register(name, functools.partial(_load_coco, name, json_file, image_root, hint))
    MetadataCatalog.get(name).set(image_root=image_root, evaluator_type="coco")


def register_label_folder_dataset(
    name: str,
    image_dir,
    label_dir,
    *,
    image_suffix: str = "",
    label_suffix: str = "",
    encoding: str = "auto",
    thing_class: str = "object",
    recursive: bool = False,
    split: bool = False,
) -> None:
    """Register a folder of images with instance label images as dataset ``name`` (one class).

    Pairing, encodings and ``split`` as in
    :func:`objguided_d2.data.convert.pair_images_with_labels`,
    :func:`objguided_d2.data.formats.read_label_image` and
    :func:`objguided_d2.data.convert.label_folder_records`. The label images are converted in memory
    each time the dataset is loaded; for large folders, write a JSON once with
    ``datasets/prepare_label_folder.py`` and use :func:`register_coco_instances_dataset`.
    """
    pairing = functools.partial(
        pair_images_with_labels,
        image_dir,
        label_dir,
        image_suffix=image_suffix,
        label_suffix=label_suffix,
        recursive=recursive,
    )
    DatasetCatalog.register(
        name, lambda: label_folder_records(pairing(), encoding=encoding, split=split)
    )
    MetadataCatalog.get(name).set(
        thing_classes=[thing_class], thing_dataset_id_to_contiguous_id={1: 0}, evaluator_type="coco"
    )


def _load_synthetic(name: str, output_dir: str, **generator_args) -> list:
    json_file = generate_synthetic_neural(output_dir, **generator_args)
    # Known only now; an evaluator built before this converts the dataset itself instead.
    MetadataCatalog.get(name).set(json_file=json_file)
    return load_coco_json(json_file, output_dir, name)


def register_synthetic_neural_dataset(
    name: str,
    output_dir,
    num_images: int = 100,
    seed: int = 0,
    height: int = 512,
    width: int = 640,
) -> None:
    """Register a synthetic neural-like set (:mod:`objguided_d2.data.synthetic`) as ``name``,
    generated into ``output_dir`` on first use and reused while the parameters match."""
    output_dir = os.path.abspath(output_dir)
    loader = functools.partial(
        _load_synthetic,
        name,
        output_dir,
        num_images=num_images,
        seed=seed,
        height=height,
        width=width,
    )
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(
        thing_classes=list(SYNTHETIC_THING_CLASSES),
        thing_dataset_id_to_contiguous_id={1: 0},
        evaluator_type="coco",
        image_root=output_dir,
    )


def _unregister(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def register_builtin_datasets(root=None) -> None:
    """(Re-)register the standard names from ``root`` (default :func:`datasets_root`)."""
    root = os.path.abspath(datasets_root() if root is None else root)
    for dataset, (layout, command) in _LAYOUTS.items():
        output_dir = os.path.join(root, dataset)
        hint = (
            f"Expected {layout}, converted to "
            f"{converted_json_path(output_dir, dataset, '<split>')}. Prepare it with: {command} "
            f"(data root: ${DATASETS_ROOT_ENV}, now {root}; "
            "see datasets/README.md)."
        )
        for split in SPLITS:
            name = f"{dataset}_{split}"
            _unregister(name)
            json_file = converted_json_path(output_dir, dataset, split)
            register_coco_instances_dataset(name, json_file, hint=hint)
            MetadataCatalog.get(name).set(
                thing_classes=[THING_CLASSES[dataset]], thing_dataset_id_to_contiguous_id={1: 0}
            )
    for name, generator_args in _SYNTHETIC_SETS.items():
        _unregister(name)
        split = name.rsplit("_", 1)[1]
        output_dir = os.path.join(root, "synthetic_neural", split)
        register_synthetic_neural_dataset(name, output_dir, **generator_args)
    for split in ("train", "val"):
        name = f"dsb2018_mini_{split}"
        _unregister(name)
        folder = BUNDLED_DSB2018_MINI / split
        register_label_folder_dataset(
            name, folder / "images", folder / "labels", thing_class=THING_CLASSES["dsb2018"]
        )


# Specs of the datasets registered by register_dataset_specs, by name.
_REGISTERED_SPECS: dict[str, str] = {}


def register_dataset_specs(specs) -> None:
    """Register users' datasets from specs, as ``DATASETS.REGISTER`` lists them:

    * ``NAME=FILE.json[,IMAGE_ROOT]``: a COCO instances JSON
      (:func:`register_coco_instances_dataset`; image root: the JSON's folder unless given);
    * ``NAME=IMAGES[,LABELS[,LABEL_SUFFIX]]``: a folder of images with instance label images
      (:func:`register_label_folder_dataset`; labels: the images' folder unless given).

    Nothing is read until the dataset is used. A spec registered before is skipped.

    Raises:
        ValueError: naming the spec, when it is malformed or its name is already a dataset
            registered otherwise.
    """
    for spec in specs:
        name, _, paths = spec.partition("=")
        name, parts = name.strip(), [p.strip() for p in paths.split(",")] if paths else []
        if not name or not parts or not parts[0] or len(parts) > 3:
            raise ValueError(
                f"DATASETS.REGISTER entry {spec!r}: expected NAME=FILE.json[,IMAGE_ROOT] or "
                "NAME=IMAGE_FOLDER[,LABEL_FOLDER[,LABEL_SUFFIX]]"
            )
        if _REGISTERED_SPECS.get(name) == spec and name in DatasetCatalog.list():
            continue
        if name in DatasetCatalog.list():
            raise ValueError(
                f"DATASETS.REGISTER entry {spec!r}: a dataset named '{name}' is already registered"
            )
        if parts[0].lower().endswith(".json"):
            if len(parts) > 2:
                raise ValueError(f"DATASETS.REGISTER entry {spec!r}: a COCO JSON takes one root")
            register_coco_instances_dataset(name, parts[0], parts[1] if len(parts) > 1 else None)
        else:
            labels = parts[1] if len(parts) > 1 and parts[1] else parts[0]
            suffix = parts[2] if len(parts) > 2 else ""
            register_label_folder_dataset(name, parts[0], labels, label_suffix=suffix)
        _REGISTERED_SPECS[name] = spec
