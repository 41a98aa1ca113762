"""The baselines' heads: PointRend trains on a batch without an object, where detectron2's own
mask head raises, and on every other batch computes exactly detectron2's losses."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from helpers import CONFIG_DIR, ellipse_mask, instances_from_masks, render

from objguided_d2.engine import load_config

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 64


def _pointrend(mask_head: str):
    cfg = load_config(
        str(CONFIG_DIR / "compact" / "synthetic_neural_pointrend.yaml"),
        ["MODEL.DEVICE", "cpu", "MODEL.ROI_MASK_HEAD.NAME", mask_head],
    )
    torch.manual_seed(0)
    return build_model(cfg).train()


def _batch(num_objects: int) -> list[dict]:
    """Two images with ``num_objects`` ellipses each (none: crops without an object)."""
    batch = []
    for seed in range(2):
        masks = np.zeros((num_objects, SIZE, SIZE), bool)
        for i in range(num_objects):
            masks[i] = ellipse_mask((SIZE, SIZE), (16 + 30 * i, 20 + 20 * seed), (9, 6), 0.3 * i)
        image = render(masks, [200] * num_objects, seed)
        instances = instances_from_masks(masks)
        batch.append({"image": image, "instances": instances, "height": SIZE, "width": SIZE})
    return batch


def _losses(model, batch: list[dict]) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the same proposals' and points' sampling for both heads
    with EventStorage():  # detectron2's ROI heads log their sampling statistics
        return model(batch)


def test_detectron2s_pointrend_head_raises_on_a_batch_without_an_object():
    with pytest.raises(ValueError, match="non-empty"):
        _losses(_pointrend("PointRendMaskHead"), _batch(0))


def test_a_batch_without_an_object_trains_with_zero_mask_losses():
    model = _pointrend("EmptyBatchPointRendMaskHead")
    losses = _losses(model, _batch(0))
    assert losses["loss_mask"].item() == 0 and losses["loss_mask_point"].item() == 0
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    # The box classifier still learns that everything is background.
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_a_batch_with_objects_gets_detectron2s_losses():
    ours = _pointrend("EmptyBatchPointRendMaskHead")
    detectron2s = _pointrend("PointRendMaskHead")
    detectron2s.load_state_dict(ours.state_dict())
    batch = _batch(2)
    expected = _losses(detectron2s, batch)
    losses = _losses(ours, batch)
    assert losses.keys() == expected.keys()
    assert losses["loss_mask_point"] > 0
    for name, loss in losses.items():
        torch.testing.assert_close(loss, expected[name], msg=name)
