"""objguided_d2: object-guided instance segmentation (Yi et al., IEEE TMI 2021) for detectron2.

``import objguided_d2`` registers the plugin's modules in detectron2's registries and its datasets in
``DatasetCatalog``; ``add_objguided_config(cfg)`` adds its config keys.
"""

__version__ = "0.1.0"

from .config import add_objguided_config

# Imported for their side effect: registration in detectron2's registries / DatasetCatalog.
from . import modeling  # noqa: F401, E402
from . import data  # noqa: F401, E402

__all__ = ["add_objguided_config", "__version__"]
