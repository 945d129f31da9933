"""Edge cases of the offloading store: host tiers in another dtype, failed host reads, shutdown with
copies queued, and budgets at their limits (the error names the field and the minimum)."""
from __future__ import annotations

import pytest
import torch

from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.factory import expert_store_factory
from tests.experts.test_offload import run


def test_mmap_experts_computed_in_place_use_the_compute_dtype(tiny_checkpoint):
    """host=mmap hands out the checkpoint's own tensors (bfloat16 here): an expert computed where it
    lies must still run in the model's dtype (float32), as the resident store's converted copy does;
    in bfloat16 the logits moved by ~6e-3."""
    path = tiny_checkpoint("mixtral", dtype=torch.bfloat16)
    (ref_toks, ref_logits), _ = run(path, n=4)
    cfg = ExpertCacheConfig(expert_cache_slots=3, cache_policy="lru", host_memory="mmap", cpu_experts="on")
    (toks, logits), store = run(path, expert_store_factory(cfg), n=4)
    assert store.host == "mmap" and store.metrics()["cpu_computed"] > 0
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    store.close()
