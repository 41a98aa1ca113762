"""Peak memory of one inference.

CUDA: ``max_memory_allocated`` during the inference minus the memory allocated before it. CPU:
one fresh process per model and input builds both, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), runs one inference and reports ``VmHWM`` minus the ``VmRSS`` before
it: the resident memory the inference added, allocator caching included (a fresh process, so that
no earlier model's peak or cached memory counts).
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from .inputs import InputSet, Sample
from .runners import Runner


def _memory_kb(field_name: str) -> int:
    """A field of /proc/self/status, e.g. ``VmRSS``, in kB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", status).group(1))


def measure_peak_memory(runner: Runner, sample: Sample) -> dict:
    """Peak memory of one inference of ``sample`` in this process, in MB."""
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
        torch.cuda.reset_peak_memory_stats(runner.device)
        before = torch.cuda.memory_allocated(runner.device)
        runner.infer(sample)
        peak = torch.cuda.max_memory_allocated(runner.device)
        return {"peak_mb": (peak - before) / 2**20, "method": "cuda max_memory_allocated"}
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _memory_kb("VmRSS")
    runner.infer(sample)
    peak = _memory_kb("VmHWM")
    return {
        "peak_mb": (peak - before) / 1024,
        "process_peak_mb": peak / 1024,
        "method": "VmHWM - VmRSS before, fresh process",
    }


def probe_memory(
    specs: list[tuple[str, str]],
    input_sets: list[InputSet],
    device: str,
    build: Callable[[str, str], Runner],
    probe_command: Callable[[str, str], list[str]],
) -> dict:
    """Peak memory of each model on the first image of each input set, by label and set name.

    specs: (label, config file) of each model; ``build(label, config_file)`` makes its runner.
    probe_command: on the CPU, ``probe_command(label, set name)`` is the command line of a fresh
        process that prints :func:`measure_peak_memory`'s result as JSON on its last line.
    """
    results = {}
    for label, config_file in specs:
        results[label] = {}
        for input_set in input_sets:
            if device == "cpu":
                command = probe_command(label, input_set.name)
                output = subprocess.run(command, capture_output=True, text=True, check=True)
                entry = json.loads(output.stdout.strip().splitlines()[-1])
            else:
                entry = measure_peak_memory(build(label, config_file), input_set.samples[0])
            results[label][input_set.name] = entry
    return results
