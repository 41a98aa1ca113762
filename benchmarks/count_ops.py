"""Tensor operations (which timing noise does not move) and page faults of ObjGuided's
per-instance part.

Runs the default config's dense forward on the benchmark's synthetic 512 x 512 scene of N objects,
warms the per-instance part up once, then counts the tensor operations (a ``TorchDispatchMode``)
and the minor page faults (``ru_minflt``) of one more per-instance inference. Prints one line per N.
Each run builds the untrained model afresh, and its masks decide part of the work of paste-back
and mask NMS, so the counts move by a few percent between runs.

    .venv/bin/python benchmarks/count_ops.py --counts 100 300
"""

import argparse
import resource
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import benchmark  # noqa: E402


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 300])
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = benchmark.parse_args(
        ["--objguided-configs", "default", "--mask-rcnn-config", "none"]
        + ["--pointrend-config", "none", "--dataset", "none", "--threads", "1"]
    )
    label, config = benchmark.runner_specs(options)[0]
    runner = benchmark.build_runner(options, label, config)
    for count in args.counts:
        sample = benchmark.synthetic_sample(count, options.size, 0, 3)
        with torch.no_grad():
            state = runner.dense(sample.inputs)
            runner.instances(state, sample.inputs, sample.boxes)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            runner.instances(state, sample.inputs, sample.boxes)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            with OpCounter() as counter:
                runner.instances(state, sample.inputs, sample.boxes)
        print(f"N = {count}: {counter.count} tensor operations, {faults} minor page faults")


if __name__ == "__main__":
    main()
