"""objguided_d2: object-guided instance segmentation (Yi et al., TMI 2021) for detectron2.

``import objguided_d2`` registers the plugin's modules in detectron2's registries and its
datasets in ``DatasetCatalog``; ``add_objguided_config(cfg)`` adds its config keys.
"""

__version__ = "0.1.0"

# data and modeling are imported for their side effect: registration on import.
from . import data, modeling  # noqa: F401
from .config import add_objguided_config

__all__ = ["add_objguided_config", "__version__"]
