"""cache_admission=reuse: a miss not used lately streams through the staging ring only when taking
a slot would evict someone; while a slot is free it is kept there (copied once, a hit on reuse)."""
from __future__ import annotations

import torch

from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.experts.policies import LRUPolicy
from moe_serve.experts.store import expert_forward
from tests.experts.sources import TinySource


def _step(store, src, layer, experts, x):
    """One MoE layer of one token through the store; each expert's output checked against its own weights."""
    store.begin_layer(layer, experts)
    for e in experts:
        torch.testing.assert_close(store.compute_expert(layer, e, x), expert_forward(x, *src.w[layer, e]))
    store.end_layer(layer)


def test_every_expert_fits_so_each_is_copied_once():
    """8 slots for 2 layers x 4 experts: nothing is ever evicted, so streaming a first use (and
    copying it again on its reuse) is pure waste. Each expert is copied once, then only hits."""
    src = TinySource()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=8, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               admit="reuse")
    x = torch.randn(2, 8)
    for _ in range(3):
        for layer in range(2):
            _step(store, src, layer, [1, 2], x)
    m = store.metrics()
    assert m["streamed"] == 0 and m["copies"] == 4 and m["misses"] == 4 and m["hits"] == 8
    assert m["bytes_moved"] == 4 * store.expert_bytes
    assert all(store.cache.resident(layer * 4 + e) for layer in range(2) for e in (1, 2))
    store.close()


def test_free_slots_are_filled_then_first_uses_stream():
    """3 slots: the first three first uses take the free slots; the fourth, in the same step as the
    third, finds none free and streams (it would evict an expert used a token ago)."""
    src = TinySource()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               admit="reuse")
    x = torch.randn(2, 8)
    _step(store, src, 0, [0, 1], x)
    _step(store, src, 1, [1, 2], x)
    m = store.metrics()
    assert m["streamed"] == 1 and m["copies"] == 4 and m["misses"] == 4
    assert [store.cache.resident(g) for g in (0, 1, 4 + 1, 4 + 2)] == [True, True, True, False]
    _step(store, src, 0, [0, 1], x)  # the next token: both kept, hits
    assert store.metrics()["hits"] == 2
    store.close()
