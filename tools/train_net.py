#!/usr/bin/env python
"""Train and evaluate ObjGuided, Mask R-CNN or PointRend; the config picks the architecture.

    tools/train_net.py --config-file configs/neural_objguided.yaml
    tools/train_net.py --config-file configs/neural_objguided.yaml --resume
    tools/train_net.py --config-file configs/neural_objguided.yaml --eval-only \
        MODEL.WEIGHTS output/neural_objguided/model_final.pth
    tools/train_net.py --config-file configs/neural_mask_rcnn.yaml --num-gpus 8

``--num-gpus N`` starts N processes through detectron2's ``launch`` (NCCL on GPUs, Gloo on a
CPU-only machine); ``--num-machines`` / ``--machine-rank`` / ``--dist-url`` span machines. Training
logs losses, learning rate and ETA, and writes TensorBoard events, ``metrics.json``, checkpoints
and ``config.yaml`` to OUTPUT_DIR. Evaluation (after training, or with ``--eval-only``) prints a
table and writes OUTPUT_DIR/inference/<dataset>/evaluation.json. ``--eval-only`` refuses a
checkpoint that lacks parameters of the config's model or has other shapes for them, and no
checkpoint at all, unless ``--allow-mismatched-weights``.
"""

import logging

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from objguided_d2.engine import Trainer, leave_process_group, load_trained_weights_or_exit, setup

logger = logging.getLogger("objguided_d2.train_net")


def main(args):
    cfg = setup(args)
    if args.eval_only:
        if not cfg.DATASETS.TEST:
            raise SystemExit(
                "--eval-only needs a dataset to evaluate: DATASETS.TEST is empty "
                "(e.g. DATASETS.TEST \"('dsb2018_val',)\")"
            )
        model = Trainer.build_model(cfg)
        # --resume evaluates the run's last checkpoint; a checkpoint must fit the model.
        weights = cfg.MODEL.WEIGHTS
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        if args.resume and checkpointer.has_checkpoint():
            weights = checkpointer.get_checkpoint_file()
        load_trained_weights_or_exit(model, weights, allow_mismatch=args.allow_mismatched_weights)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
    else:
        trainer = Trainer(cfg)
        if args.resume and not trainer.checkpointer.has_checkpoint():
            logger.warning(
                f"--resume: no checkpoint in {cfg.OUTPUT_DIR} (no last_checkpoint file); "
                f"training starts from {cfg.MODEL.WEIGHTS or 'scratch'}"
            )
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    leave_process_group()
    return results


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--allow-mismatched-weights",
        action="store_true",
        help="--eval-only with a checkpoint that lacks some of the model's parameters or has "
        "other shapes for them (those keep random values); refused by default",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
