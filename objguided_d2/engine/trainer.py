"""detectron2's ``DefaultTrainer`` for every architecture of the project, and its config set-up.

ObjGuided, Mask R-CNN and PointRend train and test through the same :class:`Trainer`: the same
dataset mapper (the paper's augmentations), the same optimizer choice (``SOLVER.OPTIMIZER``) and
the same evaluators (COCO, the paper's AP, biology metrics), so their numbers compare.
"""

import inspect
import itertools
import json
import logging
import math
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    DatasetCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, default_setup
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import DatasetEvaluators
from detectron2.solver import build_optimizer, get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from tabulate import tabulate
from torch.nn.parallel import DistributedDataParallel

from ..config import add_objguided_config, check_config
from ..data import (
    BioDatasetMapper,
    build_bio_augmentations,
    median_object_size,
    register_dataset_specs,
)
from ..evaluation import BiologyEvaluator, PaperAPEvaluator, WindowCOCOEvaluator

__all__ = [
    "EVALUATION_FILE",
    "Trainer",
    "architecture_name",
    "create_ddp_model",
    "evaluation_dir",
    "format_results_table",
    "leave_process_group",
    "load_config",
    "setup",
]

logger = logging.getLogger(__name__)

# Each process keeps its own batch-norm statistics between steps, as in detectron2's trainer
# (``broadcast_buffers=False``); torch 2.13 deprecates that flag for ``forward_sync_buffers``.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)

# Name of the JSON that :meth:`Trainer.test` writes for each test dataset, in
# OUTPUT_DIR/inference/<dataset>/ (the evaluators' own outputs sit beside it).
EVALUATION_FILE = "evaluation.json"

# torch optimizers selected by SOLVER.OPTIMIZER, besides detectron2's SGD.
_ADAPTIVE_OPTIMIZERS = {"ADAM": torch.optim.Adam, "ADAMW": torch.optim.AdamW}


def load_config(config_file: str, opts: list[str] | None = None) -> CfgNode:
    """A frozen config of the project: detectron2's defaults, the plugin's keys, the file, ``opts``,
    its values checked (:func:`objguided_d2.config.check_config`) and the datasets it lists in
    DATASETS.REGISTER registered.

    A config asking for CUDA on a machine without it runs on the CPU (with a warning), so that
    every shipped config also works on a laptop.
    """
    cfg = get_cfg()
    add_objguided_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts or [])
    check_config(cfg)
    register_dataset_specs(cfg.DATASETS.REGISTER)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(
            "MODEL.DEVICE is %s but CUDA is not available: using the CPU", cfg.MODEL.DEVICE
        )
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def setup(args) -> CfgNode:
    """Config and logging of a ``tools/train_net.py`` run (``default_argument_parser`` arguments).

    A training run with ``INPUT.OBJECT_SIZE`` 0 measures it on its training sets. detectron2's
    ``default_setup`` logs the environment and writes ``OUTPUT_DIR/config.yaml``. Several
    processes training on one machine's CPUs split its cores between them.
    """
    cfg = load_config(args.config_file, args.opts)
    if not args.eval_only and cfg.INPUT.OBJECT_SIZE == 0 and cfg.DATASETS.TRAIN:
        records = itertools.chain.from_iterable(DatasetCatalog.get(n) for n in cfg.DATASETS.TRAIN)
        (resize,) = build_bio_augmentations(cfg, is_train=False)
        cfg.defrost()
        cfg.INPUT.OBJECT_SIZE = round(median_object_size(records, resize), 2)
        cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="objguided_d2")
    share_cpu_cores(cfg.MODEL.DEVICE)
    return cfg


def share_cpu_cores(device: str) -> None:
    """Give each of several processes on one machine's CPUs its share of the cores (nothing on a
    GPU or in a single process): oversubscribed OpenMP threads slow them down by an order of
    magnitude."""
    if device == "cpu" and comm.get_local_size() > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))


def architecture_name(cfg: CfgNode) -> str:
    """Short method name of a config: "ObjGuided", "PointRend", "Mask R-CNN" or the meta-arch."""
    if cfg.MODEL.META_ARCHITECTURE == "ObjGuidedSegmentor":
        return "ObjGuided"
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.MASK_ON:
        return "PointRend" if "PointRend" in cfg.MODEL.ROI_MASK_HEAD.NAME else "Mask R-CNN"
    return cfg.MODEL.META_ARCHITECTURE


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """``DistributedDataParallel`` when there are several processes, also for CPU models.

    detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which PyTorch
    rejects for a module on the CPU (multi-process Gloo training); a CPU module gets ``None``.
    """
    if comm.get_world_size() == 1:
        return model
    on_gpu = next(model.parameters()).device.type == "cuda"
    device_ids = [comm.get_local_rank()] if on_gpu else None
    return DistributedDataParallel(model, device_ids=device_ids, **kwargs)


def leave_process_group() -> None:
    """Wait for every process, then destroy the process groups (nothing without one).

    For the end of a function run by detectron2's ``launch``, which leaves the groups alive: a
    process that exits while Gloo's threads still run can abort (SIGABRT, "terminate called
    without an active exception") in their teardown, and ``launch`` then fails after the work is
    done. A group's threads stop only when its last reference goes, and detectron2's ``comm``
    keeps two: the local group and the cached global Gloo group.
    """
    if comm.get_world_size() > 1:
        comm.synchronize()
        torch.distributed.destroy_process_group()
        comm._LOCAL_PROCESS_GROUP = None
        comm._get_global_gloo_group.cache_clear()


def format_results_table(results: dict) -> str:
    """``{task: {metric: value}}`` as a text table; per-category entries (``AP-<class>``) left out,
    as detectron2's ``print_csv_format`` does."""
    rows = []
    for task, metrics in results.items():
        shown = [(name, value) for name, value in metrics.items() if "-" not in name]
        for i, (name, value) in enumerate(shown):
            rows.append((task if i == 0 else "", name, f"{value:.4f}"))
    return tabulate(rows, headers=["task", "metric", "value"], tablefmt="github")


class DivergenceCheck(HookBase):
    """Stops training whose total loss exceeds ``ratio`` times its value at the run's first
    iteration, before any later hook (the checkpointer) runs for that iteration.

    detectron2 logs the total loss on the main process only, which decides for all processes.
    """

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.reference = None

    def after_step(self):
        diverged = None
        if comm.is_main_process():
            loss = self.trainer.storage.history("total_loss").latest()
            if self.reference is None:
                self.reference = loss
            elif loss > self.ratio * self.reference:
                diverged = (
                    f"Training diverged at iteration {self.trainer.iter}: the total loss is "
                    f"{loss:.3g}, over {self.ratio:g} times its {self.reference:.3g} at the "
                    "run's first iteration (SOLVER.DIVERGENCE_RATIO). Lower SOLVER.BASE_LR or "
                    "clip gradients (SOLVER.CLIP_GRADIENTS); no final checkpoint was written."
                )
        if comm.get_world_size() > 1:
            diverged = next((d for d in comm.all_gather(diverged) if d), None)
        if diverged:
            raise FloatingPointError(diverged)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with the project's data pipeline, optimizers, evaluators and a DDP
    wrapper that also runs on CPUs.

    Everything else (hooks, checkpointing and ``resume_or_load``, periodic evaluation, the
    console / JSON / TensorBoard writers in OUTPUT_DIR) is detectron2's, plus a
    :class:`DivergenceCheck`.
    """

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__ with the model wrapped by this module's create_ddp_model: the
        # stock one cannot wrap a CPU model. Kept step for step otherwise.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, **_NO_FORWARD_BUFFER_SYNC)
        trainer_class = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_class(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self) -> list[HookBase]:
        """detectron2's hooks, after a :class:`DivergenceCheck` (SOLVER.DIVERGENCE_RATIO)."""
        hooks = super().build_hooks()
        if self.cfg.SOLVER.DIVERGENCE_RATIO > 0:
            hooks.insert(0, DivergenceCheck(self.cfg.SOLVER.DIVERGENCE_RATIO))
        return hooks

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        """detectron2's SGD, or Adam / AdamW on the same parameter groups (SOLVER.OPTIMIZER)."""
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name == "SGD":
            return build_optimizer(cfg, model)
        if name not in _ADAPTIVE_OPTIMIZERS:
            raise ValueError(
                f"SOLVER.OPTIMIZER must be one of SGD, {', '.join(_ADAPTIVE_OPTIMIZERS)}; "
                f"got {cfg.SOLVER.OPTIMIZER!r}"
            )
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        optimizer_class = maybe_add_gradient_clipping(cfg, _ADAPTIVE_OPTIMIZERS[name])
        return optimizer_class(params, lr=cfg.SOLVER.BASE_LR)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_detection_train_loader(cfg, mapper=BioDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=BioDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        """COCO AP (segm and bbox), the paper's AP and the biology metrics (TEST.BIO_SCORE_THRESH,
        TEST.PAPER_AP_BOX_SOURCE), in one pass.

        Biology images hold hundreds of objects, so COCO counts up to TEST.DETECTIONS_PER_IMAGE
        detections per image instead of its usual 100. detectron2's compiled fast COCO evaluation
        is not needed: pycocotools' reference code runs.
        """
        output_folder = output_folder or evaluation_dir(cfg, dataset_name)
        return DatasetEvaluators(
            [
                WindowCOCOEvaluator(
                    dataset_name,
                    tasks=("bbox", "segm"),
                    output_dir=output_folder,
                    max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
                    use_fast_impl=False,
                    # The ground truth is converted anew, so a regenerated dataset never meets
                    # a stale cached copy.
                    allow_cached_coco=False,
                ),
                PaperAPEvaluator(
                    dataset_name,
                    output_dir=output_folder,
                    box_source=cfg.TEST.PAPER_AP_BOX_SOURCE,
                ),
                BiologyEvaluator(
                    dataset_name,
                    output_dir=output_folder,
                    score_threshold=cfg.TEST.BIO_SCORE_THRESH,
                ),
            ]
        )

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None):
        """detectron2's evaluation loop; then, on the main process, each test dataset's metrics
        are logged as a table and written to OUTPUT_DIR/inference/<dataset>/evaluation.json."""
        results = super().test(cfg, model, evaluators)
        if not comm.is_main_process():
            return results
        # DefaultTrainer.test unwraps the results of a single test dataset.
        per_dataset = {cfg.DATASETS.TEST[0]: results} if len(cfg.DATASETS.TEST) == 1 else results
        for dataset_name, dataset_results in per_dataset.items():
            path = write_evaluation(cfg, dataset_name, dataset_results)
            logger.info(
                "Evaluation of %s on %s (%s):\n%s",
                architecture_name(cfg),
                dataset_name,
                path,
                format_results_table(dataset_results),
            )
            if dataset_results.get("paper", {}).get("num_gt") == 0:
                logger.warning(
                    "%s has no ground-truth instances: every AP and biology metric is undefined "
                    "(nan); all %d predictions are false positives",
                    dataset_name,
                    dataset_results["paper"]["num_pred"],
                )
        return results


def evaluation_dir(cfg: CfgNode, dataset_name: str) -> str:
    """Folder of a test dataset's evaluation outputs: OUTPUT_DIR/inference/<dataset>."""
    return os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def write_evaluation(cfg: CfgNode, dataset_name: str, results: dict) -> str:
    """Write one dataset's metrics and the method that produced them as JSON; return its path."""
    folder = evaluation_dir(cfg, dataset_name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, EVALUATION_FILE)
    # JSON has no NaN (e.g. an AP with no ground truth): undefined values are written as null.
    results = {
        task: {k: None if _is_nan(v) else v for k, v in metrics.items()}
        for task, metrics in results.items()
    }
    record = OrderedDict(method=architecture_name(cfg), dataset=dataset_name, results=results)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path
