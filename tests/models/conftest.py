"""Tiny models gain nothing from intra-op threads: run this directory's tests single-threaded."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def mixtral_dir(tiny_checkpoint):
    """The tiny Mixtral checkpoint (per-expert layout, float32) most loader tests edit a copy of."""
    return tiny_checkpoint("mixtral")
