"""The training hooks the project adds to detectron2's: the divergence check."""

from types import SimpleNamespace

import pytest
from detectron2.utils.events import EventStorage

from objguided_d2.engine.trainer import DivergenceCheck


def run_losses(losses, ratio=1000.0):
    """Feed total losses to a DivergenceCheck as detectron2's trainer would, one per step."""
    check = DivergenceCheck(ratio)
    with EventStorage() as storage:
        check.trainer = SimpleNamespace(storage=storage, iter=0)
        for iteration, loss in enumerate(losses):
            check.trainer.iter = iteration
            storage.iter = iteration
            storage.put_scalar("total_loss", loss)
            check.after_step()


def test_spikes_below_the_ratio_pass_and_an_explosion_stops_at_its_iteration():
    run_losses([5.0, 40.0, 4999.0, 0.1])  # below 1000 x 5 throughout
    with pytest.raises(FloatingPointError, match="diverged at iteration 3: the total loss is 5e"):
        run_losses([5.0, 6.0, 4.0, 5001.0, 2.0])
    with pytest.raises(FloatingPointError, match="over 10 times its 2"):
        run_losses([2.0, 21.0], ratio=10.0)
