"""The offloading store gives the resident store's results: every family, policy and budget.

Same greedy tokens and logits within fp tolerance; the cache is really exercised (misses, copies
and evictions happen with budgets below the expert count), and an expert in use is never evicted.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.factory import expert_store_factory
from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.experts.policies import LRUPolicy, PredictedPolicy
from moe_serve.models import ForwardBatch, load_model
from tests.models.tiny_checkpoints import FAMILIES

PROMPT = [5, 17, 3, 99, 42, 7, 64, 12]


def greedy(model, prompt, n):
    """Greedy continuation and the logits of every step [n, V]."""
    logits, ctx, toks, all_logits = model(ForwardBatch.single(prompt)), len(prompt), [], []
    for _ in range(n):
        all_logits.append(logits[0])
        t = int(logits[0].argmax())
        toks.append(t)
        logits = model(ForwardBatch.single([t], context_len=ctx))
        ctx += 1
    return toks, torch.stack(all_logits)


def run(path, factory=None, n=6):
    model = load_model(path, expert_store_factory=factory)
    model.allocate_kv_cache(2, 64)
    with torch.no_grad():
        return greedy(model, PROMPT, n), model.store


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_matches_resident(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    (ref_toks, ref_logits), _ = run(path)
    for cfg in (ExpertCacheConfig(expert_cache_slots=3, cache_policy="lru", cpu_experts="off"),
                ExpertCacheConfig(expert_cache_slots=5, cache_policy="predicted", cpu_experts="on")):
        (toks, logits), store = run(path, expert_store_factory(cfg))
        assert isinstance(store, OffloadExpertStore)
        m = store.metrics()
        assert toks == ref_toks, (family, cfg.cache_policy)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert m["misses"] > 0 and m["hits"] + m["misses"] > 0
        if cfg.cpu_experts == "off":
            # a miss is copied in, or run from the host when a prefill step needs more experts than slots
            assert m["copies"] - m["prefetch_issued"] + m["cpu_computed"] == m["misses"] and m["copies"] > 0
        else:  # the compute device is the CPU: misses run where they lie, nothing is copied
            assert m["cpu_computed"] == m["misses"] and m["copies"] == 0 and m["prefetch_issued"] == 0
            assert store.in_place_only and store.routing_hook is None
        store.close()


@pytest.mark.parametrize("policy", ["lru", "lfu", "predicted"])
@pytest.mark.parametrize("slots", [2, 7, 40])
def test_any_policy_any_budget(policy, slots, tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    (ref_toks, ref_logits), _ = run(path, n=8)
    cfg = ExpertCacheConfig(expert_cache_slots=slots, cache_policy=policy, cpu_experts="off", cache_per_layer=False)
    (toks, logits), store = run(path, expert_store_factory(cfg), n=8)
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    m = store.metrics()
    total = store.num_moe_layers * store.num_experts
    assert m["capacity"] == min(slots, total)
    if slots < total:
        assert m["copies"] > min(slots, total)  # evictions happened: more copies than slots
    store.close()


def test_mmap_host_and_per_layer(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    (ref_toks, ref_logits), _ = run(path)
    cfg = ExpertCacheConfig(expert_cache_slots=6, cache_policy="lru", cpu_experts="off",
                            host_memory="mmap", cache_per_layer=True)
    (toks, logits), store = run(path, expert_store_factory(cfg))
    assert store.host == "mmap" and store.cache.per_layer
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


class _Source:
    """Four random experts of one layer, as the loader's ExpertSource hands them out."""

    num_moe_layers, num_experts = 2, 4

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w = {(l, e): (torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g))
                  for l in range(2) for e in range(4)}

    def get(self, l, e):
        return self.w[l, e]


def test_in_use_expert_never_evicted_and_prefetch_counts():
    src = _Source()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off")
    store.begin_layer(0, [0, 1, 2])  # fills all three slots
    store.prefetch(1, [3])  # every slot holds an expert in use: the prefetch must not evict one
    assert not store.cache.resident(1 * 4 + 3)
    assert all(store.cache.resident(g) for g in (0, 1, 2))
    for e in (0, 1, 2):
        gu, dn = store.get(0, e)
        assert torch.equal(gu, src.w[0, e][0]) and torch.equal(dn, src.w[0, e][1])
    store.end_layer(0)
    store.prefetch(1, [3])  # now allowed: the victim is not in use
    slot = int(store.cache.slot_of[1 * 4 + 3])
    store.copier.wait(int(store.ticket[slot]), slot)  # landed before it is needed: a used prefetch
    store.begin_layer(1, [3])
    assert torch.equal(store.get(1, 3)[0], src.w[1, 3][0])
    m = store.metrics()
    assert m["prefetch_issued"] == 1 and m["prefetch_used"] == 1 and m["hits"] == 1 and m["misses"] == 3
    with pytest.raises(KeyError, match="not resident"):
        store.get(1, 0)
    store.close()


def test_bad_budget_names_the_field():
    with pytest.raises(ValueError, match="expert_cache.expert_cache_gb"):
        ExpertCacheConfig(expert_cache_gb=-1.0)
    with pytest.raises(ValueError, match="expert_cache.cache_policy"):
        ExpertCacheConfig(cache_policy="belady")
    with pytest.raises(ValueError, match="capacity must lie in"):
        OffloadExpertStore(_Source(), torch.float32, "cpu", capacity=0, policy=LRUPolicy(), top_k=2, cpu_experts="off")


def test_thread_copier_copies_in_order_and_reports_errors():
    from moe_serve.experts.copier import ThreadCopier

    c = ThreadCopier(4)
    dst = torch.zeros(4, 1000)
    tickets = [c.submit([(dst[i % 4], torch.full((1000,), float(i)))], i % 4) for i in range(12)]
    for i in range(8, 12):
        c.wait(tickets[i], i % 4)
    assert all(c.ready(t, i % 4) for i, t in enumerate(tickets))
    assert dst[:, 0].tolist() == [8.0, 9.0, 10.0, 11.0]  # the last copy into each slot wins
    bad = c.submit([(torch.zeros(3), torch.zeros(4))], 0)  # shape mismatch: fails in the worker
    with pytest.raises(RuntimeError, match="expert copy failed"):
        c.wait(bad, 0)
    c.close()


def test_thread_copier_runs_demand_first_then_by_need():
    """Queued while the worker is held: the demand copy runs first, then the promoted prefetch, then
    the rest by need clock; a cancelled copy and a superseded one (same slot) never run."""
    from moe_serve.experts.copier import ThreadCopier

    order = []

    class Dst:  # a destination that records when its copy ran
        def __init__(self, name):
            self.name = name

        def copy_(self, src):
            order.append(self.name)

    c = ThreadCopier(6)
    with c._cv:  # the worker cannot pop until everything is queued
        t9 = c.submit([(Dst("p9"), None)], 0, need=9)
        c.submit([(Dst("p3"), None)], 1, need=3)
        late = c.submit([(Dst("p5"), None)], 2, need=5)
        cut = c.submit([(Dst("p4"), None)], 3, need=4)
        c.submit([(Dst("demand"), None)], 4)
        assert c.cancel(cut, 3) and not c.cancel(cut, 3)  # its expert was evicted before the copy started
        assert c.promote(late, 2)  # needed before its copy started
        c.submit([(Dst("p7-old"), None)], 5, need=7)
        t8 = c.submit([(Dst("p8-new"), None)], 5, need=8)  # a new copy into slot 5 supersedes the queued one
        assert c.queued_prefetches() == 3
    c.wait(t9, 0)
    c.wait(t8, 5)
    assert order == ["demand", "p5", "p3", "p8-new", "p9"]
    assert not c.promote(late, 2) and c.ready(late, 2)
    with pytest.raises(RuntimeError, match="cancelled"):
        c.wait(cut, 3)
    c.close()


def test_prefetch_not_started_when_needed_is_a_late_miss():
    """The copy thread is held, so the prefetch of (1, 3) is still queued when layer 1 needs it: it
    counts as a miss (as in the replay's demand-first order), is promoted to a demand copy, and
    `get` returns the right weights once it lands."""
    src = _Source()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off")
    store.begin_layer(0, [0])
    store.get(0, 0)
    store.end_layer(0)
    with store.copier._cv:  # the worker cannot start a copy until we let go
        store.prefetch(1, [3])
        assert store.copier.queued_prefetches() == 1
        store.begin_layer(1, [3])
    assert torch.equal(store.get(1, 3)[1], src.w[1, 3][1])
    store.end_layer(1)
    m = store.metrics()
    assert m["misses"] == 2 and m["hits"] == 0 and m["prefetch_late"] == 1 and m["prefetch_used"] == 0
    assert m["copies"] == 2  # the prefetch's copy became the demand copy: not copied twice
    store.close()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_on_demand_baseline_matches_resident(family, tiny_checkpoint):
    """The no-cache baseline copies every routed expert of every step, and computes the same bits."""
    from moe_serve.experts.ondemand import OnDemandExpertStore

    path = tiny_checkpoint(family)
    (ref_toks, ref_logits), resident = run(path)
    model = load_model(path)
    model.store = store = OnDemandExpertStore(resident.gate_up, resident.down, "cpu")
    model.allocate_kv_cache(2, 64)
    with torch.no_grad():
        toks, logits = greedy(model, PROMPT, 6)
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    m = store.metrics()
    assert m["copies"] > 0 and m["bytes_moved"] == m["copies"] * store.expert_bytes and m["hit_rate"] == 0.0
