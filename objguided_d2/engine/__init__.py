"""Training and evaluation engine shared by ObjGuided, Mask R-CNN and PointRend."""

from .checkpoint import WeightsMismatchError, load_trained_weights, load_trained_weights_or_exit
from .trainer import (
    EVALUATION_FILE,
    Trainer,
    architecture_name,
    create_ddp_model,
    evaluation_dir,
    format_results_table,
    leave_process_group,
    load_config,
    setup,
    share_cpu_cores,
)

__all__ = [
    "EVALUATION_FILE",
    "Trainer",
    "WeightsMismatchError",
    "architecture_name",
    "create_ddp_model",
    "evaluation_dir",
    "format_results_table",
    "leave_process_group",
    "load_trained_weights",
    "load_trained_weights_or_exit",
    "load_config",
    "setup",
    "share_cpu_cores",
]
