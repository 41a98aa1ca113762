"""Instance annotations: label images <-> detectron2 annotations (COCO RLE masks) <-> COCO JSON.

Annotations follow detectron2's dataset-dict convention: ``{"bbox": [x, y, w, h] (XYWH_ABS, tight
box of the mask), "bbox_mode", "category_id" (0-based), "segmentation": {"size": [H, W], "counts":
str} (compressed COCO RLE), "iscrowd": 0}``.

Label images come in three encodings (:func:`read_label_image`):

- "index": pixel values are instance ids, 0 is background (uint8/uint16/int32 PNG or TIFF: the
  layout of StarDist and Cellpose; for a palette PNG, the palette indices, as in CVPPP).
- "color": colour-coded RGB(A); every colour whose R, G and B are not all equal is one instance,
  grey, black and white are background (the authors' plant and neural masks). Ids are numbered in
  raster order of each colour's first pixel.
- "auto": "index" for single-channel and palette images and for RGB(A) images whose R, G and B
  are equal everywhere (grey labels saved as colour), "color" for other RGB(A).

Label images must be stored losslessly: JPEG labels are refused (compression changes ids along
every border).
"""

import json
import os

import numpy as np
import pycocotools.mask as mask_util
from detectron2.structures import BoxMode
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .image_io import ImageReadError, load_pixels

__all__ = [
    "LABEL_ENCODINGS",
    "encode_mask",
    "segmentation_to_rle",
    "mask_to_annotation",
    "label_image_to_annotations",
    "annotations_to_label_image",
    "decode_color_labels",
    "read_label_image",
    "save_coco_json",
    "split_components",
]

LABEL_ENCODINGS = ("auto", "index", "color")
_LOSSY_SUFFIXES = (".jpg", ".jpeg")


def encode_mask(mask: np.ndarray, offset=(0, 0), image_size=None) -> dict:
    """Compressed COCO RLE of a binary mask that covers part of an image.

    Args:
        mask: (h, w) bool (or 0/1) array.
        offset: (top, left) of the mask in the image.
        image_size: (H, W) of the image; defaults to the mask's shape. Encoding a crop costs its
            own size, not the image's.

    Returns:
        {"size": [H, W], "counts": str}.
    """
    height, width = image_size or mask.shape
    top, left = offset
    if top < 0 or left < 0 or top + mask.shape[0] > height or left + mask.shape[1] > width:
        raise ValueError(
            f"mask of shape {mask.shape} at {offset} exceeds the image {height}x{width}"
        )
    # COCO RLE runs go down the columns, so enumerate pixels of the transposed mask.
    xs, ys = np.nonzero(np.asarray(mask, bool).T)
    index = (xs + left).astype(np.int64) * height + (ys + top)
    rle = mask_util.frPyObjects(
        {"size": [height, width], "counts": _run_lengths(index, height * width)}, height, width
    )
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _run_lengths(index: np.ndarray, total: int) -> list:
    """Uncompressed RLE counts (background, foreground, background, ...) of sorted pixel indices."""
    if index.size == 0:
        return [total]
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = index[np.r_[0, breaks]]
    ends = index[np.r_[breaks - 1, index.size - 1]] + 1
    counts = np.empty(2 * len(starts) + 1, np.int64)
    counts[0:-1:2] = starts - np.r_[0, ends[:-1]]
    counts[1::2] = ends - starts
    counts[-1] = total - ends[-1]
    return counts.tolist()


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """A COCO segmentation (compressed or uncompressed RLE, or polygons) as compressed RLE."""
    if isinstance(segmentation, dict):
        if isinstance(segmentation["counts"], list):
            return mask_util.frPyObjects(segmentation, height, width)
        return segmentation
    if isinstance(segmentation, list) and segmentation:
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    raise ValueError(
        f"Unsupported segmentation: {type(segmentation).__name__} {segmentation!r:.80}"
    )


def mask_to_annotation(mask: np.ndarray, offset=(0, 0), image_size=None, category_id: int = 0):
    """One annotation dict for a binary mask placed as in :func:`encode_mask`; None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    top, left = offset
    return {
        "bbox": [float(left + x0), float(top + y0), float(x1 - x0), float(y1 - y0)],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": category_id,
        "segmentation": encode_mask(
            mask[y0:y1, x0:x1], (top + y0, left + x0), image_size or mask.shape
        ),
        "iscrowd": 0,
    }


def label_image_to_annotations(labels: np.ndarray, category_id: int = 0) -> list:
    """Annotations of an instance label image, one per nonzero value in ascending order.

    Args:
        labels: (H, W) non-negative integer array, 0 = background.
        category_id: the 0-based category of every instance.
    """
    if labels.ndim != 2:
        raise ValueError(f"a label image is 2D, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("label images hold non-negative instance ids")
    # Consecutive ids keep find_objects' output short whatever the label values are.
    values, ids = np.unique(labels, return_inverse=True)
    ids = ids.reshape(labels.shape) + int(values[0] != 0)
    annotations = []
    for instance_id, window in enumerate(ndimage.find_objects(ids), start=1):
        if window is None:  # the background id of an image without background
            continue
        annotation = mask_to_annotation(
            ids[window] == instance_id,
            (window[0].start, window[1].start),
            labels.shape,
            category_id,
        )
        annotations.append(annotation)
    return annotations


def annotations_to_label_image(annotations: list, height: int, width: int) -> np.ndarray:
    """(H, W) int32 label image: annotation i paints id i + 1, later ones over earlier ones."""
    labels = np.zeros((height, width), np.int32)
    for instance_id, annotation in enumerate(annotations, start=1):
        rle = segmentation_to_rle(annotation["segmentation"], height, width)
        labels[mask_util.decode(rle).astype(bool)] = instance_id
    return labels


def decode_color_labels(color: np.ndarray) -> np.ndarray:
    """(H, W) int32 ids of a colour-coded label image (H, W, 3 or 4); see the module docstring."""
    rgb = color[:, :, :3].astype(np.int64)
    keys = (rgb[:, :, 0] << 32) | (rgb[:, :, 1] << 16) | rgb[:, :, 2]
    keys[_grey_pixels(rgb)] = -1
    values, first_pixel, inverse = np.unique(keys, return_index=True, return_inverse=True)
    foreground = np.flatnonzero(values != -1)
    id_of_value = np.zeros(len(values), np.int32)
    id_of_value[foreground[np.argsort(first_pixel[foreground])]] = np.arange(1, len(foreground) + 1)
    return id_of_value[inverse.reshape(keys.shape)]


def read_label_image(path, encoding: str = "auto") -> np.ndarray:
    """(H, W) int64 instance ids (0 = background) of a label image file (see the module doc)."""
    if encoding not in LABEL_ENCODINGS:
        raise ValueError(f"Unknown label encoding {encoding!r}; expected one of {LABEL_ENCODINGS}")
    if os.fspath(path).lower().endswith(_LOSSY_SUFFIXES):
        raise ImageReadError(
            f"Label image {path} is a JPEG: lossy compression changes instance ids along every "
            "border; save label images as PNG or TIFF"
        )
    pixels, palette = load_pixels(path)
    if encoding == "auto" and palette is None and pixels.ndim == 3 and _grey_pixels(pixels).all():
        pixels = pixels[:, :, 0]
    if encoding == "color" or (encoding == "auto" and palette is None and pixels.ndim == 3):
        if palette is not None:
            pixels = palette[pixels]
        if pixels.ndim != 3 or pixels.shape[2] < 3:
            raise ImageReadError(f"Label image {path} is not colour-coded (shape {pixels.shape})")
        return decode_color_labels(pixels).astype(np.int64)
    if pixels.ndim == 3:
        raise ImageReadError(
            f"Label image {path} has {pixels.shape[2]} channels; an index label image has one "
            "(use the 'color' encoding for colour-coded labels)"
        )
    if np.issubdtype(pixels.dtype, np.floating) and not np.array_equal(pixels, np.round(pixels)):
        raise ImageReadError(f"Label image {path} holds non-integer values")
    labels = pixels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ImageReadError(f"Label image {path} holds negative values")
    return labels


def _grey_pixels(pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool: where an (H, W, C >= 3) image's R, G and B are equal."""
    return (pixels[:, :, 0] == pixels[:, :, 1]) & (pixels[:, :, 1] == pixels[:, :, 2])


def split_components(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Each 8-connected region of each id of a label image as its own id.

    Args:
        labels: (H, W) non-negative integer ids, 0 = background.

    Returns:
        The (H, W) int64 label image where each id made of several separate regions keeps its
        value on its largest region and the others get new ids above the maximum, and the sorted
        list of those ids.
    """
    height, width = labels.shape
    pixel = np.arange(labels.size).reshape(labels.shape)
    sources, targets = [], []
    # Each pixel joins its right, lower and two lower diagonal neighbours of the same id.
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        rows_a, rows_b = slice(0, height - dy), slice(dy, height)
        cols_a, cols_b = (
            slice(max(0, -dx), width - max(0, dx)),
            slice(max(0, dx), width - max(0, -dx)),
        )
        same = (labels[rows_a, cols_a] == labels[rows_b, cols_b]) & (labels[rows_a, cols_a] != 0)
        sources.append(pixel[rows_a, cols_a][same])
        targets.append(pixel[rows_b, cols_b][same])
    sources, targets = np.concatenate(sources), np.concatenate(targets)
    graph = coo_matrix((np.ones(len(sources), bool), (sources, targets)), (labels.size,) * 2)
    region = connected_components(graph, directed=False)[1].reshape(labels.shape)
    foreground = labels != 0
    regions, first_pixel, sizes = np.unique(
        region[foreground], return_index=True, return_counts=True
    )
    values = labels[foreground][first_pixel].astype(np.int64)
    split = labels.astype(np.int64, copy=True)
    # Regions by id, largest first: all but the first of each id get new ids.
    order = np.lexsort((-sizes, values))
    values, regions = values[order], regions[order]
    repeated = np.flatnonzero(values[1:] == values[:-1]) + 1
    if len(repeated):
        new_ids = np.full(region.max() + 1, -1, np.int64)
        new_ids[regions[repeated]] = int(labels.max()) + 1 + np.arange(len(repeated))
        relabelled = new_ids[region]
        split = np.where(relabelled >= 0, relabelled, split)
    return split, sorted(set(values[repeated].tolist()))


def _xywh(annotation: dict) -> list:
    mode = annotation.get("bbox_mode", BoxMode.XYWH_ABS)
    return BoxMode.convert(list(annotation["bbox"]), mode, BoxMode.XYWH_ABS)


def save_coco_json(records: list, json_file, thing_classes, info: dict | None = None) -> None:
    """Write dataset dicts as a COCO instances JSON (compressed RLE masks), atomically.

    Image paths inside the JSON's folder are stored relative to it (load with ``image_root`` = that
    folder), others as absolute paths, so the images are referenced where they are, not copied.
    Category ids are written 1-based, as COCO requires.
    """
    json_file = os.path.abspath(json_file)
    root = os.path.dirname(json_file)
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        path = os.path.abspath(record["file_name"])
        inside = os.path.commonpath([path, root]) == root
        images.append(
            {
                "id": image_id,
                "file_name": os.path.relpath(path, root) if inside else path,
                "height": record["height"],
                "width": record["width"],
            }
        )
        for annotation in record["annotations"]:
            rle = segmentation_to_rle(annotation["segmentation"], record["height"], record["width"])
            counts = rle["counts"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": annotation["category_id"] + 1,
                    "segmentation": {
                        "size": rle["size"],
                        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                    },
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in _xywh(annotation)],
                    "iscrowd": annotation.get("iscrowd", 0),
                }
            )
    coco = {
        "info": info or {},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for i, name in enumerate(thing_classes, start=1)],
    }
    os.makedirs(root, exist_ok=True)
    temporary = f"{json_file}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    os.replace(temporary, json_file)
