"""Loading a trained model to predict or evaluate with: the checkpoint must fit the model.

detectron2's checkpointer loads whatever matches and only logs the rest, which is right for
initialising a training from ImageNet weights and wrong for inference: a checkpoint of another
architecture or size then runs silently on partly random weights.
"""

import logging
import os

from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

__all__ = ["WeightsMismatchError", "load_trained_weights", "load_trained_weights_or_exit"]

logger = logging.getLogger(__name__)

# Parameter names quoted in an error message.
_EXAMPLES = 3


class WeightsMismatchError(ValueError):
    """A checkpoint (or none) that cannot give the model its trained weights."""


class _RecordingCheckpointer(DetectionCheckpointer):
    """A checkpointer that keeps what its last load left incompatible."""

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_trained_weights(model: nn.Module, path: str, *, allow_mismatch: bool = False) -> None:
    """Load the checkpoint at ``path`` into ``model`` for inference.

    Raises:
        WeightsMismatchError: when ``path`` is empty, or when parameters or buffers of the model
            are missing from the checkpoint or have another shape there; with ``allow_mismatch``
            the mismatch is a warning and the model keeps its own values for those.
        FileNotFoundError: when there is no file at ``path``.
    """
    if not path:
        raise WeightsMismatchError(
            "No weights given: predicting or evaluating needs a trained checkpoint "
            "(--weights, or MODEL.WEIGHTS for tools/train_net.py --eval-only)"
        )
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    checkpointer = _RecordingCheckpointer(model)
    checkpointer.load(path)
    incompatible = checkpointer.incompatible
    reshaped = {key for key, _, _ in incompatible.incorrect_shapes}
    missing = [key for key in incompatible.missing_keys if key not in reshaped]
    if not missing and not reshaped:
        return
    total = len(model.state_dict())
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} of the model's {total} parameters and buffers are not in it "
            f"(e.g. {', '.join(missing[:_EXAMPLES])})"
        )
    if reshaped:
        key, in_checkpoint, in_model = incompatible.incorrect_shapes[0]
        problems.append(
            f"{len(reshaped)} have another shape there (e.g. {key}: {tuple(in_checkpoint)} in "
            f"the checkpoint, {tuple(in_model)} in the model)"
        )
    message = (
        f"The checkpoint {path} does not fit the model of this config: {'; '.join(problems)}. "
        "Use the config the checkpoint was trained with (its run's OUTPUT_DIR/config.yaml)"
    )
    if not allow_mismatch:
        raise WeightsMismatchError(message + ", or allow a partial load explicitly.")
    logger.warning(message + "; loaded anyway: those keep their initial values.")


def load_trained_weights_or_exit(
    model: nn.Module, path: str, *, allow_mismatch: bool = False
) -> None:
    """:func:`load_trained_weights` for command-line tools: exit with the reason in one sentence
    instead of a traceback."""
    try:
        load_trained_weights(model, path, allow_mismatch=allow_mismatch)
    except (WeightsMismatchError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None
