#!/usr/bin/env python
"""Time ObjGuided, Mask R-CNN and PointRend side by side, on the same images and the same boxes.

Every architecture segments exactly the N boxes of each image after its own proposal stage (the
equal-N protocol). Measured: inference time per image, whole and split into the dense part and
the per-instance part; training seconds per iteration; peak memory of one inference; parameters
and GMACs. Writes <output-dir>/benchmark_<tag>.json and .md and prints the markdown; the last line
printed is "ratio objguided/pointrend = X.XX": inference time per image of the first ObjGuided
config over PointRend's on the first synthetic input. Protocol and current results:
benchmarks/README.md; code: objguided_d2/benchmark/.

examples:
  tools/benchmark.py --threads 1                  # the full run quoted in benchmarks/README.md
  tools/benchmark.py --threads 1 --objguided-configs default fast my.yaml \\
      --synthetic-counts 100 300 --dataset dsb2018_val --dataset-images 4
  tools/benchmark.py --threads 1 --profile --objguided-configs default --dataset none
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from objguided_d2.benchmark.flops import count_macs, count_parameters
from objguided_d2.benchmark.inputs import build_input_sets, training_batch
from objguided_d2.benchmark.memory import measure_peak_memory, probe_memory
from objguided_d2.benchmark.profile import write_profile
from objguided_d2.benchmark.report import environment, ratio_line, write_report
from objguided_d2.benchmark.runners import (
    OBJGUIDED_CONFIGS,
    PROTOCOL,
    REPO,
    build_runner,
    runner_config,
    runner_specs,
)
from objguided_d2.benchmark.timing import time_inference, time_training

# The report's "settings": the options every timing depends on.
SETTINGS = ("size", "warmup", "repeats", "train_iters", "train_warmup", "train_batch",
            "train_instances")  # fmt: skip


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; each option's default where it has one."""

    def _get_help_string(self, action):
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return f"{action.help or ''} (default: %(default)s)".lstrip()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    models = parser.add_argument_group("models")
    models.add_argument(
        "--objguided-configs",
        metavar="CONFIG",
        nargs="+",
        default=["default", "fast"],
        help=f"ObjGuided configs: {', '.join(OBJGUIDED_CONFIGS)} or paths; the first one is the "
        "reference of the ratio line",
    )
    models.add_argument(
        "--mask-rcnn-config",
        metavar="PATH",
        default="configs/Base-MaskRCNN.yaml",
        help="config path or 'none'",
    )
    models.add_argument(
        "--pointrend-config",
        metavar="PATH",
        default="configs/Base-PointRend.yaml",
        help="config path or 'none'",
    )
    models.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs applied to every model"
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--size", type=int, metavar="N", default=512, help="network input side in pixels"
    )
    inputs.add_argument(
        "--synthetic-counts",
        type=int,
        metavar="N",
        nargs="*",
        default=[100, 300],
        help="objects N of each synthetic scene",
    )
    inputs.add_argument(
        "--dataset",
        default="dsb2018_val",
        help="registered dataset or 'none'; one not prepared is skipped",
    )
    inputs.add_argument(
        "--dataset-images", type=int, metavar="N", default=4, help="images of --dataset"
    )
    runs = parser.add_argument_group("repetitions")
    runs.add_argument("--warmup", type=int, metavar="N", default=1, help="untimed inferences first")
    runs.add_argument(
        "--repeats", type=int, metavar="N", default=5, help="timed inferences; 0: none"
    )
    runs.add_argument(
        "--train-warmup", type=int, metavar="N", default=1, help="untimed training steps first"
    )
    runs.add_argument(
        "--train-iters", type=int, metavar="N", default=3, help="timed training steps; 0: none"
    )
    runs.add_argument(
        "--train-batch", type=int, metavar="N", default=2, help="synthetic scenes per step"
    )
    runs.add_argument(
        "--train-instances", type=int, metavar="N", default=100, help="objects per scene"
    )
    run = parser.add_argument_group("run")
    run.add_argument("--no-flops", action="store_true", help="skip parameters and GMACs")
    run.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    run.add_argument(
        "--threads",
        type=int,
        metavar="N",
        default=None,
        help="torch intra-op threads (default: torch's choice)",
    )
    run.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=["cpu", "cuda"],
        help="where every model runs",
    )
    run.add_argument(
        "--output-dir",
        metavar="DIR",
        default=str(REPO / "benchmarks" / "results"),
        help="where the report is written",
    )
    run.add_argument("--tag", default=None, help="file name tag (default: <date>_<device>)")
    profile = parser.add_argument_group("profile")
    profile.add_argument(
        "--profile",
        action="store_true",
        help="profile the first ObjGuided config instead of benchmarking",
    )
    profile.add_argument(
        "--profile-output",
        metavar="PATH",
        default=None,
        help="markdown file written (default: <output-dir>/profile_<tag>.md)",
    )
    profile.add_argument("--profile-rows", type=int, metavar="N", default=25, help="rows per table")
    # Internal: the fresh process of one CPU memory probe (label, input set name).
    parser.add_argument(
        "--memory-probe", nargs=2, metavar=("LABEL", "INPUT"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    specs = runner_specs(args.objguided_configs, args.mask_rcnn_config, args.pointrend_config)

    def build(label, config_file):
        return build_runner(label, config_file, args.device, args.size, args.opts)

    cfg = runner_config(specs[0][1], args.device, args.size, args.opts)
    input_sets, notes = build_input_sets(
        cfg, args.size, args.synthetic_counts, args.dataset, args.dataset_images
    )
    channels = len(cfg.MODEL.PIXEL_MEAN)

    def batch():
        return training_batch(args.size, args.train_batch, args.train_instances, channels)

    tag = args.tag or f"{datetime.date.today().isoformat()}_{args.device}"
    command = " ".join([Path(sys.executable).name, *sys.argv])

    if args.memory_probe:
        label, name = args.memory_probe
        sample = next(s for s in input_sets if s.name == name).samples[0]
        print(json.dumps(measure_peak_memory(build(label, dict(specs)[label]), sample)))
        return None
    if args.profile:
        path = Path(args.profile_output or Path(args.output_dir) / f"profile_{tag}.md")
        write_profile(
            build(*specs[0]),
            input_sets,
            batch(),
            path,
            command=command,
            warmup=args.warmup,
            repeats=args.repeats,
            train_warmup=args.train_warmup,
            rows=args.profile_rows,
        )
        return None

    runners = [build(label, config_file) for label, config_file in specs]
    report = {
        "tag": tag,
        "command": command,
        "environment": environment(args.device),
        "protocol": PROTOCOL,
        "configs": {r.label: r.config_file for r in runners},
        "inputs": [{"name": s.name, "description": s.description} for s in input_sets],
        "notes": notes,
        "settings": {key: getattr(args, key) for key in SETTINGS},
    }
    report["inference"] = (
        time_inference(runners, input_sets, args.warmup, args.repeats) if args.repeats > 0 else {}
    )
    if args.train_iters > 0:
        report["training_setup"] = (
            f"batch {args.train_batch} synthetic {args.size}x{args.size} scenes of "
            f"{args.train_instances} objects, {args.train_iters} timed after "
            f"{args.train_warmup} warm-up"
        )
        report["training"] = time_training(runners, batch(), args.train_warmup, args.train_iters)
    synthetic = [s for s in input_sets if s.name.startswith("synthetic")]
    if not args.no_flops and synthetic:
        sample = synthetic[0].samples[0]
        report["model_size"] = {
            r.label: {"parameters": count_parameters(r.model), **count_macs(r, sample)}
            for r in runners
        }
    if not args.no_memory:
        script = [sys.executable, str(Path(__file__).resolve())]
        report["memory"] = probe_memory(
            specs,
            input_sets,
            args.device,
            build,
            lambda label, name: [*script, "--memory-probe", label, name, *argv],
        )
    report["ratio_line"] = ratio_line(report)
    print(write_report(report, Path(args.output_dir)))
    print(report["ratio_line"])
    return report


if __name__ == "__main__":
    main()
