"""Robust image reading: bit depths, channel layouts, palettes, and errors that name the file."""

import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from objguided_d2.data.image_io import ImageReadError, load_pixels, read_image, to_uint8


def test_16bit_tiff_is_stretched_between_its_percentiles(tmp_path):
    # 45 % at 1000, 10 % at 2000, 45 % at 3000: the 0.1 / 99.9 percentiles are 1000 and 3000.
    pixels = np.full((10, 100), 2000, np.uint16)
    pixels[:, :45], pixels[:, 55:] = 1000, 3000
    path = tmp_path / "ramp.tif"
    tifffile.imwrite(path, pixels)
    image = read_image(path, "RGB")
    assert image.dtype == np.uint8 and image.shape == (10, 100, 3)
    assert (image[:, :45] == 0).all() and (image[:, 45:55] == 128).all()
    assert (image[:, 55:] == 255).all()


def test_outliers_beyond_the_percentiles_are_clipped():
    pixels = np.full(10000, 500, np.uint16)
    pixels[:5000] = 100
    pixels[0], pixels[-1] = 0, 65535  # 0.01 % each: inside the clipped tails
    out = to_uint8(pixels)
    assert out[0] == 0 and out[1] == 0 and out[-2] == 255 and out[-1] == 255


def test_constant_and_nan_images_do_not_divide_by_zero():
    with np.errstate(all="raise"):
        assert (to_uint8(np.full((4, 4), 7, np.uint16)) == 0).all()
        assert (to_uint8(np.full((4, 4), np.nan, np.float32)) == 0).all()


def test_bool_and_uint8_pass_through():
    assert to_uint8(np.array([True, False])).tolist() == [255, 0]
    pixels = np.array([3, 250], np.uint8)
    assert to_uint8(pixels) is pixels


def test_channel_first_tiff_becomes_channels_last(tmp_path):
    pixels = np.zeros((3, 8, 9), np.uint8)
    pixels[0], pixels[2] = 200, 50  # R, B
    path = tmp_path / "cfirst.tif"
    tifffile.imwrite(path, pixels, photometric="minisblack", metadata={"axes": "CYX"})
    assert read_image(path, "BGR")[0, 0].tolist() == [50, 0, 200]
    tifffile.imwrite(path, pixels, photometric="rgb", planarconfig="separate")  # axes SYX
    assert read_image(path, "BGR")[0, 0].tolist() == [50, 0, 200]


@pytest.mark.parametrize(
    "planes, metadata, message",
    [
        (3, {"axes": "ZYX"}, "z-stack or time series (axes ZYX"),
        (2, {"axes": "TYX"}, "z-stack or time series (axes TYX"),
        (3, {"axes": "ZYX", "imagej": True}, "z-stack or time series (axes ZYX"),
        (2, {}, "2 planes of unknown meaning (axes QYX"),
        (3, {}, "3 planes of unknown meaning (axes QYX"),
        (3, None, "3 planes of unknown meaning (axes IYX"),  # pages without shape metadata
    ],
)
def test_stacks_and_unmarked_planes_are_refused_naming_the_axes(
    tmp_path, planes, metadata, message
):
    """A z-stack or time series is never read as colours, nor planes that nothing marks as such."""
    path = tmp_path / "stack.tif"
    pixels = np.zeros((planes, 8, 9), np.uint16)
    if metadata and metadata.pop("imagej", False):
        tifffile.imwrite(path, pixels, imagej=True, metadata=metadata)
    elif metadata == {}:
        tifffile.imwrite(path, pixels, photometric="minisblack")
    else:
        tifffile.imwrite(path, pixels, photometric="minisblack", metadata=metadata)
    with pytest.raises(ImageReadError, match=re.escape(f"{path} ") + ".*" + re.escape(message)):
        read_image(path, "BGR")


def test_grayscale_png_is_replicated_or_kept_as_one_channel(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4)).save(path)
    bgr = read_image(path, "BGR")
    assert bgr.shape == (3, 4, 3) and (bgr == np.arange(12).reshape(3, 4, 1)).all()
    gray = read_image(path, "L")
    assert gray.shape == (3, 4, 1) and gray[2, 3, 0] == 11


def test_rgba_png_drops_alpha_and_orders_channels(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 0  # red, fully transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    assert read_image(path, "RGB")[0, 0].tolist() == [255, 0, 0]
    assert read_image(path, "BGR")[0, 0].tolist() == [0, 0, 255]
    assert read_image(path, "L")[0, 0, 0] == 76  # ITU-R 601 luma of pure red


def test_palette_png_gives_indices_and_palette_or_colours(tmp_path):
    image = Image.frombytes("P", (2, 2), bytes([0, 1, 2, 1]))
    image.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 0])
    path = tmp_path / "palette.png"
    image.save(path)
    indices, palette = load_pixels(path)
    assert indices.tolist() == [[0, 1], [2, 1]] and palette[2].tolist() == [200, 100, 0]
    assert read_image(path, "RGB")[1, 0].tolist() == [200, 100, 0]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "image.png"
    with pytest.raises(FileNotFoundError, match=str(path)):
        read_image(path)


@pytest.mark.parametrize("name", ["garbage.png", "garbage.tif", "truncated.png"])
def test_corrupt_file_names_the_path(tmp_path, name):
    path = tmp_path / name
    if name == "truncated.png":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(b"not an image at all" * 10)
    with pytest.raises(ImageReadError, match=str(path)):
        read_image(path)


def test_empty_file_and_five_plane_tiff_name_the_path(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=str(empty)):
        read_image(empty)
    planes = tmp_path / "planes.tif"
    tifffile.imwrite(planes, np.zeros((5, 8, 9), np.uint8), photometric="minisblack")
    with pytest.raises(ImageReadError, match=re.escape(str(planes))):
        read_image(planes)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="YUV"):
        read_image(tmp_path / "x.png", "YUV")
