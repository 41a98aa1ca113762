#!/usr/bin/env python
"""Select and write the bundled nuclei set (``dsb2018_mini_{train,val}``) from DSB2018.

    python datasets/select_dsb2018_mini.py --source <folder holding stage1_train/>

Training images come from the paper's train list and validation images from its val list
(``datasets/splits/dsb2018/``), never from elsewhere. Each list is split into the imaging kinds of
the set: fluorescence (grey, dark background) at 256 x 256, at 360 x 360 and larger, histology
(colour) and brightfield (grey, bright background). A kind contributes a fixed number of images
(``KINDS``), taken at evenly spaced ranks of its images sorted by median nucleus area, so that
small and large, sparse and dense nuclei are all present. The choice is deterministic.

Written to ``--output`` (default: the package's ``objguided_d2/data/bundled/dsb2018_mini``):
``<split>/images/<id>.png`` (8-bit grey when the channels are equal, else RGB; the alpha channel
of the originals is constant and dropped) and ``<split>/labels/<id>.png`` (16-bit instance ids,
in the order of the id's mask files), plus ``manifest.csv`` with the kind, size and nucleus
count of each image. A pixel claimed by two masks goes to the first; the count is reported.
"""

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "objguided_d2" / "data" / "bundled" / "dsb2018_mini"
SPLITS_DIR = REPO / "datasets" / "splits" / "dsb2018"

# Images per kind: (train, val). The val column follows the kinds' shares of the paper's val
# list (67 / 19 / 22 / 21 / 4 of 133) at 16 images; train has three times as many.
KINDS = {
    "fluorescence 256": (22, 8),
    "fluorescence 360": (7, 2),
    "fluorescence large": (9, 3),
    "histology": (7, 2),
    "brightfield": (3, 1),
}


def image_kind(image: np.ndarray) -> str:
    """The imaging kind of an (H, W, 3) uint8 image (see the module docstring)."""
    grey = (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    if not grey:
        return "histology"
    if image.mean() > 100:
        return "brightfield"
    side = max(image.shape[:2])
    return "fluorescence 256" if side <= 256 else "fluorescence 360" if side <= 360 else (
        "fluorescence large"
    )  # fmt: skip


def read_sample(source: Path, image_id: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(H, W, 3) image, (H, W) uint16 label image and the number of doubly claimed pixels."""
    folder = source / "stage1_train" / image_id
    image = np.asarray(Image.open(folder / "images" / f"{image_id}.png").convert("RGB"))
    labels = np.zeros(image.shape[:2], np.uint16)
    overlap = 0
    for index, path in enumerate(sorted((folder / "masks").glob("*.png")), start=1):
        mask = np.asarray(Image.open(path)) > 0
        if mask.ndim == 3:
            mask = mask.any(axis=2)
        overlap += int((mask & (labels > 0)).sum())
        labels[mask & (labels == 0)] = index
    return image, labels, overlap


def select(source: Path, split: str, column: int) -> list[dict]:
    """The chosen samples of one split, each {"id", "kind", "image", "labels", "overlap", ...}."""
    ids = (SPLITS_DIR / f"{split}.txt").read_text().split()
    by_kind: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for image_id in ids:
        image, labels, overlap = read_sample(source, image_id)
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas > 0]
        kind = image_kind(image)
        by_kind[kind].append(
            {
                "id": image_id,
                "kind": kind,
                "image": image,
                "labels": labels,
                "overlap": overlap,
                "nuclei": len(areas),
                "median_area": float(np.median(areas)) if len(areas) else 0.0,
            }
        )
    chosen = []
    for kind, counts in KINDS.items():
        samples = sorted(by_kind[kind], key=lambda s: (s["median_area"], s["id"]))
        count = min(counts[column], len(samples))
        ranks = np.linspace(0, len(samples) - 1, count).round().astype(int) if count else []
        chosen += [samples[r] for r in ranks]
    return chosen


def write(samples: list[dict], output: Path, split: str) -> None:
    for folder in ("images", "labels"):
        (output / split / folder).mkdir(parents=True, exist_ok=True)
    for sample in samples:
        image = sample["image"]
        if sample["kind"] != "histology":
            image = image[..., 0]
        name = f"{sample['id']}.png"
        Image.fromarray(image).save(output / split / "images" / name, optimize=True)
        Image.fromarray(sample["labels"]).save(output / split / "labels" / name, optimize=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, type=Path, help="folder holding stage1_train/")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="output folder")
    args = parser.parse_args(argv)

    for split in ("train", "val"):
        shutil.rmtree(args.output / split, ignore_errors=True)
    rows = []
    for column, split in enumerate(("train", "val")):
        samples = select(args.source, split, column)
        write(samples, args.output, split)
        for s in samples:
            height, width = s["labels"].shape
            rows.append([split, s["id"], s["kind"], width, height, s["nuclei"], s["median_area"]])
            if s["overlap"]:
                print(f"{split} {s['id']}: {s['overlap']} pixels claimed by two masks")
        nuclei = sum(s["nuclei"] for s in samples)
        print(f"dsb2018_mini_{split}: {len(samples)} images, {nuclei} nuclei")
    with open(args.output / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "id", "kind", "width", "height", "nuclei", "median_area_px"])
        writer.writerows(rows)
    size = sum(p.stat().st_size for p in args.output.rglob("*") if p.is_file())
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
