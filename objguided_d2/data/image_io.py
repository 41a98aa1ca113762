"""Reading microscopy images: 8/16-bit, float, grayscale, RGB(A), palette; PNG, TIFF, JPEG, ...

Every reader names the file in its errors: a missing file raises ``FileNotFoundError`` and a file
that cannot be decoded raises :class:`ImageReadError`, both with the path in the message.

Images reach the network as uint8 in a detectron2 format ("BGR", "RGB" or "L"). Pixel types other
than uint8 are stretched per image (:func:`to_uint8`): the 0.1 and 99.9 percentiles of the image
map to 0 and 255, the contrast normalization microscopy viewers apply to 16-bit data.
"""

import os

import cv2
import numpy as np
import tifffile
from PIL import Image

__all__ = ["ImageReadError", "image_size", "load_pixels", "read_image", "to_uint8", "IMAGE_FORMATS"]

IMAGE_FORMATS = ("BGR", "RGB", "L")
_TIFF_SUFFIXES = (".tif", ".tiff")
# PIL modes whose numpy array is the stored data (others are converted to RGB first).
_PLAIN_PIL_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F"}
_NORMALIZATION_PERCENTILES = (0.1, 99.9)


class ImageReadError(OSError):
    """An image file exists but cannot be decoded."""


def load_pixels(path) -> tuple[np.ndarray, np.ndarray | None]:
    """The pixels of an image file as stored, and its palette.

    Args:
        path: an image file (TIFF through tifffile, any other format through PIL).

    Returns:
        (pixels, palette): pixels is (H, W) or (H, W, C) of the stored dtype, channels last and
        in RGB(A) order. For a palette (indexed) image, pixels are the uint8 indices and palette is
        the (256, 3) uint8 RGB colour table; otherwise palette is None.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        if path.lower().endswith(_TIFF_SUFFIXES):
            with tifffile.TiffFile(path) as tiff:  # the first series, all its pages
                pixels, axes, palette = tiff.series[0].asarray(), tiff.series[0].axes, None
        else:
            (pixels, palette), axes = _load_with_pil(path), None
    except Exception as err:
        raise ImageReadError(f"Cannot read image {path}: {err}") from err
    if axes is not None:
        _check_planes(pixels, axes, path)
    return _channels_last(pixels, path), palette


def _check_planes(pixels: np.ndarray, axes: str, path: str) -> None:
    """Refuse a TIFF whose planes are not colour channels: a z-stack or time series (its axes
    say so), or 2-4 planes that nothing marks as channels (C, or S for RGB samples)."""
    planes = {axis: size for axis, size in zip(axes, pixels.shape) if axis not in "YX" and size > 1}
    if planes.keys() & set("ZT"):
        raise ImageReadError(
            f"Image {path} is a z-stack or time series (axes {axes}, shape {pixels.shape}): "
            "segment one plane per file (a slice, a time point or a projection)"
        )
    unmarked = pixels.ndim == 3 and pixels.shape[0] <= 4 < pixels.shape[-1]
    if unmarked and not planes.keys() & set("CS"):
        raise ImageReadError(
            f"Image {path} holds {pixels.shape[0]} planes of unknown meaning (axes {axes}, "
            f"shape {pixels.shape}): save channels with axes CYX or as RGB, and z-slices or time "
            "points one per file"
        )


def image_size(path) -> tuple[int, int]:
    """(height, width) of an image file: from the header where PIL reads it, else (TIFF) from
    its pixels as :func:`load_pixels` returns them."""
    path = os.fspath(path)
    if path.lower().endswith(_TIFF_SUFFIXES):
        return load_pixels(path)[0].shape[:2]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except Exception as err:
        raise ImageReadError(f"Cannot read image {path}: {err}") from err


def _load_with_pil(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    with Image.open(path) as image:
        image.load()  # decode now, so that a truncated file fails here, inside the path's error
        if image.mode == "P":
            palette = np.zeros((256, 3), np.uint8)
            table = np.array(image.getpalette("RGB") or [], np.uint8).reshape(-1, 3)
            palette[: len(table)] = table
            return np.asarray(image), palette
        if image.mode not in _PLAIN_PIL_MODES:
            image = image.convert("RGB")
        return np.asarray(image), None


def _channels_last(pixels: np.ndarray, path: str) -> np.ndarray:
    """(H, W) or (H, W, C) with C <= 4; TIFFs may store channels first or carry singleton axes."""
    if pixels.ndim > 3:
        pixels = pixels.reshape([n for n in pixels.shape if n != 1])
    if pixels.ndim == 3 and pixels.shape[-1] > 4 and pixels.shape[0] <= 4:
        pixels = pixels.transpose(1, 2, 0)
    if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] <= 4):
        return pixels
    raise ImageReadError(
        f"Cannot read image {path}: pixel array of shape {pixels.shape} is not a 2D image "
        "with at most 4 channels"
    )


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Pixels as uint8, same shape.

    uint8 is returned unchanged and bool becomes {0, 255}. Any other type is stretched per image,
    all channels together: the 0.1 and 99.9 percentiles map to 0 and 255, values beyond them are
    clipped, NaNs become 0. A constant image becomes all 0.
    """
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == bool:
        return pixels.astype(np.uint8) * 255
    values = np.nan_to_num(pixels.astype(np.float32))
    low, high = np.percentile(values, _NORMALIZATION_PERCENTILES)
    if high <= low:
        return np.zeros(pixels.shape, np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def read_image(path, format: str = "BGR") -> np.ndarray:
    """An image file as the network reads it.

    Args:
        path: image file.
        format: "BGR" or "RGB" give (H, W, 3) (grayscale replicated to three channels); "L" gives
            (H, W, 1) (colour converted to luminance). Alpha channels are dropped.

    Returns:
        uint8 array (H, W, 3) or (H, W, 1).
    """
    if format not in IMAGE_FORMATS:
        raise ValueError(f"Unsupported image format {format!r}; expected one of {IMAGE_FORMATS}")
    pixels, palette = load_pixels(path)
    if palette is not None:
        pixels = palette[pixels]
    if pixels.ndim == 3:
        # Drop alpha: RGBA -> RGB, gray+alpha -> gray.
        pixels = pixels[:, :, :3] if pixels.shape[2] >= 3 else pixels[:, :, 0]
    pixels = to_uint8(pixels)
    if format == "L":
        gray = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
        return gray[:, :, None]
    rgb = np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels
    return np.ascontiguousarray(rgb[:, :, ::-1] if format == "BGR" else rgb)
