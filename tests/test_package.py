"""The package installs, registers its names on import, and every shipped config merges."""

from pathlib import Path

import pytest
from detectron2.config import get_cfg

import objguided_d2
from objguided_d2 import add_objguided_config
from objguided_d2.env import registered_names

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_import_registers_the_plugin_names():
    names = registered_names()
    assert names["META_ARCH_REGISTRY"] == ["ObjGuidedSegmentor"]
    assert names["BACKBONE_REGISTRY"] == ["build_objguided_resnet_backbone"]
    assert names["PROPOSAL_GENERATOR_REGISTRY"] == ["CenterKeypointProposalGenerator"]
    assert names["ROI_HEADS_REGISTRY"] == ["ObjGuidedROIHeads"]


def test_add_objguided_config_adds_one_node_and_is_idempotent():
    cfg = get_cfg()
    before = set(cfg.MODEL.keys())
    add_objguided_config(cfg)
    add_objguided_config(cfg)
    assert "OBJGUIDED" in set(cfg.MODEL.keys()) - before
    assert cfg.MODEL.OBJGUIDED.REFINE.OVERSAMPLE_RATIO == 3.0


def test_every_config_default_has_a_comment():
    """Each key set in config.py carries a comment, on its line or on the line above."""
    lines = Path(objguided_d2.config.__file__).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("_C.") and "CN()" not in line:
            assert "#" in line or lines[i - 1].strip().startswith("#"), line


def test_configs_exist():
    assert CONFIGS, f"no YAML under {CONFIG_DIR}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_merges(path):
    cfg = get_cfg()
    add_objguided_config(cfg)
    cfg.merge_from_file(str(path))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_base_stays_inside_the_repo(path):
    import yaml

    base = yaml.safe_load(path.read_text()).get("_BASE_")
    if base is not None:
        resolved = (path.parent / base).resolve()
        assert resolved.is_file() and CONFIG_DIR in resolved.parents, f"{path}: _BASE_ {base}"
