"""Tensor operations (which timing noise does not move) and page faults of ObjGuided's
per-instance part.

Runs the default config's dense forward on the CPU on the benchmark's 512 x 512 scene of N objects,
warms the per-instance part up once, then counts the tensor operations (a ``TorchDispatchMode``)
and the minor page faults (``ru_minflt``) of one more per-instance inference. Prints one line per N.
Each run builds the untrained model afresh, and its masks decide part of the work of paste-back
and mask NMS, so the counts move by a few percent between runs.

    .venv/bin/python benchmarks/count_ops.py --counts 100 300
"""

import argparse
import resource

import torch

from objguided_d2.benchmark.flops import OpRecorder
from objguided_d2.benchmark.inputs import synthetic_sample
from objguided_d2.benchmark.runners import OBJGUIDED_CONFIGS, build_runner

SIZE = 512  # the benchmark's default input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 300])
    args = parser.parse_args()
    torch.set_num_threads(1)
    runner = build_runner("objguided[default]", OBJGUIDED_CONFIGS["default"], "cpu", SIZE)
    channels = len(runner.cfg.MODEL.PIXEL_MEAN)
    for count in args.counts:
        sample = synthetic_sample(count, SIZE, 0, channels)
        with torch.no_grad():
            state = runner.dense(sample.inputs)
            runner.instances(state, sample.inputs, sample.boxes)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            runner.instances(state, sample.inputs, sample.boxes)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            with OpRecorder() as recorder:
                runner.instances(state, sample.inputs, sample.boxes)
        operations = sum(recorder.names.values())
        print(f"N = {count}: {operations} tensor operations, {faults} minor page faults")


if __name__ == "__main__":
    main()
