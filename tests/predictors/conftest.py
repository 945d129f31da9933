"""Predictor tests run torch on one thread: the box is shared, and small ops thrash with two."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield
