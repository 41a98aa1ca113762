"""The benchmark's report: the environment of a run, the ratio line that ends it, and the JSON
report written with its markdown rendering. The report states measured numbers only."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path

import torch

RATIO_LINE = "ratio objguided/pointrend = {:.2f}"


def environment(device: str) -> dict:
    """Date, device, torch and machine of this run."""
    if device == "cuda":
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def ratio_line(report: dict) -> str:
    """Inference time per image of the first config over PointRend's, on the first synthetic
    input set (the first input set if none is synthetic); NaN without PointRend's timing."""
    names = [s["name"] for s in report["inputs"]]
    reference = [n for n in names if n.startswith("synthetic")] or names
    inference = report["inference"]
    ratio = float("nan")
    if reference and "pointrend" in inference:
        first = inference[next(iter(report["configs"]))][reference[0]]
        ratio = first["ms_per_image"] / inference["pointrend"][reference[0]]["ms_per_image"]
    return RATIO_LINE.format(ratio)


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _dense_summary(modules: dict[str, float]) -> dict[str, float]:
    """Top-level modules of the dense part; ObjGuided's backbone split into encoder and decoder."""
    summary = {name: value for name, value in modules.items() if "." not in name}
    decoder = sum(v for name, v in modules.items() if name.startswith("ObjGuidedBackbone.dec"))
    if decoder:
        summary["encoder"] = summary.pop("ObjGuidedBackbone") - decoder
        summary["decoder"] = decoder
    if "ObjGuidedROIHeads.image_conv" in modules:
        summary["level-0 image conv"] = modules["ObjGuidedROIHeads.image_conv"]
    return summary


def _table(title: str, columns: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown lines: the heading ``title``, then a table of ``columns`` and cell ``rows``."""
    lines = [title, "", f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    return lines + [f"| {' | '.join(row)} |" for row in rows]


def _inference_table(report: dict) -> list[str]:
    rows = []
    for label, per_set in report["inference"].items():
        for name, entry in per_set.items():
            counts = entry["instances"]
            memory = report.get("memory", {}).get(label, {}).get(name, {}).get("peak_mb")
            rows.append(
                [
                    label,
                    name,
                    _fmt(entry["ms_per_image"]),
                    _fmt(entry["dense_ms"]),
                    _fmt(entry["per_instance_ms"]),
                    f"{entry['per_instance_share']:.1%}",
                    "/".join(str(c["segmented"]) for c in counts),
                    "/".join(str(c["returned"]) for c in counts),
                    _fmt(memory, 0),
                ]
            )
    columns = ["model", "input", "total ms", "dense ms", "per-instance ms", "per-instance share",
               "boxes segmented", "masks returned", "peak MB"]  # fmt: skip
    return _table("## Inference (equal N; median ms per image)", columns, rows)


def _training_table(report: dict) -> list[str]:
    rows = []
    for label, entry in report["training"].items():
        share = entry.get("mask_branch_share")
        rows.append(
            [
                label,
                _fmt(entry["s_per_iter"], 2),
                _fmt(entry.get("dense_only_s_per_iter"), 2),
                _fmt(entry.get("mask_branch_s_per_iter"), 2),
                "-" if share is None else f"{share:.1%}",
            ]
        )
    columns = ["model", "s/iter", "dense part only", "mask branch + refinement", "share"]
    return _table(f"## Training (median s/iter; {report['training_setup']})", columns, rows)


def _size_table(report: dict) -> list[str]:
    rows = []
    for label, entry in report["model_size"].items():
        breakdown = _dense_summary(entry["dense_modules_gmac"])
        missing = ", ".join(f"{k} x{v}" for k, v in entry["not_counted_ops"].items())
        rows.append(
            [
                label,
                f"{entry['parameters'] / 1e6:.2f}",
                f"{entry['dense_gmac']:.1f}",
                f"{entry['per_instance_gmac']:.1f} ({entry['boxes']})",
                f"{entry['total_gmac']:.1f}",
                ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items()),
                missing or "-",
            ]
        )
    columns = ["model", "parameters (M)", "dense GMAC", "per-instance GMAC (boxes)",
               "total GMAC", "dense breakdown", "not counted"]  # fmt: skip
    return _table("## Model size (GMACs at the first synthetic input)", columns, rows)


def markdown(report: dict) -> str:
    """The report as a markdown page: environment, inputs, then the tables the run measured."""
    env = report["environment"]
    lines = [
        f"# Benchmark {report['tag']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{env['date']}; device {env['device']} ({env['device_name']}); torch {env['torch']}, "
        f"{env['torch_threads']} threads; {env['cpu_count']} CPUs, load average "
        f"{env['load_average']} at the start.",
        "",
        "Inputs: " + "; ".join(f"`{s['name']}`: {s['description']}" for s in report["inputs"]),
        "",
    ]
    lines += [f"Note: {note}" for note in report["notes"]]
    for key, table in (
        ("inference", _inference_table),
        ("training", _training_table),
        ("model_size", _size_table),
    ):
        if report.get(key):
            lines += ["", *table(report)]
    lines += ["", report["ratio_line"], ""]
    return "\n".join(lines)


def write_results(output_dir: Path, stem: str, record: dict, text: str) -> None:
    """A benchmark's results: ``<stem>.json`` (``record``) and ``<stem>.md`` (``text``) in
    ``output_dir`` (created if needed)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (output_dir / f"{stem}.md").write_text(text)


def write_report(report: dict, output_dir: Path) -> str:
    """``benchmark_<tag>.json`` and ``.md`` in ``output_dir``; returns the markdown."""
    text = markdown(report)
    write_results(output_dir, f"benchmark_{report['tag']}", report, text)
    return text
