"""The plugin's config keys (added once, each default commented), shipped configs (inherit only from
configs inside the repository, build their models, keep the three architectures on equal terms),
and the engine's config helpers (optimizer, DDP wrapper, device fallback, results table)."""

from pathlib import Path

import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from helpers import ARCHITECTURES, CONFIG_DIR

import objguided_d2.config
from objguided_d2 import add_objguided_config
from objguided_d2.engine import (
    Trainer,
    architecture_name,
    create_ddp_model,
    format_results_table,
    load_config,
)

CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
# The ablations differ from their dataset's config in MODEL.OBJGUIDED.REFINE only (checked below),
# so building one model per dataset's config covers them.
BUILT_CONFIGS = [path for path in CONFIGS if path.parent.name != "ablations"]
PAPER_DATASETS = ("dsb2018", "plant", "neural")
# The paper's Table I "W.O. Refine" and Table II rows: (enabled, sampling, k, beta); the default
# configs are Table II's Moderately Biased (biased, 3, 0.75).
PAPER_ABLATIONS = {
    "no_refine": (False, "biased", 3.0, 0.75),
    "uniform_small": (True, "uniform", 1.0, 1.0),
    "biased_small": (True, "biased", 1.0, 0.5),
    "uniform": (True, "uniform", 3.0, 3.0),
    "mildly_biased": (True, "biased", 3.0, 2.0),
    "slightly_biased": (True, "biased", 3.0, 1.0),
    "greatly_biased": (True, "biased", 5.0, 0.75),
    "heavily_biased": (True, "biased", 10.0, 0.75),
}
IMAGENET_R50 = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"


def _config(name: str, *opts: str):
    return load_config(str(CONFIG_DIR / name), ["MODEL.DEVICE", "cpu", *opts])


def test_add_objguided_config_adds_the_objguided_node_and_is_idempotent():
    once, twice = get_cfg(), get_cfg()
    before = set(once.MODEL.keys())
    add_objguided_config(once)
    add_objguided_config(twice)
    add_objguided_config(twice)
    assert "OBJGUIDED" in set(once.MODEL.keys()) - before
    assert once.MODEL.OBJGUIDED.REFINE.OVERSAMPLE_RATIO == 3.0
    assert twice == once


def test_every_config_default_has_a_comment():
    """Each key set in config.py carries a comment, on its line or on the line above."""
    lines = Path(objguided_d2.config.__file__).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("_C.") and "CN()" not in line:
            assert "#" in line or lines[i - 1].strip().startswith("#"), line


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("INPUT.IMAGE_SIZE", "0", "INPUT.IMAGE_SIZE is 0; expected a positive side"),
        (
            "INPUT.SQUARE_CROP.SCALES",
            "[]",
            r"INPUT.SQUARE_CROP.SCALES is \[\]; expected one or more",
        ),
        ("INPUT.TEST_RESIZE", "squash", "INPUT.TEST_RESIZE is 'squash'; expected 'fit' or"),
        ("MODEL.OBJGUIDED.MASK_THRESH_TEST", "1.5", "MASK_THRESH_TEST is 1.5; expected a prob"),
        ("MODEL.OBJGUIDED.CROPPED_OBJECTS", "all", "CROPPED_OBJECTS is 'all'; expected 'visible'"),
        ("MODEL.OBJGUIDED.MASK_CONFIDENCE_POWER", "0.0", "POWER is 0.0; expected a positive"),
        ("MODEL.OBJGUIDED.MASK_MATRIX_NMS_SIGMA", "-1.0", "SIGMA is -1.0; expected a sigma"),
        ("MODEL.OBJGUIDED.MASK_FLIP_AGREEMENT_POWER", "-1.0", "POWER is -1.0; expected an exp"),
    ],
)
def test_invalid_values_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        _config("compact/dsb2018_objguided.yaml", key, value)


def test_unknown_keys_are_refused_naming_them(tmp_path):
    # yacs: an AssertionError for a command-line key, a KeyError for a key in a file
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.OBJGUIDED.MASK_TRESH_TEST"):
        _config("compact/dsb2018_objguided.yaml", "MODEL.OBJGUIDED.MASK_TRESH_TEST", "0.3")
    config = tmp_path / "typo.yaml"
    config.write_text(
        f'_BASE_: "{CONFIG_DIR / "compact/dsb2018_objguided.yaml"}"\nSOLVER:\n  BASE_LRR: 0.1\n'
    )
    with pytest.raises(KeyError, match="Non-existent config key: SOLVER.BASE_LRR"):
        load_config(str(config))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_base_stays_inside_the_repo(path):
    base = yaml.safe_load(path.read_text()).get("_BASE_")
    if base is not None:
        resolved = (path.parent / base).resolve()
        assert resolved.is_file() and CONFIG_DIR in resolved.parents, f"{path}: _BASE_ {base}"


@pytest.mark.parametrize("path", BUILT_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_builds_its_model_on_cpu(path):
    # Nothing is downloaded: ImageNet weights are named in the configs, not loaded by build_model.
    cfg = load_config(str(path), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert cfg.INPUT.MASK_FORMAT == "bitmask"


@pytest.mark.parametrize("dataset", PAPER_DATASETS)
def test_ablation_configs_are_the_papers_refinement_rows(dataset):
    base = _config(f"{dataset}_objguided.yaml")
    assert _refine(base) == (True, "biased", 3.0, 0.75)
    shipped = sorted(CONFIG_DIR.glob(f"ablations/{dataset}_objguided_*.yaml"))
    assert [p.stem.removeprefix(f"{dataset}_objguided_") for p in shipped] == sorted(
        PAPER_ABLATIONS
    )
    for path in shipped:
        cfg = load_config(str(path), ["MODEL.DEVICE", "cpu"])
        assert _refine(cfg) == PAPER_ABLATIONS[path.stem.removeprefix(f"{dataset}_objguided_")]
        assert cfg.OUTPUT_DIR == f"output/ablations/{path.stem}"
        # everything else is the dataset's config
        cfg.defrost()
        cfg.MODEL.OBJGUIDED.REFINE, cfg.OUTPUT_DIR = base.MODEL.OBJGUIDED.REFINE, base.OUTPUT_DIR
        assert cfg == base, path.name


def _refine(cfg) -> tuple:
    refine = cfg.MODEL.OBJGUIDED.REFINE
    return (refine.ENABLED, refine.SAMPLING, refine.OVERSAMPLE_RATIO, refine.IMPORTANCE_RATIO)


@pytest.mark.parametrize("dataset", PAPER_DATASETS)
def test_paper_setting_configs_share_data_input_and_schedule_length(dataset):
    cfgs = {arch: _config(f"{dataset}_{arch}.yaml") for arch in ARCHITECTURES}
    for arch, cfg in cfgs.items():
        assert architecture_name(cfg) == ARCHITECTURES[arch]
        assert cfg.DATASETS.TRAIN == (f"{dataset}_train",)
        assert cfg.DATASETS.TEST == (f"{dataset}_test",)
        assert cfg.INPUT.IMAGE_SIZE == 512
        assert cfg.MODEL.WEIGHTS == IMAGENET_R50
        assert cfg.MODEL.RESNETS.DEPTH == 50
        assert cfg.OUTPUT_DIR == f"output/{dataset}_{arch}"
    for key in ("SOLVER.MAX_ITER", "SOLVER.IMS_PER_BATCH", "TEST.DETECTIONS_PER_IMAGE"):
        section, name = key.split(".")
        assert len({cfg[section][name] for cfg in cfgs.values()}) == 1, key


@pytest.mark.parametrize("dataset", ("synthetic_neural", "dsb2018"))
def test_compact_configs_share_data_input_schedule_and_mask_rois(dataset):
    variants = {**ARCHITECTURES, "objguided_fast": "ObjGuided"}
    cfgs = {arch: _config(f"compact/{dataset}_{arch}.yaml") for arch in variants}
    for arch, cfg in cfgs.items():
        assert architecture_name(cfg) == variants[arch]
        assert cfg.DATASETS.TRAIN == (f"{dataset}_train",)
        assert cfg.DATASETS.TEST == (f"{dataset}_val",)
        assert cfg.MODEL.WEIGHTS == ""
        assert (cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.NORM) == (18, "BN")
        assert cfg.INPUT.IMAGE_SIZE == 256
        assert cfg.OUTPUT_DIR == f"output/compact/{dataset}_{arch}"
    for key in ("SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.IMS_PER_BATCH"):
        section, name = key.split(".")
        assert len({str(cfg[section][name]) for cfg in cfgs.values()}) == 1, key
    # The recipe's scale (crops at the scale of 512-px images, tested at 512), but for ObjGuided on
    # the neural-like cells, which trains and tests at the images' own scale (640 px), the better
    # of the crop-scale trials that each architecture got (docs/accuracy.md).
    recipe = cfgs["mask_rcnn"].INPUT
    for arch, cfg in cfgs.items():
        if dataset == "synthetic_neural" and arch.startswith("objguided"):
            assert cfg.INPUT.TEST_IMAGE_SIZE == 640
            own_scale = [scale * 512 / 640 for scale in recipe.SQUARE_CROP.SCALES]
            assert cfg.INPUT.SQUARE_CROP.SCALES == pytest.approx(own_scale)
        else:
            assert cfg.INPUT.TEST_IMAGE_SIZE == 512
            assert str(cfg.INPUT.SQUARE_CROP) == str(recipe.SQUARE_CROP)
    # As many mask ROIs per image for every architecture.
    positive_rois = {
        int(cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE * cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION)
        for arch, cfg in cfgs.items()
        if not arch.startswith("objguided")
    }
    assert positive_rois == {cfgs["objguided"].MODEL.OBJGUIDED.MAX_TRAIN_ROIS_PER_IMAGE}
    # Random weights need trainable norms everywhere (frozen BN of random weights diverges) and
    # a lower rate than detectron2's 0.02.
    for arch in ("mask_rcnn", "pointrend"):
        assert (cfgs[arch].MODEL.FPN.NORM, cfgs[arch].MODEL.ROI_BOX_HEAD.NORM) == ("BN", "BN")
        assert cfgs[arch].SOLVER.BASE_LR < 0.02
    # AP is computed on equally low-scored detections.
    assert cfgs["objguided"].MODEL.OBJGUIDED.SCORE_THRESH_TEST == pytest.approx(
        cfgs["mask_rcnn"].MODEL.ROI_HEADS.SCORE_THRESH_TEST
    )


def test_make_compare_trains_the_three_architectures_at_the_demos_budget():
    cfgs = {arch: _config(f"compact/dsb2018_mini_{arch}.yaml") for arch in ARCHITECTURES}
    for arch, cfg in cfgs.items():
        assert architecture_name(cfg) == ARCHITECTURES[arch]
        assert cfg.DATASETS.TRAIN == ("dsb2018_mini_train",)
        assert cfg.DATASETS.TEST == ("dsb2018_mini_val",)
        assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
    for key in (
        "INPUT.SQUARE_CROP",
        "INPUT.TEST_IMAGE_SIZE",
        "SOLVER.MAX_ITER",
        "SOLVER.STEPS",
        "SOLVER.IMS_PER_BATCH",
    ):
        section, name = key.split(".")
        assert len({str(cfg[section][name]) for cfg in cfgs.values()}) == 1, key


def test_objguided_trains_as_the_authors_baselines_with_detectron2s_recipe():
    objguided, mask_rcnn = _config("neural_objguided.yaml"), _config("neural_mask_rcnn.yaml")
    assert objguided.SOLVER.OPTIMIZER == "ADAM"
    assert objguided.SOLVER.BASE_LR == pytest.approx(1.25e-4)
    assert objguided.SOLVER.WEIGHT_DECAY == 0.0
    assert objguided.SOLVER.IMS_PER_BATCH == 8
    assert (objguided.SOLVER.STEPS, objguided.SOLVER.WARMUP_ITERS) == ((), 0)  # constant LR
    assert mask_rcnn.SOLVER.OPTIMIZER == "SGD"
    assert mask_rcnn.MODEL.RESNETS.NORM == "FrozenBN"
    # The 1x shape at ObjGuided's length: decays at 2/3 and 8/9 of the schedule.
    assert mask_rcnn.SOLVER.STEPS == (3200, 4300) and mask_rcnn.SOLVER.MAX_ITER == 4800


def test_pointrend_configs_use_the_point_head_on_bitmasks():
    cfg = _config("plant_pointrend.yaml")
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "EmptyBatchPointRendMaskHead"
    assert cfg.MODEL.ROI_MASK_HEAD.POINT_HEAD_ON
    assert cfg.MODEL.POINT_HEAD.NUM_CLASSES == cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1


@pytest.mark.parametrize(
    "name, optimizer_class",
    [("SGD", torch.optim.SGD), ("ADAM", torch.optim.Adam), ("ADAMW", torch.optim.AdamW)],
)
def test_build_optimizer_follows_solver_optimizer(name, optimizer_class):
    cfg = _config("compact/synthetic_neural_objguided.yaml", "SOLVER.OPTIMIZER", name)
    cfg.defrost()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY = 0.003, 0.01
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    optimizer = Trainer.build_optimizer(cfg, model)
    assert type(optimizer) is optimizer_class
    assert {group["lr"] for group in optimizer.param_groups} == {0.003}
    # detectron2's parameter groups: norm parameters get WEIGHT_DECAY_NORM (0), others 0.01.
    decay = {tuple(p.shape): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay == {(2, 1, 3, 3): 0.01, (2,): 0.0}


def test_build_optimizer_names_the_key_of_an_unknown_optimizer():
    cfg = _config("compact/synthetic_neural_objguided.yaml", "SOLVER.OPTIMIZER", "RMSPROP")
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        Trainer.build_optimizer(cfg, torch.nn.Linear(2, 2))


def test_create_ddp_model_leaves_a_single_process_model_unwrapped():
    model = torch.nn.Linear(2, 2)
    assert create_ddp_model(model, broadcast_buffers=False) is model


def test_load_config_runs_a_cuda_config_on_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(str(CONFIG_DIR / "neural_objguided.yaml"), ["MODEL.DEVICE", "cuda"])
    assert cfg.MODEL.DEVICE == "cpu"
    assert cfg.is_frozen()


def test_results_table_lists_each_metric_once_without_per_class_entries():
    results = {"segm": {"AP": 12.5, "AP-cell": 12.5}, "bio": {"AJI": 50.0, "PQ": 0.25}}
    assert format_results_table(results).splitlines() == [
        "| task   | metric   |   value |",
        "|--------|----------|---------|",
        "| segm   | AP       |   12.5  |",
        "| bio    | AJI      |   50    |",
        "|        | PQ       |    0.25 |",
    ]
