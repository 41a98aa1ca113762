"""Profile of one ObjGuided model: torch.profiler operator tables and cProfile function tables of
its per-instance part at each synthetic input (the dense part precomputed) and of one training
step, written as markdown."""

from __future__ import annotations

import cProfile
import datetime
import functools
import io
import pstats
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .inputs import InputSet
from .runners import Runner
from .timing import time_inference

PACKAGE = Path(__file__).resolve().parents[1]


def _op_table(run: Callable[[], object], device: torch.device, rows: int) -> str:
    """torch.profiler's operators of ``run()``, by self time on ``device``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        run()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=rows)


def _function_table(run: Callable[[], object], rows: int) -> str:
    """cProfile cumulative times of the package's functions during ``run()``."""
    profile = cProfile.Profile()
    profile.enable()
    run()
    profile.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream).sort_stats("cumulative")
    stats.print_stats(re.escape(str(PACKAGE)), rows)
    lines = stream.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    prefix = str(PACKAGE.parent) + "/"
    return "\n".join(line.replace(prefix, "") for line in lines[start:] if line.strip())


def _section(title: str, tables: list[tuple[str, str]], intro: str = "") -> list[str]:
    """Markdown lines: a heading, ``intro`` if any, then each (caption, table) as a fenced
    block."""
    lines = [title, ""] + ([intro, ""] if intro else [])
    for caption, table in tables:
        lines += [caption, "", "```", table, "```", ""]
    return lines


def write_profile(
    runner: Runner,
    input_sets: list[InputSet],
    batch: list[dict],
    path: Path,
    *,
    command: str,
    warmup: int,
    repeats: int,
    train_warmup: int,
    rows: int,
) -> None:
    """Profile of ``runner`` at every synthetic input set and for one training step on
    ``batch``, written to ``path``; ``rows`` rows per table."""
    lines = [
        f"# Profile of {runner.label} ({runner.config_file})",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today()}, device {runner.device.type}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
    ]
    for input_set in input_sets:
        if not input_set.name.startswith("synthetic"):
            continue
        timed = time_inference([runner], [input_set], warmup, repeats)
        times = timed[runner.label][input_set.name]
        sample = input_set.samples[0]
        with torch.no_grad():
            state = runner.dense(sample.inputs)
            boxes = sample.boxes.to(runner.device)
            per_instance = functools.partial(runner.instances, state, sample.inputs, boxes)
            per_instance()  # warm-up: first-call allocations stay out of the tables
            operators = _op_table(per_instance, runner.device, rows)
            functions = _function_table(per_instance, rows)
        lines += _section(
            f"## Inference, {input_set.description}",
            [
                (
                    "Operators of the per-instance part (torch.profiler; the level-0 image conv, "
                    "which runs inside the ROI heads, included):",
                    operators,
                ),
                ("Package functions of the per-instance part (cProfile, cumulative):", functions),
            ],
            intro=f"Median over {repeats} runs: total {times['ms_per_image']:.1f} ms, dense "
            f"{times['dense_ms']:.1f} ms, per-instance {times['per_instance_ms']:.1f} ms.",
        )
    for _ in range(train_warmup):
        runner.train_step(batch)
    step = functools.partial(runner.train_step, batch)
    lines += _section(
        f"## Training step, batch {len(batch)}, {len(batch[0]['instances'])} objects per image",
        [
            ("Operators (torch.profiler, whole step):", _op_table(step, runner.device, rows)),
            ("Package functions (cProfile, cumulative):", _function_table(step, rows)),
        ],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"profile written to {path}")
