"""What the offloading store's counters mean: each miss is counted once, under why it ran where it ran."""
from __future__ import annotations

import torch

from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.cost import ExpertCosts
from moe_serve.experts.factory import expert_store_factory
from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.experts.policies import LRUPolicy
from moe_serve.experts.store import expert_forward
from tests.experts.sources import TinySource
from tests.experts.test_offload import run


def test_capacity_overflow_is_not_counted_as_a_cost_model_choice():
    """cpu_computed is the misses computed where they lie by choice (the cost model, cpu_experts on,
    or a CPU device); a miss run on the host because every slot held an expert of the same step is
    cpu_overflow. Both were cpu_computed, so a cost model that never chose the CPU looked as if it did."""
    src = TinySource()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=2, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               admit="always")
    store.cpu_mode = "auto"  # the choice a GPU's cost model makes: a miss of 1 row is cheaper where it lies
    store.costs = ExpertCosts(store.expert_bytes, bandwidth=store.expert_bytes / 1e-3, device_s=(0.0, 1e-4),
                              cpu_s=(5e-4, 3e-4))  # copy 1.0 + 0.1/row ms, in place 0.5 + 0.3/row ms
    assert store.costs.compute_on_cpu(1) and not store.costs.compute_on_cpu(5)
    x = {e: torch.randn(rows, 8) for e, rows in ((0, 1), (1, 5), (2, 5), (3, 5))}
    store.begin_layer(0, [0, 1, 2, 3], [1, 5, 5, 5])  # 0: chosen in place; 1, 2: the 2 slots; 3: no slot left
    for e in store.compute_order(0, [0, 1, 2, 3]):
        torch.testing.assert_close(store.compute_expert(0, e, x[e]), expert_forward(x[e], *src.w[0, e]))
    store.end_layer(0)
    m = store.metrics()
    assert (m["misses"], m["cpu_computed"], m["cpu_overflow"], m["copies"]) == (4, 1, 1, 2)
    store.close()


def test_every_miss_is_a_copy_a_choice_or_an_overflow(tiny_checkpoint):
    """Through the model, 2 slots and top-2 routing over a prefill of 8 tokens: the prefill overflows
    (cpu_experts off: no miss is ever computed on the host by choice), decode steps do not."""
    path = tiny_checkpoint("mixtral")
    (ref_toks, ref_logits), _ = run(path, n=4)
    cfg = ExpertCacheConfig(expert_cache_slots=2, cache_policy="lru", cpu_experts="off", cache_admission="always")
    (toks, logits), store = run(path, expert_store_factory(cfg), n=4)
    m = store.metrics()
    assert m["cpu_computed"] == 0 and m["cpu_overflow"] > 0
    assert m["misses"] == m["copies"] + m["cpu_overflow"]
    assert toks == ref_toks and torch.equal(logits, ref_logits)
    store.close()
