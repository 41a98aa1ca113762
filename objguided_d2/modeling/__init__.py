"""Modules registered in detectron2's registries."""
from . import backbone, center_head  # noqa: F401
from . import point_sampling, roi_geometry  # noqa: F401
from . import meta_arch, roi_heads  # noqa: F401
