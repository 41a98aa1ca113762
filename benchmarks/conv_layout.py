"""NCHW against channels-last memory format for the convolutions of ObjGuided's mask branch.

Times ``nn.Conv2d`` forward passes (median of repeats after warm-up, no gradient) on the shapes the
ROI heads run at N = 100 on a 512 x 512 scene: a level-0 group of padded ROIs and the full-image
level-0 image conv. Prints a markdown table and writes it to
``benchmarks/results/conv_layout_<date>_<device>.md``.

    .venv/bin/python benchmarks/conv_layout.py --threads 1
"""

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
from torch import nn

# (input shape, output channels, kernel size, what runs at that shape)
SHAPES = [
    ((17, 64, 47, 47), 64, 3, "S0 conv_low / seg_conv, largest level-0 ROI group"),
    ((6, 64, 31, 45), 64, 3, "S0 conv_low / seg_conv, a small level-0 ROI group"),
    ((1, 64, 512, 512), 64, 3, "level-0 image conv, second layer"),
    ((1, 3, 512, 512), 64, 3, "level-0 image conv, first layer"),
]


def median_ms(conv: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        conv(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        conv(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        "| input | conv | what | NCHW ms | channels-last ms | NCHW GMAC/s | channels-last GMAC/s |",
        "|---|---|---|---|---|---|---|",
    ]
    with torch.no_grad():
        for shape, out_channels, kernel, what in SHAPES:
            conv = nn.Conv2d(shape[1], out_channels, kernel, padding=kernel // 2)
            x = torch.randn(shape)
            gmac = x[:, :1].numel() * shape[1] * out_channels * kernel * kernel / 1e9
            times = [
                median_ms(conv, x.contiguous(memory_format=fmt), args.warmup, args.repeats)
                for fmt in (torch.contiguous_format, torch.channels_last)
            ]
            rows.append(
                f"| {tuple(shape)} | {shape[1]}->{out_channels}, {kernel}x{kernel} | {what} | "
                f"{times[0]:.1f} | {times[1]:.1f} | {gmac / times[0] * 1e3:.0f} | "
                f"{gmac / times[1] * 1e3:.0f} |"
            )
    header = (
        f"# Convolution memory formats, {datetime.date.today()}\n\n"
        f"Command: `python benchmarks/conv_layout.py --threads {args.threads}`; torch "
        f"{torch.__version__}, {args.threads} thread(s), CPU; inputs already in each layout, "
        "as the ROI heads keep their maps.\n\n"
    )
    report = header + "\n".join(rows) + "\n"
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"conv_layout_{datetime.date.today()}_cpu.md"
    path.write_text(report)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
