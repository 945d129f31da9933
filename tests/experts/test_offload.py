"""The offloading store gives the resident store's results: every family, policy and budget.

Same greedy tokens and logits within fp tolerance; the cache is really exercised (misses, copies
and evictions happen with budgets below the expert count), and an expert in use is never evicted.
"""
from __future__ import annotations

import time

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
            # host when a prefill step needs more experts than slots
            assert m["copies"] - m["prefetch_issued"] + m["cpu_computed"] == m["misses"] and m["copies"] > 0
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
    if admit == "reuse":  # experts not used in the last token (admit_window=1) ran from the staging buffer
        assert store.metrics()["streamed"] > 0
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


def settle(copier, *tickets_slots):
    """Until these copies have landed at the worker's own pace (waiting would run a queued copy here)."""
    for _ in range(5000):
        if all(copier.ready(t, s) for t, s in tickets_slots):
            return
        time.sleep(0.001)


def test_in_use_expert_never_evicted_and_prefetch_counts():
    src = _Source()
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
        OffloadExpertStore(_Source(), torch.float32, "cpu", capacity=0, policy=LRUPolicy(), top_k=2, cpu_experts="off")


def test_thread_copier_copies_in_order_and_reports_errors():
    from moe_serve.experts.copier import CopyError, ThreadCopier

    c = ThreadCopier(4)
    dst = torch.zeros(4, 1000)
    tickets = [c.submit([(dst[i % 4], torch.full((1000,), float(i)))], i % 4, need=None if i % 3 else i)
               for i in range(12)]
    for i in range(8, 12):
        c.wait(tickets[i], i % 4)
    assert all(c.ready(t, i % 4) for i, t in enumerate(tickets[8:], 8))
    assert dst[:, 0].tolist() == [8.0, 9.0, 10.0, 11.0]  # the last copy into each slot wins
    bad = c.submit([(torch.zeros(3), torch.zeros(4))], 0)  # shape mismatch: fails in the waiting thread
    with pytest.raises(CopyError, match="expert copy failed") as info:
        c.wait(bad, 0)
    assert info.value.slot == 0 and info.value.ticket == bad
    bad = c.submit([(torch.zeros(3), torch.zeros(4))], 1, need=1)  # fails in the worker: reported to
    good = c.submit([(dst[2], torch.ones(1000))], 2, need=2)  # the next waiter, whichever copy it waits on
    settle(c, (bad, 1))
    with pytest.raises(CopyError, match="expert copy failed") as info:
        c.wait(good, 2)
    assert info.value.slot == 1 and info.value.ticket == bad and c.ready(bad, 1)
    c.wait(good, 2)  # reported once
    c.close()


def test_thread_copier_runs_demand_first_then_by_need_and_waiters_take_queued_copies():
    """Queued while the worker is held: the worker runs the demand copy first, then the promoted
    prefetch, then the rest by need clock; a cancelled copy and a superseded one (same slot) never
    run; a copy still queued when someone waits for it runs in the waiting thread. With
    worker_demand=False the worker leaves demand copies to their waiters."""
    import threading

    from moe_serve.experts.copier import ThreadCopier

    order = []

    class Dst:  # a destination that records when, and in which thread, its copy ran
        def __init__(self, name):
            self.name = name

        def copy_(self, src):
            order.append((self.name, threading.current_thread().name))

    me = threading.current_thread().name
    for worker_demand in (True, False):
        order.clear()
        c = ThreadCopier(7, worker_demand=worker_demand)
        with c._cv:  # the worker cannot pop until everything is queued
            t9 = c.submit([(Dst("p9"), None)], 0, need=9)
            c.submit([(Dst("p3"), None)], 1, need=3)
            late = c.submit([(Dst("p5"), None)], 2, need=5)
            cut = c.submit([(Dst("p4"), None)], 3, need=4)
            demand = c.submit([(Dst("demand"), None)], 4)
            assert c.cancel(cut, 3) and not c.cancel(cut, 3)  # its expert was evicted before the copy started
            assert c.promote(late, 2)  # needed before its copy started
            c.submit([(Dst("p7-old"), None)], 5, need=7)
            t8 = c.submit([(Dst("p8-new"), None)], 5, need=8)  # a new copy into slot 5 supersedes the queued one
            assert c.queued_prefetches() == 3
            mine = c.submit([(Dst("p1-waited"), None)], 6, need=1)
            c.wait(mine, 6)  # queued, not started: runs here, at once, though the worker is held
        assert order == [("p1-waited", me)]
        settle(c, (t9, 0), (t8, 5))
        worker = [n for n, th in order if th == "expert-copier"]
        if worker_demand:
            settle(c, (demand, 4), (late, 2))
            assert worker == ["demand", "p5", "p3", "p8-new", "p9"]
        else:
            assert worker == ["p3", "p8-new", "p9"]
            assert not c.ready(demand, 4) and not c.ready(late, 2)  # left to their waiters
            c.wait(late, 2)
            c.wait(demand, 4)
            assert order[-2:] == [("p5", me), ("demand", me)]
        assert not c.promote(late, 2) and c.ready(late, 2)
        with pytest.raises(RuntimeError, match="cancelled"):
            c.wait(cut, 3)
        c.close()


def test_thread_copier_counts_queued_prefetches_while_the_worker_pops():
    """`queued_prefetches` (the store asks it per prefetch) reads the queue the worker changes: it
    must hold the lock, or the count can see the dict change size mid-iteration (RuntimeError)."""
    import sys

    from moe_serve.experts.copier import ThreadCopier

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible
    c = ThreadCopier(32)
    dst, src = torch.zeros(32, 4), torch.ones(4)
    try:
        for _ in range(1000):
            for s in range(32):
                c.submit([(dst[s], src)], s, need=s)
                assert 0 <= c.queued_prefetches() <= 32
    finally:
        sys.setswitchinterval(old)
        c.close()


def test_thread_copier_waits_for_an_earlier_copy_into_the_slot():
    """A demand copy into a slot whose prefetch is still running in the worker starts only after
    it: the later copy's bytes win."""
    import threading

    from moe_serve.experts.copier import ThreadCopier

    started, go = threading.Event(), threading.Event()

    class Slow:  # the worker's copy into slot 0 runs until the test lets it go
        def copy_(self, src):
            started.set()
            go.wait(5)
            dst.copy_(torch.zeros(8))

    dst = torch.full((8,), -1.0)
    c = ThreadCopier(1)
    c.submit([(Slow(), None)], 0, need=1)
    assert started.wait(5)
    t = c.submit([(dst, torch.ones(8))], 0)  # the prefetch's expert was evicted; a demand copy follows
    threading.Timer(0.05, go.set).start()
    c.wait(t, 0)
    assert dst.tolist() == [1.0] * 8
    c.close()


def test_prefetch_not_started_when_needed_is_a_late_miss():
    """The copy thread is held, so the prefetch of (1, 3) is still queued when layer 1 needs it: it
    counts as a miss (as in the replay's demand-first order), is promoted to a demand copy, and
    `get` returns the right weights once it lands."""
    src = _Source()
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
    """admit="reuse": a miss whose expert was not used in the last `admit_window` tokens is copied
    into the staging buffer and computed there, never given a slot; used again within the window,
    it takes a slot. Both give the expert's own output."""
    from moe_serve.experts.store import expert_forward

    src = _Source()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               admit="reuse", admit_window=1)
    x = torch.randn(2, 8)
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


class _BrokenSource(_Source):
    def get(self, l, e):
        gu, dn = super().get(l, e)
        return (gu[:-1], dn) if (l, e) == (1, 2) else (gu, dn)  # a short gate_up: the copy fails


def test_failed_copy_forgets_the_expert_and_the_store_keeps_serving():
    from moe_serve.experts.copier import CopyError

    src = _BrokenSource()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               host="mmap", admit="always")
    store.begin_layer(1, [2])
    with pytest.raises(CopyError, match="expert copy failed"):
        store.get(1, 2)
    assert not store.cache.resident(1 * 4 + 2)  # no slot claims weights it does not hold
    store.end_layer(1)
    store.begin_layer(0, [0, 1])
    assert torch.equal(store.get(0, 1)[0], src.w[0, 1][0])
    store.end_layer(0)
    store.close()


def test_failed_prefetch_reported_to_a_streamed_expert_forgets_its_expert():
    """The worker's failure is reported to the next waiter, whichever copy it waits on: when that
    is a streamed expert's staging buffer, the failed slot's expert must still be forgotten (else
    its next use is a hit on weights that never landed)."""
    from moe_serve.experts.copier import CopyError
    from moe_serve.experts.store import expert_forward

    src = _BrokenSource()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               host="mmap", admit="reuse")
    store.prefetch(1, [2])  # fails in the worker
    slot = int(store.cache.slot_of[1 * 4 + 2])
    settle(store.copier, (int(store.ticket[slot]), slot))
    x = torch.randn(2, 8)
    store.begin_layer(0, [0])
    assert 0 * 4 + 0 in store._streamed  # never used: through the staging ring
    with pytest.raises(CopyError, match="expert copy failed") as info:
        store.compute_expert(0, 0, x)
    assert info.value.slot == slot and not store.cache.resident(1 * 4 + 2)
    store.begin_layer(0, [0])  # and the store keeps serving
    torch.testing.assert_close(store.compute_expert(0, 0, x), expert_forward(x, *src.w[0, 0]))
    store.end_layer(0)
    store.close()


def test_staging_ring_fills_ahead_in_any_order():
    """Each streamed expert's buffers hold its own weights when `get` returns, in the ring's order
    (the worker fills the next buffer while one is read) and out of it (a buffer is taken back
    from an expert that runs later, which is then copied again)."""
    from moe_serve.experts.copier import ThreadCopier
    from moe_serve.experts.staging import StagingRing

    srcs = [(torch.full((4, 3), float(j)), torch.full((3, 2), -float(j))) for j in range(5)]
    for order in ([0, 1, 2, 3, 4], [3, 0, 4, 2, 1]):
        c = ThreadCopier(3)
        ring = StagingRing(c, 1, 2, torch.zeros(4, 3), torch.zeros(3, 2))  # copier slots 1 and 2
        ring.start(srcs)
        for j in order:
            gu, dn = ring.get(j)
            assert torch.equal(gu, srcs[j][0]) and torch.equal(dn, srcs[j][1]), (order, j)
            ring.done(j)
        assert ring.owner == [-1, -1] and not ring.where
        c.close()


def test_copy_queue_order_supersede_cancel_promote_and_busy_slots():
    """The queue both copiers share: demand first in submission order, then prefetches by need;
    one queued copy per slot; a copy whose slot is busy waits until `resume`."""
    from moe_serve.experts.copy_queue import CopyQueue

    q = CopyQueue()
    q.push(1, 0, "p9", need=9)
    q.push(2, 1, "p3", need=3)
    q.push(3, 2, "p5", need=5)
    q.push(4, 3, "d", need=None)
    q.push(5, 4, "p4", need=4)
    q.push(6, 5, "p7", need=7)
    q.push(7, 5, "p8", need=8)  # supersedes p7 in slot 5
    assert q.take(5, 4) == "p4" and q.take(5, 4) is None  # cancelled
    assert q.promote(3, 2) and not q.promote(4, 3)  # a demand copy is not a prefetch to promote
    assert q.prefetches() == 3 and q.has(7, 5) and not q.has(6, 5)
    q.drop(0)  # a newer copy into slot 0 went past the queue
    out = []
    while (job := q.pop(busy={1})) is not None:
        out.append(job)
    assert out == [(3, 4, "d"), (2, 3, "p5"), (5, 7, "p8")]  # slot 1 busy: p3 waits
    q.resume(1)
    assert q.pop() == (1, 2, "p3") and q.pop() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (StreamCopier)")
def test_stream_copier_lands_cancels_and_promotes_on_cuda():
    """Prefetches wait on the host beyond `depth` (64 MB copies, so the queue fills); whatever
    cancel and promote report, every copy that was not cancelled lands, the cancelled one never."""
    from moe_serve.experts.copier import StreamCopier

    dev = torch.device("cuda")
    n = 1 << 24
    c = StreamCopier(dev, 6, depth=1)
    dst = torch.zeros(6, n, device=dev)
    src = [torch.full((n,), float(i)).pin_memory() for i in range(6)]
    t = [c.submit([(dst[i], src[i])], i, need=10 + i) for i in range(5)]
    cancelled = c.cancel(t[4], 4)  # True while still on the host
    c.promote(t[3], 3)  # issued now if still on the host
    d = c.submit([(dst[5], src[5])], 5)  # demand: on the stream at once
    for i in (0, 1, 2, 3):
        c.wait(t[i], i)
    c.wait(d, 5)
    c.release(range(6))
    torch.cuda.synchronize()
    assert dst[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 0.0 if cancelled else 4.0, 5.0]
    assert torch.equal(dst[3], src[3].to(dev)) and c.queued_prefetches() == 0
    c.close()


@pytest.mark.parametrize("admission", ["always", "reuse", "auto"])
def test_cache_admission_comes_from_the_config(admission, tiny_checkpoint):
    """`expert_cache.cache_admission` (the --cache-admission flag) reaches the store; auto is reuse on CPU."""
    cfg = ExpertCacheConfig(expert_cache_slots=3, cache_policy="lru", cpu_experts="off", cache_admission=admission)
    (toks, _), store = run(tiny_checkpoint("mixtral"), expert_store_factory(cfg))
    assert store.admit == ("reuse" if admission == "auto" else admission)
    assert toks == run(tiny_checkpoint("mixtral"))[0][0]
    store.close()
