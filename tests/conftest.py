"""Fixtures shared by the test modules."""

import pytest
import torch
from detectron2.data import DatasetCatalog

from objguided_d2.data import register_builtin_datasets


@pytest.fixture
def single_thread():
    """One intra-op thread for the test, the previous count restored afterwards.

    On a small machine shared with other work, two OpenMP threads slow small tensors down many
    times whenever another process is busy (the workers wait on each other); one thread costs at
    most ~1.5x when the machine is idle. A module opts in for all its tests with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory):
    """A $OBJGUIDED_DATASETS folder holding the synthetic neural-like sets, generated once, for
    subprocesses (tools, benchmarks) to find."""
    root = tmp_path_factory.mktemp("datasets")
    register_builtin_datasets(root)
    try:
        for name in ("synthetic_neural_train", "synthetic_neural_val"):
            DatasetCatalog.get(name)
    finally:
        register_builtin_datasets()  # back to the default root for other tests
    return root
