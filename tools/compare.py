#!/usr/bin/env python
"""Compare evaluated methods side by side: a markdown table and plots.

    tools/compare.py output/neural_objguided output/neural_mask_rcnn output/neural_pointrend \
        --output output/neural_comparison
    tools/compare.py "ObjGuided R-18=output/a" "ObjGuided R-50=output/b" --output cmp/

    tools/compare.py ObjGuided=out/og_s1 ObjGuided=out/og_s2 \
        PointRend=out/pr_s1 PointRend=out/pr_s2 --output cmp/

Each run is ``[NAME=]PATH``; PATH is a training OUTPUT_DIR (``--dataset`` picks among its
evaluated datasets when there are several), an OUTPUT_DIR/inference/<dataset> folder, or the
``evaluation.json`` that ``tools/train_net.py`` writes there. NAME defaults to the method the run
evaluated. Runs given the same NAME are repetitions of one method (e.g. seeds): they share a row
that shows their mean and sample standard deviation. Writes to ``--output``:

* ``comparison.md``: the paper's AP (APseg, APseg50, APseg75, APdet), COCO mask and box AP and the
  biology metrics (AJI, PQ, SQ, RQ, precision, recall, F1 at IoU 0.5, counting error; SBD on leaf
  datasets), one row per method; with repetitions, a second table with every run;
* ``ap_vs_iou.png``: paper-style mask and box AP against the IoU threshold (the paper's Fig. 5),
  for repetitions their mean with the band from the lowest to the highest run;
* ``pr_curves.png``: mask precision-recall curves at IoU 0.5 and 0.75, one panel row per class;
* ``figure.png`` with ``--figure-images``: for each named image of the evaluated dataset (its
  file name without extension, or a prefix of it that no other name shares), the image, its
  ground truth and each method's predictions (the first run of each) side by side, instances in
  distinct colours. A method's predictions are those of its evaluation
  (``coco_instances_results.json``) that score at least the threshold of its biology metrics,
  the better-scored instance winning where two overlap.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetCatalog

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from objguided_d2.data import annotations_to_label_image, read_image  # noqa: E402
from objguided_d2.engine import EVALUATION_FILE  # noqa: E402
from objguided_d2.evaluation.bio_metrics import paint_by_score  # noqa: E402
from objguided_d2.export import draw_overlay  # noqa: E402

# Beside evaluation.json: the paper evaluator's report (per-IoU AP and precision-recall curves),
# the biology evaluator's (its score threshold) and detectron2's COCO results (every prediction).
PAPER_REPORT_FILE = "paper_metrics.json"
BIO_REPORT_FILE = "bio_metrics.json"
COCO_RESULTS_FILE = "coco_instances_results.json"
# (column title, task, metric) of the table, in order; a metric no run has is left out.
COLUMNS = (
    ("APseg", "paper", "APseg"),
    ("APseg50", "paper", "APseg50"),
    ("APseg75", "paper", "APseg75"),
    ("APdet", "paper", "APdet"),
    ("COCO mask AP", "segm", "AP"),
    ("COCO box AP", "bbox", "AP"),
    ("AJI", "bio", "AJI"),
    ("PQ", "bio", "PQ"),
    ("SQ", "bio", "SQ"),
    ("RQ", "bio", "RQ"),
    ("P@0.5", "bio", "P@0.5"),
    ("R@0.5", "bio", "R@0.5"),
    ("F1@0.5", "bio", "F1@0.5"),
    ("SBD", "bio", "SBD"),
    ("\\|DiC\\|", "bio", "absDiC"),  # pipes escaped for markdown
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", metavar="[NAME=]PATH", help="evaluated runs")
    parser.add_argument("--output", required=True, help="folder for the table and plots")
    parser.add_argument("--dataset", help="dataset to compare on, for runs that evaluated several")
    parser.add_argument(
        "--figure-images",
        nargs="+",
        metavar="NAME",
        help="images (file names without extension, or unique prefixes) to draw in figure.png",
    )
    return parser.parse_args(argv)


def find_evaluation(path: str, dataset: str | None) -> str:
    """The evaluation.json of a run given as file, evaluation folder or OUTPUT_DIR."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, EVALUATION_FILE)):
        return os.path.join(path, EVALUATION_FILE)
    inference = os.path.join(path, "inference")
    evaluated = sorted(
        name
        for name in (os.listdir(inference) if os.path.isdir(inference) else [])
        if os.path.isfile(os.path.join(inference, name, EVALUATION_FILE))
    )
    if dataset is not None:
        evaluated = [name for name in evaluated if name == dataset]
    if len(evaluated) != 1:
        found = ", ".join(evaluated) or "none"
        raise FileNotFoundError(
            f"{path}: expected one {EVALUATION_FILE} under inference/<dataset>/ "
            f"(datasets found: {found}); pass the file or --dataset"
        )
    return os.path.join(inference, evaluated[0], EVALUATION_FILE)


def load_run(spec: str, dataset: str | None) -> dict:
    """{"name", "dataset", "results", "paper", "folder"} of a ``[NAME=]PATH`` run; "paper" is the
    paper evaluator's report, or None when it is not beside the evaluation; "folder" holds the
    evaluation. A spec that exists as a path is a path, even with a "=" in it."""
    name, path = ("", spec) if os.path.exists(spec) or "=" not in spec else spec.split("=", 1)
    evaluation_path = find_evaluation(path, dataset)
    with open(evaluation_path) as f:
        evaluation = json.load(f)
    paper_path = os.path.join(os.path.dirname(evaluation_path), PAPER_REPORT_FILE)
    paper = None
    if os.path.isfile(paper_path):
        with open(paper_path) as f:
            paper = json.load(f)
    return {
        "name": name or evaluation["method"],
        "dataset": evaluation["dataset"],
        "results": evaluation["results"],
        "paper": paper,
        "folder": os.path.dirname(evaluation_path),
    }


def _value(run: dict, task: str, metric: str):
    return run["results"].get(task, {}).get(metric)


def markdown_table(groups: list[list[dict]]) -> str:
    """One row per method (a group of runs of one name), the COLUMNS that at least one run has:
    the value of a single run, or the mean +- sample standard deviation of repetitions (over the
    runs that have the metric); missing values show as "-"."""
    runs = [run for group in groups for run in group]
    columns = [c for c in COLUMNS if any(_value(run, *c[1:]) is not None for run in runs)]
    repeated = any(len(group) > 1 for group in groups)
    lines = [
        "| method | dataset | "
        + ("runs | " if repeated else "")
        + " | ".join(title for title, _, _ in columns)
        + " |",
        "|---|---|" + ("---:|" if repeated else "") + "---:|" * len(columns),
    ]
    for group in groups:
        cells = [str(len(group))] if repeated else []
        for _, task, metric in columns:
            values = [v for v in (_value(run, task, metric) for run in group) if v is not None]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
        dataset = ", ".join(dict.fromkeys(run["dataset"] for run in group))
        lines.append(f"| {group[0]['name']} | {dataset} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_with_legend(figure, axis, path: str) -> None:
    """Save with one legend of ``axis``'s lines under the panels (method names can be long)."""
    handles, labels = axis.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_ap_vs_iou(groups: list[list[dict]], path: str) -> None:
    """Paper-style AP of masks and boxes against the IoU threshold, one line per method: the mean
    of its runs, with the band between their lowest and highest AP."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, layout="constrained")
    for axis, kind, title in zip(axes, ("seg", "det"), ("masks (APseg)", "boxes (APdet)")):
        for group in groups:
            reports = [run["paper"] for run in group if run["paper"] is not None]
            if not reports:
                continue
            per_iou = [report["metrics"][f"AP{kind}_per_iou"] for report in reports]
            thresholds = [float(t) for t in per_iou[0]]
            curves = [
                [float("nan") if v is None else v for v in curve.values()] for curve in per_iou
            ]
            mean = [statistics.mean(values) for values in zip(*curves)]
            (line,) = axis.plot(thresholds, mean, marker="o", label=group[0]["name"])
            if len(curves) > 1:
                low, high = ([f(values) for values in zip(*curves)] for f in (min, max))
                axis.fill_between(thresholds, low, high, color=line.get_color(), alpha=0.2)
        axis.set(title=title, xlabel="IoU threshold", xlim=(0.48, 0.97), ylim=(0, 100))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("AP (%)")
    save_with_legend(figure, axes[0], path)


def plot_pr_curves(groups: list[list[dict]], path: str) -> None:
    """Mask precision-recall curves at IoU 0.5 and 0.75: a row per class, a line per method (its
    first run)."""
    reports = [group[0] for group in groups if group[0]["paper"] is not None]
    classes = list(dict.fromkeys(c for run in reports for c in run["paper"]["per_class"]))
    rows = max(1, len(classes))
    figure, axes = plt.subplots(
        rows, 2, figsize=(10, 4 * rows), squeeze=False, layout="constrained"
    )
    for row, class_name in enumerate(classes):
        for axis, threshold in zip(axes[row], ("0.50", "0.75")):
            for run in reports:
                entry = run["paper"]["per_class"].get(class_name)
                if entry is None:
                    continue
                curve = entry["pr_curves"]["seg"][threshold]
                axis.plot(curve["recall"], curve["precision"], label=run["name"])
            axis.set(
                title=f"{class_name}: masks at IoU {threshold}",
                xlabel="recall",
                ylabel="precision",
                xlim=(0, 1),
                ylim=(0, 1.02),
            )
            axis.grid(alpha=0.3)
    save_with_legend(figure, axes[0, 0], path)


def evaluated_predictions(run: dict) -> dict[int, list]:
    """A run's evaluated predictions that score at least its biology score threshold, by image
    id (COCO results: "segmentation" RLE, "score")."""
    with open(os.path.join(run["folder"], BIO_REPORT_FILE)) as f:
        threshold = json.load(f)["score_threshold"]
    with open(os.path.join(run["folder"], COCO_RESULTS_FILE)) as f:
        results = json.load(f)
    by_image: dict[int, list] = {}
    for result in results:
        if result["score"] >= threshold:
            by_image.setdefault(result["image_id"], []).append(result)
    return by_image


def predicted_labels(predictions: list, height: int, width: int) -> np.ndarray:
    """(H, W) label image of one image's predictions; where two overlap, the better-scored wins."""
    if not predictions:
        return np.zeros((height, width), np.int64)
    rles = [p["segmentation"] for p in predictions]
    masks = torch.from_numpy(mask_util.decode(rles)).permute(2, 0, 1).bool()
    return (paint_by_score(masks, torch.tensor([p["score"] for p in predictions])) + 1).numpy()


def draw_figure(groups: list[list[dict]], names: list[str], path: str) -> None:
    """Rows of image | ground truth | each method's predictions for the named images."""
    dataset = groups[0][0]["dataset"]
    records = {Path(r["file_name"]).stem: r for r in DatasetCatalog.get(dataset)}
    chosen = []
    for name in names:
        matches = [stem for stem in records if stem.startswith(name)]
        if len(matches) != 1:
            found = "no image" if not matches else f"{len(matches)} images"
            raise SystemExit(f"--figure-images: {name} names {found} of dataset {dataset}")
        chosen.append(matches[0])
    predictions = [evaluated_predictions(group[0]) for group in groups]
    titles = ["image", "ground truth"] + [group[0]["name"] for group in groups]
    figure, axes = plt.subplots(
        len(names), len(titles), figsize=(2.6 * len(titles), 2.6 * len(names)), squeeze=False
    )
    for row, name in enumerate(chosen):
        record = records[name]
        image = read_image(record["file_name"], "RGB")
        truth = annotations_to_label_image(record["annotations"], *image.shape[:2])
        panels = [image, draw_overlay(image, truth)]
        panels += [
            draw_overlay(image, predicted_labels(p.get(record["image_id"], []), *truth.shape))
            for p in predictions
        ]
        for column, (axis, panel) in enumerate(zip(axes[row], panels)):
            axis.imshow(panel)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[column], fontsize=10)
        axes[row, 0].set_ylabel(name[:10], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def group_runs(runs: list[dict], specs: list[str]) -> list[list[dict]]:
    """Runs of one given NAME form a group, in order of first appearance; runs that share only
    the method name they default to are told apart by their path instead."""
    named = ["=" in spec and not os.path.exists(spec) for spec in specs]
    defaults = [run["name"] for run, given in zip(runs, named) if not given]
    groups: dict[str, list[dict]] = {}
    for run, spec, given in zip(runs, specs, named):
        if not given and defaults.count(run["name"]) > 1:  # e.g. two unnamed ObjGuided runs
            run["name"] = f"{run['name']} ({spec})"
        groups.setdefault(run["name"], []).append(run)
    return list(groups.values())


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = [load_run(spec, args.dataset) for spec in args.runs]
    groups = group_runs(runs, args.runs)
    os.makedirs(args.output, exist_ok=True)
    table = markdown_table(groups)
    if any(len(group) > 1 for group in groups):
        each = [[dict(run, name=f"{run['name']} ({spec})")] for run, spec in zip(runs, args.runs)]
        table += "\nEvery run:\n\n" + markdown_table(each)
    with open(os.path.join(args.output, "comparison.md"), "w") as f:
        f.write(table)
    plot_ap_vs_iou(groups, os.path.join(args.output, "ap_vs_iou.png"))
    plot_pr_curves(groups, os.path.join(args.output, "pr_curves.png"))
    written = "comparison.md, ap_vs_iou.png, pr_curves.png"
    if args.figure_images:
        draw_figure(groups, args.figure_images, os.path.join(args.output, "figure.png"))
        written += ", figure.png"
    print(table)
    print(f"Wrote {written} to {args.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
