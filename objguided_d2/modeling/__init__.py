"""The object-guided model's modules; importing them registers them in detectron2's registries."""

from . import backbone, center_head, meta_arch, point_sampling, roi_geometry, roi_heads  # noqa: F401
