"""Tiny models gain nothing from intra-op threads, and on a shared CPU OpenMP regions stall while
waiting for a descheduled thread: run this directory's tests single-threaded."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
