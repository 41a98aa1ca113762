"""Synthetic neural-like scenes with exact instance masks, deterministic from a seed.

A scene is a grayscale image (512 x 640 by default, the size of the authors' neural images) of cells
with an elliptic soma and long, thin, branching protrusions, placed so that many touch or overlap a
neighbour.

Geometry and masks. Somas are filled ellipses; protrusions are random-walk polylines that taper from
2-3 px to 1 px and branch, drawn with 8-connected, non-anti-aliased cv2 lines. Every pixel belongs
to at most one cell: all cells are painted in z-order on one label canvas, protrusions of every cell
first and somas on top (a soma hides the processes that pass under it, and is never cut by a 1 px
line). An instance's mask is exactly its visible pixels, and the image is rendered from the same
canvas, so what is seen is what is annotated. Instances whose box is under 2 px in height or width
are erased from both.

Appearance. Background about 80-120 grey levels; cells 15-40 levels brighter (somas more than
protrusions, a darker nucleus inside each soma); a 0.7 px Gaussian blur (the optics); a smooth,
uneven illumination (a ramp of up to +-30 % and low-frequency variation); Poisson shot noise and
Gaussian read noise.

Image ``i`` of a set depends only on ``(seed, i)``; PNG and JSON bytes are reproducible.
"""

import json
import os
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from .formats import label_image_to_annotations, save_coco_json

__all__ = [
    "Cell",
    "Protrusion",
    "SYNTHETIC_THING_CLASSES",
    "rasterize_cells",
    "random_cells",
    "render_scene",
    "generate_neural_scene",
    "generate_synthetic_neural",
]

SYNTHETIC_THING_CLASSES = ("cell",)
# Bumped whenever the generator's output changes, so cached sets are regenerated.
_GENERATOR_VERSION = 1

# Part codes of the rasterized canvas.
BACKGROUND, PROTRUSION, SOMA, NUCLEUS = 0, 1, 2, 3

_CELLS_PER_IMAGE = (12, 24)
_SOMA_SEMI_AXIS = (8.0, 15.0)  # px, major semi-axis
_SOMA_ASPECT = (0.55, 1.0)  # minor / major
_NUCLEUS_FRACTION = 0.5  # nucleus semi-axes / soma semi-axes
_NEIGHBOUR_PROBABILITY = 0.45  # a cell is placed against an existing one
_NEIGHBOUR_DISTANCE = (0.6, 1.05)  # centre distance / sum of major semi-axes: overlap to touching
_PROTRUSIONS_PER_CELL = (1, 4)
_PROTRUSION_LENGTH = (30.0, 150.0)  # px
_PROTRUSION_STEP = 3.0  # px between random-walk vertices
_PROTRUSION_TURN = 0.2  # rad, std of the heading change per step
_BRANCHES_PER_PROTRUSION = 2  # at most, each with probability 1/2
_BRANCH_ANGLE = (0.4, 1.1)  # rad from the parent's heading
_MIN_INSTANCE_SIZE = 2  # px, both box sides

_BACKGROUND_LEVEL = (80.0, 120.0)
_SOMA_CONTRAST = (18.0, 40.0)
_PROTRUSION_CONTRAST = (16.0, 32.0)
_NUCLEUS_DIMMING = (0.3, 0.6)  # nucleus contrast / soma contrast
_PSF_SIGMA = 0.7  # px
_ILLUMINATION_RAMP = (0.1, 0.3)  # relative amplitude of the linear illumination ramp
_ILLUMINATION_FIELD_STD = 0.08  # relative std of the low-frequency illumination field
_PHOTONS_PER_LEVEL = (2.0, 6.0)  # shot noise: std = sqrt(level / photons_per_level)
_READ_NOISE = (1.5, 4.0)  # grey levels


@dataclass(frozen=True)
class Protrusion:
    """A polyline of one width: ``points`` (K, 2) int32 (x, y) pixel centres, width in px."""

    points: np.ndarray
    thickness: int


@dataclass(frozen=True)
class Cell:
    """A soma ellipse (centre (x, y), semi-axes (a, b) in px, angle in degrees) and protrusions."""

    center: tuple[int, int]
    axes: tuple[int, int]
    angle: float
    protrusions: tuple[Protrusion, ...] = ()


def rasterize_cells(cells: list, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint cells in z-order (later on top), protrusions of all cells below all somas.

    Returns:
        labels: (H, W) int32, cell ``i`` of the list is id ``i + 1``, 0 = background.
        parts: (H, W) uint8, one of BACKGROUND, PROTRUSION, SOMA, NUCLEUS.
    """
    canvas = np.zeros((height, width, 2), np.int32)  # (id, part), painted together
    for cell_id, cell in enumerate(cells, start=1):
        for protrusion in cell.protrusions:
            points = protrusion.points.reshape(-1, 1, 2).astype(np.int32)
            cv2.polylines(
                canvas, [points], False, (cell_id, PROTRUSION), protrusion.thickness, cv2.LINE_8
            )
    for cell_id, cell in enumerate(cells, start=1):
        cv2.ellipse(canvas, cell.center, cell.axes, cell.angle, 0, 360, (cell_id, SOMA), -1)
        nucleus = tuple(max(1, round(a * _NUCLEUS_FRACTION)) for a in cell.axes)
        cv2.ellipse(canvas, cell.center, nucleus, cell.angle, 0, 360, (cell_id, NUCLEUS), -1)
    return canvas[:, :, 0], canvas[:, :, 1].astype(np.uint8)


def _random_protrusions(rng, start, heading: float, length: float, thickness: int, branch: bool):
    """A tapering random-walk process from ``start`` (x, y): a Protrusion per width, + branches."""
    steps = max(2, int(length / _PROTRUSION_STEP))
    headings = heading + np.cumsum(rng.normal(0.0, _PROTRUSION_TURN, steps))
    moves = _PROTRUSION_STEP * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    path = np.vstack([start, start + np.cumsum(moves, axis=0)])
    # Equal stretches of decreasing width; consecutive stretches share a vertex, so they connect.
    bounds = np.linspace(0, steps, thickness + 1).round().astype(int)
    protrusions = [
        Protrusion(np.rint(path[bounds[i] : bounds[i + 1] + 1]).astype(np.int32), thickness - i)
        for i in range(thickness)
    ]
    if branch:
        for _ in range(rng.binomial(_BRANCHES_PER_PROTRUSION, 0.5)):
            at = int(rng.integers(steps // 4, steps))
            side = rng.choice([-1.0, 1.0])
            protrusions += _random_protrusions(
                rng,
                path[at],
                headings[at - 1] + side * rng.uniform(*_BRANCH_ANGLE),
                rng.uniform(0.3, 0.6) * length * (1 - at / steps) + 4 * _PROTRUSION_STEP,
                thickness=1,
                branch=False,
            )
    return protrusions


def random_cells(rng: np.random.Generator, height: int, width: int) -> list:
    """Cells of one scene, in z-order (bottom first); about half touch or overlap a neighbour."""
    cells = []
    for _ in range(int(rng.integers(_CELLS_PER_IMAGE[0], _CELLS_PER_IMAGE[1] + 1))):
        major = rng.uniform(*_SOMA_SEMI_AXIS)
        minor = major * rng.uniform(*_SOMA_ASPECT)
        if cells and rng.random() < _NEIGHBOUR_PROBABILITY:
            neighbour = cells[int(rng.integers(len(cells)))]
            distance = (neighbour.axes[0] + major) * rng.uniform(*_NEIGHBOUR_DISTANCE)
            direction = rng.uniform(0, 2 * np.pi)
            center = np.array(neighbour.center) + distance * np.array(
                [np.cos(direction), np.sin(direction)]
            )
        else:
            center = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        protrusions = []
        for _ in range(int(rng.integers(_PROTRUSIONS_PER_CELL[0], _PROTRUSIONS_PER_CELL[1] + 1))):
            heading = rng.uniform(0, 2 * np.pi)
            # Start inside the soma so that the process is connected to it.
            start = center + 0.5 * minor * np.array([np.cos(heading), np.sin(heading)])
            protrusions += _random_protrusions(
                rng,
                start,
                heading,
                rng.uniform(*_PROTRUSION_LENGTH),
                thickness=int(rng.integers(2, 4)),
                branch=True,
            )
        cells.append(
            Cell(
                center=(round(center[0]), round(center[1])),
                axes=(max(2, round(major)), max(2, round(minor))),
                angle=float(rng.uniform(0, 180)),
                protrusions=tuple(protrusions),
            )
        )
    return cells


def _erase_small_instances(labels: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """Remove instances whose box is under 2 px (from labels and parts); ids become 1..N."""
    for instance_id, window in enumerate(ndimage.find_objects(labels), start=1):
        if window is None:
            continue
        if min(s.stop - s.start for s in window) < _MIN_INSTANCE_SIZE:
            erased = labels[window] == instance_id
            labels[window][erased] = 0
            parts[window][erased] = BACKGROUND
    values, ids = np.unique(labels, return_inverse=True)
    return (ids.reshape(labels.shape) + int(values[0] != 0)).astype(np.int32)


def _illumination(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) float32 relative illumination around 1: a linear ramp times a smooth random field."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = xs * np.cos(direction) + ys * np.sin(direction)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0) * 2 - 1  # in [-1, 1]
    coarse = rng.normal(0.0, _ILLUMINATION_FIELD_STD, (4, 5)).astype(np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return (1 + rng.uniform(*_ILLUMINATION_RAMP) * ramp) * (1 + smooth)


def render_scene(labels: np.ndarray, parts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8 microscope-like image of a rasterized scene (see the module docstring)."""
    height, width = labels.shape
    num_cells = int(labels.max())
    contrast = np.zeros((num_cells + 1, 4), np.float32)  # [id, part]
    soma = rng.uniform(*_SOMA_CONTRAST, num_cells)
    contrast[1:, SOMA] = soma
    contrast[1:, NUCLEUS] = soma * rng.uniform(*_NUCLEUS_DIMMING, num_cells)
    contrast[1:, PROTRUSION] = rng.uniform(*_PROTRUSION_CONTRAST, num_cells)
    signal = cv2.GaussianBlur(contrast[labels, parts], (0, 0), _PSF_SIGMA)
    expected = (rng.uniform(*_BACKGROUND_LEVEL) + signal) * _illumination(rng, height, width)
    photons_per_level = rng.uniform(*_PHOTONS_PER_LEVEL)
    noisy = rng.poisson(np.maximum(expected, 0) * photons_per_level) / photons_per_level
    noisy += rng.normal(0.0, rng.uniform(*_READ_NOISE), (height, width))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def generate_neural_scene(
    rng: np.random.Generator, height: int = 512, width: int = 640
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image (H, W) uint8, labels (H, W) int32 with ids 1..N, 0 = background)."""
    labels, parts = rasterize_cells(random_cells(rng, height, width), height, width)
    labels = _erase_small_instances(labels, parts)
    return render_scene(labels, parts, rng), labels


def _write_atomically(path: str, data: bytes) -> None:
    """Concurrent writers (one per distributed rank) never leave a partial file behind."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def generate_synthetic_neural(
    output_dir, num_images: int = 100, seed: int = 0, height: int = 512, width: int = 640
) -> str:
    """Write a synthetic set unless an identical one is there; return its COCO JSON path.

    Writes ``<output_dir>/images/000000.png, ...`` (8-bit grayscale) and, last,
    ``<output_dir>/annotations.json`` (COCO instances, RLE masks, category "cell"), whose "info"
    records the parameters: a set is reused when they match and all its images exist.
    """
    output_dir = os.path.abspath(output_dir)
    json_file = os.path.join(output_dir, "annotations.json")
    image_files = [os.path.join(output_dir, "images", f"{i:06d}.png") for i in range(num_images)]
    info = {
        "description": "objguided_d2 synthetic neural-like scenes",
        "generator_version": _GENERATOR_VERSION,
        "seed": seed,
        "num_images": num_images,
        "height": height,
        "width": width,
    }
    if _is_cached(json_file, info, image_files):
        return json_file
    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    records = []
    for index, image_file in enumerate(image_files):
        image, labels = generate_neural_scene(np.random.default_rng([seed, index]), height, width)
        _write_atomically(image_file, cv2.imencode(".png", image)[1].tobytes())
        records.append(
            {
                "file_name": image_file,
                "height": height,
                "width": width,
                "annotations": label_image_to_annotations(labels),
            }
        )
    save_coco_json(records, json_file, SYNTHETIC_THING_CLASSES, info=info)
    return json_file


def _is_cached(json_file: str, info: dict, image_files: list) -> bool:
    if not os.path.isfile(json_file):
        return False
    with open(json_file) as f:
        cached_info = json.load(f).get("info")
    return cached_info == info and all(os.path.isfile(path) for path in image_files)
