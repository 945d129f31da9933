"""Shared fixtures: the shared data directory, tiny per-family checkpoints, one torch thread."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """/work/shared (the repo's ../shared): corpus, traces. Skips when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data directory {SHARED} is absent (needed for this test)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(family, **overrides) -> directory of a random save_pretrained checkpoint.

    Cached per (family, overrides) for the session. Families: see tests/models/tiny_checkpoints.py."""
    from tests.models.tiny_checkpoints import make_tiny_checkpoint

    cache: dict = {}

    def make(family: str, seed: int = 0, **overrides) -> Path:
        key = (family, seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            cache[key] = make_tiny_checkpoint(family, tmp_path_factory.mktemp(family), seed=seed, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Mixtral checkpoint (fp32) with a trained byte-level BPE tokenizer (engine, tracing tests)."""
    from tests.engine.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mixtral"))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    from tests.engine.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3"), family="qwen3_moe", num_experts=8, top_k=2)


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test: tiny ops gain nothing from threads, and on a shared
    CPU OpenMP regions stall waiting for a descheduled thread. Directories opt in from their conftest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
