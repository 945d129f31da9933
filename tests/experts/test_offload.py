"""The offloading store gives the resident store's results: every family, policy and budget.

Same greedy tokens and logits within fp tolerance; the cache is really exercised (misses, copies
and evictions happen with budgets below the expert count), and an expert in use is never evicted.
"""
from __future__ import annotations

import pytest
import torch

from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.copier import CopyError, StreamCopier
from moe_serve.experts.factory import expert_store_factory
from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.experts.policies import LRUPolicy
from moe_serve.models import ForwardBatch, load_model
from tests.experts.sources import BrokenSource, TinySource, settle
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


def run(path, factory=None, n=6, device="cpu", dtype="float32"):
    """((greedy tokens, their logits [n, V] on the host), the model's expert store)."""
    model = load_model(path, dtype=dtype, device=device, expert_store_factory=factory)
    model.allocate_kv_cache(2, 64)
    with torch.no_grad():
        toks, logits = greedy(model, PROMPT, n)
    if model.store.device.type == "cuda":
        torch.cuda.synchronize()
    return (toks, logits.cpu()), model.store


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_matches_resident(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    (ref_toks, ref_logits), _ = run(path)
    off = dict(expert_cache_slots=3, cache_policy="lru", cpu_experts="off")
    for cfg in (ExpertCacheConfig(**off, cache_admission="always"), ExpertCacheConfig(**off, cache_admission="reuse"),
                ExpertCacheConfig(expert_cache_slots=5, cache_policy="predicted", cpu_experts="on")):
        (toks, logits), store = run(path, expert_store_factory(cfg))
        assert isinstance(store, OffloadExpertStore)
        m = store.metrics()
        assert toks == ref_toks, (family, cfg.cache_policy)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert m["misses"] > 0 and m["hits"] + m["misses"] > 0
        if cfg.cpu_experts == "off":
            # a miss is copied in (to a slot, or streamed through the staging buffer), or run from the
            # host when a prefill step needs more experts than slots (cpu_overflow: never by choice here)
            assert m["copies"] - m["prefetch_issued"] + m["cpu_overflow"] == m["misses"] and m["copies"] > 0
            assert m["cpu_computed"] == 0
        else:  # the compute device is the CPU: misses run where they lie, nothing is copied
            assert m["cpu_computed"] == m["misses"] and m["copies"] == 0 and m["prefetch_issued"] == 0
            assert store.in_place_only and store.routing_hook is None
        store.close()


@pytest.mark.parametrize("admit", ["always", "reuse"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "predicted"])
@pytest.mark.parametrize("slots", [2, 7, 40])
def test_any_policy_any_budget(policy, slots, admit, tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    (ref_toks, ref_logits), _ = run(path, n=8)
    cfg = ExpertCacheConfig(expert_cache_slots=slots, cache_policy=policy, cpu_experts="off", cache_per_layer=False,
                            cache_admission=admit)
    (toks, logits), store = run(path, expert_store_factory(cfg), n=8)
    assert store.admit == admit
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    m = store.metrics()
    total = store.num_moe_layers * store.num_experts
    assert m["capacity"] == min(slots, total)
    if slots < total:
        assert m["copies"] > min(slots, total)  # evictions happened: more copies than slots
        if admit == "reuse":  # once the slots are full, experts not used in the last token stream
            assert m["streamed"] > 0
    else:  # every expert fits: each is copied into a slot once and kept (streaming it would copy it twice)
        assert m["streamed"] == 0 and m["copies"] == int((store.cache.slot_of >= 0).sum())
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


def test_in_use_expert_never_evicted_and_prefetch_counts():
    src = TinySource()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               admit="always")
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
        OffloadExpertStore(TinySource(), torch.float32, "cpu", capacity=0, policy=LRUPolicy(), top_k=2,
                           cpu_experts="off")


def test_prefetch_not_started_when_needed_is_a_late_miss():
    """The copy thread is held, so the prefetch of (1, 3) is still queued when layer 1 needs it: it
    counts as a miss (as in the replay's demand-first order), is promoted to a demand copy, and
    `get` returns the right weights once it lands."""
    src = TinySource()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               admit="always")
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


def test_admission_streams_experts_not_used_lately():
    """admit="reuse", every slot taken: a miss whose expert was not used in the last `admit_window`
    tokens is copied into the staging buffer and computed there, never given a slot; used again
    within the window, it takes a slot. Both give the expert's own output."""
    from moe_serve.experts.store import expert_forward

    src = TinySource()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               admit="reuse", admit_window=1)
    x = torch.randn(2, 8)
    store.begin_layer(0, [0, 2, 3])  # first uses take the three free slots (no one evicted)
    store.end_layer(0)
    store.reset_metrics()
    for token in range(3):
        for layer in range(2):
            store.begin_layer(layer, [1])
            y = store.compute_expert(layer, 1, x)
            torch.testing.assert_close(y, expert_forward(x, *src.w[layer, 1]))
            assert store.cache.resident(layer * 4 + 1) == (token > 0)  # first use streamed, then kept
            store.end_layer(layer)
    m = store.metrics()
    assert m["streamed"] == 2 and m["copies"] == 4 and m["misses"] == 4 and m["hits"] == 2
    assert m["bytes_moved"] == 4 * store.expert_bytes
    with pytest.raises(ValueError, match="admit must be auto, always or reuse"):
        OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, admit="sometimes")
    store.close()


def _store_with(copier: str, src, **kw) -> OffloadExpertStore:
    """A CPU store with the thread copier it picks, or with the CUDA one (run on torch.cpu's stand-ins)."""
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               host="mmap", admit="always", **kw)
    if copier == "stream":
        store.copier.close()
        store.copier = StreamCopier(store.device, store.capacity)
    return store


@pytest.mark.parametrize("copier", ["thread", "stream"])
def test_failed_copy_forgets_the_expert_and_the_store_keeps_serving(copier):
    """Either copier: a failed demand copy is a CopyError from `get`, and a failed prefetch one from
    the next `get` whichever expert it fetches; either way the failed slot's expert is forgotten
    (no slot claims weights it does not hold) and the store keeps serving."""
    src = BrokenSource()
    store = _store_with(copier, src)
    store.begin_layer(1, [2])
    with pytest.raises(CopyError, match="expert copy failed"):
        store.get(1, 2)
    assert not store.cache.resident(1 * 4 + 2)
    store.end_layer(1)
    store.begin_layer(0, [0, 1])
    assert torch.equal(store.get(0, 1)[0], src.w[0, 1][0])
    store.end_layer(0)
    store.prefetch(1, [2])  # fails in the worker, or when issued from the CUDA copier's host queue
    slot = int(store.cache.slot_of[1 * 4 + 2])
    settle(store.copier, (int(store.ticket[slot]), slot))
    store.begin_layer(0, [3])
    with pytest.raises(CopyError, match="expert copy failed") as info:
        store.get(0, 3)
    assert info.value.slot == slot and not store.cache.resident(1 * 4 + 2)
    assert torch.equal(store.get(0, 3)[1], src.w[0, 3][1])  # reported once; (0, 3) itself landed
    store.end_layer(0)
    store.close()


def test_failed_prefetch_reported_to_a_streamed_expert_forgets_its_expert():
    """The worker's failure is reported to the next waiter, whichever copy it waits on: when that
    is a streamed expert's staging buffer, the failed slot's expert must still be forgotten (else
    its next use is a hit on weights that never landed)."""
    from moe_serve.experts.store import expert_forward

    src = BrokenSource()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=1, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               host="mmap", admit="reuse")
    store.prefetch(1, [2])  # takes the only slot, and fails in the worker
    slot = int(store.cache.slot_of[1 * 4 + 2])
    settle(store.copier, (int(store.ticket[slot]), slot))
    x = torch.randn(2, 8)
    store.begin_layer(0, [0])
    assert 0 * 4 + 0 in store._streamed  # never used, no free slot: through the staging ring
    with pytest.raises(CopyError, match="expert copy failed") as info:
        store.compute_expert(0, 0, x)
    assert info.value.slot == slot and not store.cache.resident(1 * 4 + 2)
    store.begin_layer(0, [0])  # and the store keeps serving
    torch.testing.assert_close(store.compute_expert(0, 0, x), expert_forward(x, *src.w[0, 0]))
    store.end_layer(0)
    store.close()
