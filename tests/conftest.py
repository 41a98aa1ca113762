"""Fixtures shared by the test modules."""

import pytest
import torch


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
