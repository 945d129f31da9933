"""Tiny models gain nothing from intra-op threads: run this directory's tests single-threaded."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield
