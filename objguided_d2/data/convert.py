"""Converters from the layouts of the field to COCO instance JSON with RLE masks.

One implementation for the command lines under ``datasets/`` and for the lazily converted datasets
of :mod:`objguided_d2.data.builtin`. Images are referenced where they are, never copied.
"""

import logging
import os
from pathlib import Path

import numpy as np

from .formats import (
    label_image_to_annotations,
    mask_to_annotation,
    read_label_image,
    save_coco_json,
    split_components,
)
from .image_io import ImageReadError, image_size, load_pixels

__all__ = [
    "SPLITS",
    "IMAGE_EXTENSIONS",
    "THING_CLASSES",
    "converted_json_path",
    "read_split_list",
    "pair_images_with_labels",
    "label_folder_records",
    "convert_label_folder",
    "convert_dsb2018",
    "convert_phase_folders",
    "convert_cvppp",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The one category of each standard dataset.
THING_CLASSES = {"dsb2018": "nucleus", "plant": "leaf", "neural": "cell"}
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
# The authors' plant split (284/95/94 of 473) is 6:2:2; used when no split lists are given.
_DEFAULT_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


def converted_json_path(output_dir, dataset: str, split: str) -> str:
    """Where the converters write, and the standard dataset names read, ``<dataset>_<split>``."""
    return os.path.join(output_dir, f"{dataset}_{split}.json")


def read_split_list(path) -> list:
    """Names of a split list file, one per line (blank lines ignored)."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def pair_images_with_labels(
    image_dir, label_dir, *, image_suffix: str = "", label_suffix: str = "", recursive=False
) -> list:
    """Match every image with its label image.

    The image ``<image_dir>/<sub>/<name><image_suffix>.<ext>`` goes with the label image
    ``<label_dir>/<sub>/<name><label_suffix>.<ext'>`` (any extension of IMAGE_EXTENSIONS, the
    image's own first). When both folders are the same, files ending in the label suffix are labels.

    Returns:
        Sorted list of (name, image path, label path), name = ``<sub>/<name>``.
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    same_folder = image_dir.resolve() == label_dir.resolve()
    if same_folder and label_suffix == image_suffix:
        raise ValueError(f"Images and labels share {image_dir}: give them different suffixes")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Image folder not found: {image_dir}")
    files = image_dir.rglob("*") if recursive else image_dir.iterdir()
    pairs, unmatched = [], []
    for path in sorted(files):
        stem = path.stem
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not stem.endswith(image_suffix):
            continue
        if same_folder and label_suffix and stem.endswith(label_suffix):
            continue
        name = stem[: len(stem) - len(image_suffix)] if image_suffix else stem
        subfolder = path.parent.relative_to(image_dir)
        label = _find_file(label_dir / subfolder, name + label_suffix, path.suffix)
        if label is None:
            unmatched.append(path)
        else:
            pairs.append(((subfolder / name).as_posix(), str(path), str(label)))
    if unmatched:
        raise FileNotFoundError(
            f"No label image for {len(unmatched)} image(s), e.g. {unmatched[0]}: expected "
            f"{label_dir}/<name>{label_suffix}.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}>"
        )
    if not pairs:
        raise FileNotFoundError(
            f"No images <name>{image_suffix}.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}> "
            f"in {image_dir}"
        )
    return pairs


def _find_file(folder: Path, stem: str, preferred_extension: str):
    extensions = (preferred_extension, *IMAGE_EXTENSIONS)
    for extension in extensions + tuple(e.upper() for e in extensions):
        candidate = folder / f"{stem}{extension}"
        if candidate.is_file():
            return candidate
    return None


def label_folder_records(
    pairs: list, *, encoding: str = "auto", category_id: int = 0, split: bool = False
) -> list:
    """Dataset dicts of (name, image path, label path) pairs.

    An id made of several separate (8-connected) regions is one instance with a warning naming
    the files, or, with ``split``, one instance per region.

    Raises:
        ImageReadError: when a label image and its image differ in size, or a label image cannot
            be read as instance ids (see :func:`.formats.read_label_image`).
    """
    records, fragmented = [], []
    for image_id, (_, image_path, label_path) in enumerate(pairs, start=1):
        labels = read_label_image(label_path, encoding)
        height, width = image_size(image_path)
        if labels.shape != (height, width):
            raise ImageReadError(
                f"Label image {label_path} is {labels.shape[1]}x{labels.shape[0]} but its image "
                f"{image_path} is {width}x{height}"
            )
        split_labels, fragmented_ids = split_components(labels)
        if fragmented_ids:
            fragmented.append((label_path, fragmented_ids))
        records.append(
            {
                "file_name": image_path,
                "height": labels.shape[0],
                "width": labels.shape[1],
                "image_id": image_id,
                "annotations": label_image_to_annotations(
                    split_labels if split else labels, category_id
                ),
            }
        )
    if fragmented:
        path, ids = fragmented[0]
        logger.warning(
            f"{len(fragmented)} label image(s) hold ids made of several separate regions (e.g. "
            f"{path}: {', '.join(map(str, ids[:5]))}): "
            + (
                "each region became its own instance"
                if split
                else "each such id is one instance; split them into one instance per region "
                "with --split-components (split=True)"
            )
        )
    return records


def _summary(records: list) -> dict:
    return {"images": len(records), "instances": sum(len(r["annotations"]) for r in records)}


def convert_label_folder(
    image_dir,
    label_dir,
    json_file,
    *,
    image_suffix: str = "",
    label_suffix: str = "",
    encoding: str = "auto",
    thing_class: str = "object",
    recursive: bool = False,
    split: bool = False,
) -> dict:
    """A folder of images with instance label images -> one COCO JSON (see
    :func:`label_folder_records`). Returns counts."""
    pairs = pair_images_with_labels(
        image_dir,
        label_dir,
        image_suffix=image_suffix,
        label_suffix=label_suffix,
        recursive=recursive,
    )
    records = label_folder_records(pairs, encoding=encoding, split=split)
    save_coco_json(records, json_file, [thing_class])
    return _summary(records)


def _dsb2018_record(stage1_train: Path, image_id: str, empty_masks: list) -> dict:
    """One Kaggle image: ``<id>/images/<id>.png`` and one annotation per ``<id>/masks/*.png``."""
    image_path = stage1_train / image_id / "images" / f"{image_id}.png"
    height, width = load_pixels(image_path)[0].shape[:2]
    annotations = []
    for mask_path in sorted((stage1_train / image_id / "masks").glob("*.png")):
        pixels = load_pixels(mask_path)[0]
        mask = (pixels if pixels.ndim == 2 else pixels[:, :, 0]) > 0
        if mask.shape != (height, width):
            raise ImageReadError(
                f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image {width}x{height}"
            )
        annotation = mask_to_annotation(mask)
        if annotation is None:
            empty_masks.append(str(mask_path))
        else:
            annotations.append(annotation)
    return {
        "file_name": str(image_path),
        "height": height,
        "width": width,
        "annotations": annotations,
    }


def convert_dsb2018(source, splits_dir, output_dir) -> dict:
    """DSB2018 in the Kaggle layout -> ``dsb2018_{train,val,test}.json`` in ``output_dir``.

    Args:
        source: the folder holding ``stage1_train/`` (or ``stage1_train`` itself).
        splits_dir: holds ``train.txt`` and ``val.txt`` (image ids); the test split is every
            ``stage1_train`` id in neither.
        output_dir: where the JSON files go.

    Returns:
        {"train"|"val"|"test": {"images", "instances"}, "empty_masks": [mask files skipped]}.
    """
    source = Path(source)
    stage1_train = source / "stage1_train" if (source / "stage1_train").is_dir() else source
    on_disk = sorted(p.name for p in stage1_train.iterdir() if (p / "images").is_dir())
    if not on_disk:
        raise FileNotFoundError(
            f"No DSB2018 images in {stage1_train}: expected <id>/images/<id>.png and "
            "<id>/masks/*.png folders (the Kaggle stage1_train layout)"
        )
    ids = {split: read_split_list(Path(splits_dir) / f"{split}.txt") for split in SPLITS[:2]}
    listed = set(ids["train"]) | set(ids["val"])
    if set(ids["train"]) & set(ids["val"]):
        raise ValueError(f"Ids in both train.txt and val.txt of {splits_dir}")
    absent = sorted(listed - set(on_disk))
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} id(s) of the split lists are not in {stage1_train}, e.g. {absent[0]}"
        )
    ids["test"] = [image_id for image_id in on_disk if image_id not in listed]
    report = {"empty_masks": []}
    for split in SPLITS:
        records = [_dsb2018_record(stage1_train, i, report["empty_masks"]) for i in ids[split]]
        json_file = converted_json_path(output_dir, "dsb2018", split)
        save_coco_json(records, json_file, [THING_CLASSES["dsb2018"]])
        report[split] = _summary(records)
    return report


def convert_phase_folders(source, mask_folder: str, output_dir, dataset: str, encoding="auto"):
    """The authors' layout -> ``<dataset>_<split>.json``: images ``<source>/<split>/<name>.<ext>``,
    label images ``<source>/<mask_folder>/<name>.png`` (colour-coded, palette or index).
    A split whose folder is absent is skipped. Returns counts per converted split."""
    report = {}
    for split in SPLITS:
        if not (Path(source) / split).is_dir():
            continue
        pairs = pair_images_with_labels(Path(source) / split, Path(source) / mask_folder)
        records = label_folder_records(pairs, encoding=encoding)
        json_file = converted_json_path(output_dir, dataset, split)
        save_coco_json(records, json_file, [THING_CLASSES[dataset]])
        report[split] = _summary(records)
    if not report:
        raise FileNotFoundError(f"None of {', '.join(SPLITS)} is a folder of {source}")
    return report


def convert_cvppp(source, output_dir, splits_dir=None, seed: int = 0) -> dict:
    """CVPPP leaf segmentation -> ``plant_{train,val,test}.json``.

    Images ``<source>/**/<name>_rgb.png`` with label images ``<name>_label.png`` beside them
    (palette-indexed as distributed, or colour-coded). Splits: ``<splits_dir>/<split>.txt`` list
    names (``<sub>/<name>``, e.g. ``A1/plant001``); without lists, a 6:2:2 split of the shuffled
    names (``seed``). The lists used are written to ``<output_dir>/splits/``.
    """
    pairs = pair_images_with_labels(
        source, source, image_suffix="_rgb", label_suffix="_label", recursive=True
    )
    by_name = {name: (name, image, label) for name, image, label in pairs}
    if splits_dir is not None:
        names = {split: read_split_list(Path(splits_dir) / f"{split}.txt") for split in SPLITS}
        unknown = sorted({n for split in names.values() for n in split} - set(by_name))
        if unknown:
            raise FileNotFoundError(
                f"{len(unknown)} name(s) of the split lists have no <name>_rgb.png and "
                f"<name>_label.png under {source}, e.g. {unknown[0]}"
            )
    else:
        shuffled = [sorted(by_name)[i] for i in np.random.default_rng(seed).permutation(len(pairs))]
        ends = np.rint(np.cumsum(_DEFAULT_SPLIT_FRACTIONS) * len(shuffled)).astype(int)
        names = dict(zip(SPLITS, np.split(np.array(shuffled, dtype=object), ends[:-1])))
        names = {split: sorted(split_names) for split, split_names in names.items()}
    os.makedirs(os.path.join(output_dir, "splits"), exist_ok=True)
    report = {}
    for split in SPLITS:
        with open(os.path.join(output_dir, "splits", f"{split}.txt"), "w") as f:
            f.writelines(f"{name}\n" for name in names[split])
        records = label_folder_records([by_name[name] for name in names[split]])
        json_file = converted_json_path(output_dir, "plant", split)
        save_coco_json(records, json_file, [THING_CLASSES["plant"]])
        report[split] = _summary(records)
    return report
