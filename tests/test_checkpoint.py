"""Checkpoints in the tools: inference weights (objguided_d2.engine.load_trained_weights,
tools/predict.py and tools/train_net.py --eval-only) that do not fit the model, or none, are refused
with one sentence unless a partial load is allowed explicitly; --eval-only without a test set and
--resume without a checkpoint say so."""

import logging

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from helpers import REPO, load_tool
from torch import nn

from objguided_d2.engine import WeightsMismatchError, load_config, load_trained_weights

SMALL = ["INPUT.IMAGE_SIZE", "64"]


def saved(model: nn.Module, folder, name="weights") -> str:
    DetectionCheckpointer(model, save_dir=str(folder)).save(name)
    return str(folder / f"{name}.pth")


def test_a_fitting_checkpoint_loads_every_weight(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    target = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    load_trained_weights(target, saved(source, tmp_path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_missing_and_reshaped_parameters_are_refused_naming_them(tmp_path):
    path = saved(nn.Sequential(nn.Linear(2, 3)), tmp_path)
    with pytest.raises(WeightsMismatchError) as err:
        load_trained_weights(nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1)), path)
    message = str(err.value)
    assert path in message
    assert (
        "2 of the model's 4 parameters and buffers are not in it (e.g. 1.weight, 1.bias)" in message
    )
    assert "2 have another shape there (e.g. 0.weight: (3, 2) in the checkpoint, (4, 2)" in message


def test_a_mismatch_allowed_explicitly_loads_what_fits_with_a_warning(tmp_path, caplog):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(2, 3))
    target = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with caplog.at_level(logging.WARNING, logger="objguided_d2.engine.checkpoint"):
        load_trained_weights(target, saved(source, tmp_path), allow_mismatch=True)
    assert "loaded anyway" in caplog.text
    assert torch.equal(target[0].weight, source[0].weight)


def test_no_weights_and_a_missing_file_are_errors(tmp_path):
    with pytest.raises(WeightsMismatchError, match="No weights given"):
        load_trained_weights(nn.Linear(1, 1), "")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_trained_weights(nn.Linear(1, 1), str(tmp_path / "nowhere.pth"))


def test_predict_refuses_another_architectures_weights_and_no_weights(tmp_path):
    """ObjGuided weights with a Mask R-CNN config, and --weights "": exit with the reason."""
    predict = load_tool("predict")
    objguided = REPO / "configs/compact/synthetic_neural_objguided.yaml"
    weights = saved(build_model(load_config(str(objguided), SMALL)), tmp_path)
    image = tmp_path / "cells.png"
    cv2.imwrite(str(image), np.full((40, 50), 128, dtype=np.uint8))
    mask_rcnn = REPO / "configs/compact/synthetic_neural_mask_rcnn.yaml"
    common = ["--input", str(image), "--output", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(SystemExit, match="does not fit the model of this config"):
        predict.main(["--config-file", str(mask_rcnn), "--weights", weights, *common, *SMALL])
    # several processes: checked once before any starts
    with pytest.raises(SystemExit, match="does not fit the model of this config"):
        predict.main(
            [
                "--config-file",
                str(mask_rcnn),
                "--weights",
                weights,
                "--num-gpus",
                "2",
                *common,
                *SMALL,
            ]
        )
    with pytest.raises(SystemExit, match="No weights given"):
        predict.main(["--config-file", str(objguided), "--weights", "", *common, *SMALL])
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_eval_only_without_weights_is_an_error(tmp_path):
    train_net = load_tool("train_net")
    config = REPO / "configs/compact/synthetic_neural_mask_rcnn.yaml"
    args = train_net.argument_parser().parse_args(
        ["--config-file", str(config), "--eval-only", "OUTPUT_DIR", str(tmp_path), *SMALL]
    )
    with pytest.raises(SystemExit, match="No weights given"):
        train_net.main(args)


def test_eval_only_without_a_test_dataset_is_an_error(tmp_path):
    train_net = load_tool("train_net")
    config = REPO / "configs/compact/dsb2018_mini_objguided.yaml"
    args = train_net.argument_parser().parse_args(
        ["--config-file", str(config), "--eval-only", "DATASETS.TEST", "()"]
        + ["OUTPUT_DIR", str(tmp_path), *SMALL]
    )
    with pytest.raises(SystemExit, match="--eval-only needs a dataset to evaluate"):
        train_net.main(args)


def test_resume_without_a_checkpoint_warns_that_training_starts_afresh(
    tmp_path, monkeypatch, caplog
):
    train_net = load_tool("train_net")
    monkeypatch.setattr(train_net.Trainer, "train", lambda self: {})
    config = REPO / "configs/compact/dsb2018_mini_objguided.yaml"
    args = train_net.argument_parser().parse_args(
        ["--config-file", str(config), "--resume", "OUTPUT_DIR", str(tmp_path / "empty"), *SMALL]
    )
    with caplog.at_level("WARNING", logger="objguided_d2.train_net"):
        train_net.main(args)
    assert f"--resume: no checkpoint in {tmp_path / 'empty'}" in caplog.text
    assert "training starts from scratch" in caplog.text
