"""Timing of inference and training steps.

One image per forward; models interleaved (A, B, C, A, B, C, ...) so that load changes on a shared
machine hit all of them alike; medians over the timed repetitions after warm-up. On CUDA every
clock synchronizes (:func:`~objguided_d2.benchmark.runners.clock`).
"""

from __future__ import annotations

import statistics

import torch

from ..modeling.mask_windows import MaskWindows
from .inputs import InputSet
from .runners import Runner


def count_nonempty(masks: torch.Tensor | MaskWindows) -> int:
    """Masks with a pixel, of (N, H, W) masks or N masks' windows."""
    nonempty = masks.nonempty() if isinstance(masks, MaskWindows) else masks.flatten(1).any(1)
    return int(nonempty.sum())


def median_ms(values: list[float]) -> float:
    """Median of seconds, in milliseconds (NaN for none)."""
    return 1000 * statistics.median(values) if values else float("nan")


def time_inference(
    runners: list[Runner], input_sets: list[InputSet], warmup: int, repeats: int
) -> dict:
    """Interleaved repetitions over every sample of every set; per (runner label, set name) the
    medians of the per-image stage times and the box and mask counts of the first timed run."""
    times = {r.label: {s.name: {"dense": [], "instance": [], "total": []} for s in input_sets}
             for r in runners}  # fmt: skip
    counts = {r.label: {s.name: [] for s in input_sets} for r in runners}
    for repetition in range(warmup + repeats):
        for input_set in input_sets:
            for sample in input_set.samples:
                for runner in runners:
                    result, seconds = runner.infer(sample)
                    if repetition < warmup:
                        continue
                    for stage, value in seconds.items():
                        times[runner.label][input_set.name][stage].append(value)
                    if repetition == warmup:
                        counts[runner.label][input_set.name].append(
                            {
                                "boxes": len(sample.boxes),
                                "segmented": runner.segmented(sample.boxes.to(runner.device)),
                                "returned": len(result),
                                "nonempty_masks": count_nonempty(result.pred_masks),
                            }
                        )
        print(f"inference repetition {repetition + 1}/{warmup + repeats} done")
    results = {}
    for runner in runners:
        results[runner.label] = {}
        for input_set in input_sets:
            stages = times[runner.label][input_set.name]
            shares = [i / t for i, t in zip(stages["instance"], stages["total"])]
            results[runner.label][input_set.name] = {
                "ms_per_image": median_ms(stages["total"]),
                "dense_ms": median_ms(stages["dense"]),
                "per_instance_ms": median_ms(stages["instance"]),
                "per_instance_share": statistics.median(shares) if shares else float("nan"),
                "samples": len(stages["total"]),
                "instances": counts[runner.label][input_set.name],
            }
    return results


def time_training(runners: list[Runner], batch: list[dict], warmup: int, iters: int) -> dict:
    """Interleaved training steps on ``batch``; per runner label the median seconds per
    iteration, and where the runner has a dense-only step, that step's and the mask branch's."""
    variants = []
    for runner in runners:
        variants.append((runner.label, runner, False))
        if runner.has_dense_training:
            variants.append((f"{runner.label}:dense_only", runner, True))
    seconds = {name: [] for name, _, _ in variants}
    for iteration in range(warmup + iters):
        for name, runner, dense_only in variants:
            step = runner.train_step(batch, dense_only)
            if iteration >= warmup:
                seconds[name].append(step)
        print(f"training iteration {iteration + 1}/{warmup + iters} done")
    results = {}
    for runner in runners:
        full = seconds[runner.label]
        entry = {"s_per_iter": statistics.median(full)}
        if runner.has_dense_training:
            dense = seconds[f"{runner.label}:dense_only"]
            entry["dense_only_s_per_iter"] = statistics.median(dense)
            # Paired: each full step against the dense-only step that ran right after it, so that
            # a load change on a shared machine shifts both.
            entry["mask_branch_s_per_iter"] = statistics.median(f - d for f, d in zip(full, dense))
            entry["mask_branch_share"] = statistics.median(1 - d / f for f, d in zip(full, dense))
        entry["iterations"] = len(full)
        results[runner.label] = entry
    return results
