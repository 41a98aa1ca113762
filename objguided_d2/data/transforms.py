"""The paper's geometric augmentations as detectron2 Augmentations / Transforms.

Training: a square crop of side max(H, W) x s (s drawn from INPUT.SQUARE_CROP.SCALES) at a random
centre, resized to IMAGE_SIZE x IMAGE_SIZE in one affine warp, zero fill outside the image, then a
horizontal flip and, optionally, a vertical one (detectron2's ``RandomFlip``). Test: a resize of
the longest side to IMAGE_SIZE ("fit", aspect kept) or of both sides ("stretch", the authors' test
resize).

Coordinates follow detectron2: continuous, pixel ``i`` covers [i, i + 1).
"""

import cv2
import numpy as np
from detectron2.data import transforms as T

__all__ = ["ScaleShiftTransform", "RandomSquareCrop", "ResizeToInput", "TEST_RESIZE_MODES"]

TEST_RESIZE_MODES = ("fit", "stretch")
# cv2.warpAffine accepts at most this many channels (OpenCV 5; OpenCV 4 allows 512).
_MAX_WARP_CHANNELS = 128


class ScaleShiftTransform(T.Transform):
    """x' = scale_x * x + shift_x, y' = scale_y * y + shift_y, onto an output_height x output_width
    canvas; images are interpolated linearly, segmentations by nearest neighbour, zeros outside."""

    def __init__(
        self,
        scale_x: float,
        scale_y: float,
        shift_x: float,
        shift_y: float,
        output_height: int,
        output_width: int,
    ):
        super().__init__()
        self._set_attributes(locals())

    def _pixel_matrix(self) -> np.ndarray:
        """2x3 map of pixel indices; pixel centres sit at i + 0.5, so
        i' = s * i + (s * 0.5 + shift - 0.5)."""
        return np.array(
            [
                [self.scale_x, 0.0, self.scale_x * 0.5 + self.shift_x - 0.5],
                [0.0, self.scale_y, self.scale_y * 0.5 + self.shift_y - 0.5],
            ]
        )

    def _warp(self, array: np.ndarray, interpolation: int, matrix=None, dst=None) -> np.ndarray:
        warped = cv2.warpAffine(
            array,
            self._pixel_matrix() if matrix is None else matrix,
            (self.output_width, self.output_height),
            dst=dst,
            flags=interpolation,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        return warped.reshape(self.output_height, self.output_width, *array.shape[2:])

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) image, C <= 4."""
        return self._warp(img, cv2.INTER_LINEAR)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, N) masks or labels, any N.

        A Fortran-ordered (H, W, N) stack (what pycocotools decodes) is warped plane by plane
        without a layout copy, each plane read transposed; a C-ordered one in chunks of channels.
        """
        is_bool = segmentation.dtype == bool
        array = segmentation.view(np.uint8) if is_bool else segmentation
        if array.ndim == 3 and array.shape[2] > 1 and array.flags.f_contiguous:
            warped = self._warp_planes(array)
        elif array.ndim == 2 or array.shape[2] <= _MAX_WARP_CHANNELS:
            warped = self._warp(array, cv2.INTER_NEAREST)
        else:
            step = _MAX_WARP_CHANNELS
            warped = np.concatenate(
                [
                    self._warp(np.ascontiguousarray(array[:, :, i : i + step]), cv2.INTER_NEAREST)
                    for i in range(0, array.shape[2], step)
                ],
                axis=2,
            )
        return warped.view(bool) if is_bool else warped

    def _warp_planes(self, array: np.ndarray) -> np.ndarray:
        """(H, W, N) Fortran-ordered -> (H', W', N), a view of a C-ordered (N, H', W') array."""
        # array[:, :, k].T is a contiguous (W, H) image; swapping the matrix's input axes makes
        # the warp read it transposed and still write an upright (H', W') plane.
        matrix = self._pixel_matrix()[:, [1, 0, 2]]
        planes = np.empty((array.shape[2], self.output_height, self.output_width), array.dtype)
        for k in range(array.shape[2]):
            self._warp(array[:, :, k].T, cv2.INTER_NEAREST, matrix, dst=planes[k])
        return planes.transpose(1, 2, 0)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """(N, 2) float (x, y)."""
        return coords * [self.scale_x, self.scale_y] + [self.shift_x, self.shift_y]


def _center_range(size: int, margin: int) -> tuple[int, int]:
    """Where a crop centre may fall on an axis of ``size`` px: at least ``margin`` from both edges,
    the margin halved until that leaves room (the authors' border rule)."""
    while margin > 0 and size <= 2 * margin:
        margin //= 2
    return margin, size - margin


class RandomSquareCrop(T.Augmentation):
    """The paper's training crop: a square of side max(H, W) x s (s drawn from ``scales``), centred
    at a random point at least ``center_margin`` px from the image edges (or at the image centre
    when ``random_center`` is False, the authors' validation letterbox), resized to
    ``output_size`` x ``output_size``; the aspect ratio is kept, areas outside the image are 0."""

    def __init__(self, output_size: int, scales=(1.0,), center_margin: int = 0, random_center=True):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> ScaleShiftTransform:
        height, width = image.shape[:2]
        side = max(height, width) * float(np.random.choice(self.scales))
        if self.random_center:
            center_x = self._rand_range(*_center_range(width, self.center_margin))
            center_y = self._rand_range(*_center_range(height, self.center_margin))
        else:
            center_x, center_y = width / 2, height / 2
        scale = self.output_size / side
        shift_x = self.output_size / 2 - scale * center_x
        shift_y = self.output_size / 2 - scale * center_y
        return ScaleShiftTransform(
            scale, scale, shift_x, shift_y, self.output_size, self.output_size
        )


class ResizeToInput(T.Augmentation):
    """Test-time resize: "fit" scales the longest side to ``size`` keeping the aspect ratio,
    "stretch" scales both sides to ``size`` (the authors' test resize); a ``scale`` > 0 scales
    both sides by it instead."""

    def __init__(self, size: int, mode: str = "fit", scale: float = 0.0):
        super().__init__()
        if mode not in TEST_RESIZE_MODES:
            raise ValueError(f"INPUT.TEST_RESIZE must be one of {TEST_RESIZE_MODES}, got {mode!r}")
        self._init(locals())

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        """Size of the resized (height, width) image."""
        if self.scale > 0 or self.mode == "fit":
            factor = self.scale if self.scale > 0 else self.size / max(height, width)
            return max(1, round(height * factor)), max(1, round(width * factor))
        return self.size, self.size

    def get_transform(self, image: np.ndarray) -> ScaleShiftTransform:
        height, width = image.shape[:2]
        output_height, output_width = self.output_hw(height, width)
        # Per-axis scales map the whole image onto the whole output grid, rounding included.
        return ScaleShiftTransform(
            output_width / width, output_height / height, 0.0, 0.0, output_height, output_width
        )
