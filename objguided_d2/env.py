"""Environment report: ``python -m objguided_d2.env``.

Prints the versions of the stack, how detectron2 was installed, the device, whether detectron2's
compiled extension is present, and the names this plugin registers.
"""

import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path

from tabulate import tabulate

# The registries the plugin adds to, and the names it puts there.
_REGISTRIES = {
    "META_ARCH_REGISTRY": "detectron2.modeling.meta_arch.build",
    "BACKBONE_REGISTRY": "detectron2.modeling.backbone.build",
    "PROPOSAL_GENERATOR_REGISTRY": "detectron2.modeling.proposal_generator.build",
    "ROI_HEADS_REGISTRY": "detectron2.modeling.roi_heads.roi_heads",
}


def detectron2_route() -> str:
    """How detectron2 got here: the note `make setup` leaves beside the environment, else the
    distribution that provides it, else its source tree."""
    import detectron2

    package_dir = Path(detectron2.__file__).parent
    note = package_dir.parents[3] / "detectron2-route.txt"  # <env>/lib/pythonX.Y/site-packages/
    if note.is_file():
        return note.read_text().strip()
    for dist in ("detectron2", "sal-detectron2"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"source tree at {package_dir}"


def registered_names() -> dict:
    """{registry name: sorted names whose objects live in this package}."""
    import objguided_d2  # noqa: F401  (registers)

    names = {}
    for registry_name, module_name in _REGISTRIES.items():
        registry = getattr(importlib.import_module(module_name), registry_name)
        names[registry_name] = sorted(
            name for name, obj in registry if obj.__module__.startswith("objguided_d2.")
        )
    from detectron2.data import DatasetCatalog

    names["DatasetCatalog"] = sorted(
        name
        for name in DatasetCatalog.list()
        if name.split("_")[0] in {"dsb2018", "plant", "neural", "synthetic"}
    )
    return names


def collect_env() -> list:
    """Rows (name, value) of the environment report."""
    import detectron2
    import torch
    import torchvision

    import objguided_d2

    has_c_ext = importlib.util.find_spec("detectron2._C") is not None
    if has_c_ext:
        try:
            importlib.import_module("detectron2._C")
        except ImportError as err:
            has_c_ext = f"present but not loadable ({err.__class__.__name__})"
    cuda = torch.cuda.is_available()
    rows = [
        ("python", f"{sys.version.split()[0]} ({sys.executable})"),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("detectron2", detectron2.__version__),
        ("detectron2 install route", detectron2_route()),
        ("detectron2 C extension (_C)", has_c_ext),
        ("objguided_d2", f"{objguided_d2.__version__} ({Path(objguided_d2.__file__).parent})"),
        ("device", torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"),
        ("CUDA available", cuda),
    ]
    for registry, names in registered_names().items():
        rows.append((registry, ", ".join(names) or "-"))
    return rows


def main() -> None:
    print(tabulate(collect_env(), tablefmt="simple"))


if __name__ == "__main__":
    main()
