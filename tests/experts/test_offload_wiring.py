"""The offloading store's wiring: config options that reach it, its copy thread's lifetime, a stacked
source shared rather than copied, the predictor wired to the routers, and when prefetches start.
(Split out of test_offload.py, which keeps the comparisons with the resident store.)"""
from __future__ import annotations

import time

import pytest
import torch

from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.factory import expert_store_factory
from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.experts.policies import LRUPolicy
from tests.experts.sources import TinySource, settle
from tests.experts.test_offload import run


@pytest.mark.parametrize("admission", ["always", "reuse", "auto"])
def test_cache_admission_comes_from_the_config(admission, tiny_checkpoint):
    """`expert_cache.cache_admission` (the --cache-admission flag) reaches the store; auto is reuse on CPU."""
    cfg = ExpertCacheConfig(expert_cache_slots=3, cache_policy="lru", cpu_experts="off", cache_admission=admission)
    (toks, _), store = run(tiny_checkpoint("mixtral"), expert_store_factory(cfg))
    assert store.admit == ("reuse" if admission == "auto" else admission)
    assert toks == run(tiny_checkpoint("mixtral"))[0][0]
    store.close()


def test_closing_or_dropping_the_store_stops_its_copy_thread():
    """close() stops and joins the store's copy worker; a store dropped without close() (the
    engine drops its model so) stops it too, once collected: the thread never outlives the store."""
    import gc

    for drop in (False, True):
        store = OffloadExpertStore(TinySource(), torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2,
                                   cpu_experts="off", admit="always")
        store.begin_layer(0, [0, 1])
        store.get(0, 0), store.get(0, 1)
        store.end_layer(0)
        worker = store.copier._thread
        assert worker.is_alive()
        if drop:
            del store
            gc.collect()
        else:
            store.close()
        assert not worker.is_alive()


def test_stacked_source_is_shared_with_the_store_not_copied():
    from moe_serve.experts.store import StackedExperts, expert_forward, stack_experts

    src = TinySource()
    gu, dn = stack_experts(src, torch.float32)  # a source read expert by expert is copied
    stacked = StackedExperts(gu, dn)
    gu2, dn2 = stack_experts(stacked, torch.float32)
    assert [t.data_ptr() for t in gu + dn] == [t.data_ptr() for t in gu2 + dn2]
    gu3, _ = stack_experts(stacked, torch.float64)  # another dtype: a real copy
    assert gu3[0].dtype == torch.float64 and gu3[0].data_ptr() != gu[0].data_ptr()
    torch.testing.assert_close(gu3[0].float(), gu[0])
    # an offloading store over it copies from those tensors and computes what the experts compute
    store = OffloadExpertStore(stacked, torch.float32, "cpu", 3, LRUPolicy(), top_k=2, cpu_experts="off")
    assert store.host_gu[1].data_ptr() == gu[1].data_ptr()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    for layer, e in ((0, 1), (1, 3), (1, 0)):
        counts = torch.zeros(4, dtype=torch.long)
        counts[e] = 3
        torch.testing.assert_close(store.run(layer, x, counts), expert_forward(x, *src.get(layer, e)))
    store.close()


def test_stacked_source_rejects_mismatched_layers():
    from moe_serve.experts.store import StackedExperts

    with pytest.raises(ValueError, match=r"layer 1 has gate_up \(4, 16, 8\) and down \(4, 8, 7\)"):
        StackedExperts([torch.zeros(4, 16, 8)] * 2, [torch.zeros(4, 8, 8), torch.zeros(4, 8, 7)])


def test_load_model_wires_the_stores_predictor_to_the_routers(tiny_checkpoint, tmp_path):
    """Loaded without the engine, a store that prefetches from a predictor still sees every router's
    choice (load_model chains its routing hook after the model's own hooks) and changes no token."""
    from tests.experts.sources import fitted_predictor

    path = tiny_checkpoint("mixtral")  # 3 MoE layers x 8 experts, top-2
    (ref_toks, ref_logits), _ = run(path)
    pred = fitted_predictor(tmp_path / "pred.safetensors", 3, 8, 2)
    cfg = ExpertCacheConfig(expert_cache_slots=3, cache_policy="predicted-prefetch", predictor=pred, cpu_experts="off")
    (toks, logits), store = run(path, expert_store_factory(cfg))
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert store.routing_hook is not None and store.metrics()["prefetch_issued"] > 0
    store.close()


def test_prefetch_from_comes_from_the_config_and_changes_no_token(tiny_checkpoint, tmp_path):
    """`expert_cache.prefetch_from` (--prefetch-from) reaches the policy; skipping the nearest layer's
    hints only changes which copies run, never what the model computes."""
    from tests.experts.sources import fitted_predictor

    path = tiny_checkpoint("mixtral")  # 3 MoE layers x 8 experts, top-2
    (ref_toks, ref_logits), _ = run(path)
    pred = fitted_predictor(tmp_path / "pred.safetensors", 3, 8, 2, lookahead=2)
    cfg = ExpertCacheConfig(expert_cache_slots=4, cache_policy="predicted-prefetch", predictor=pred, cpu_experts="off",
                            prefetch_lookahead=2, prefetch_from=2)
    (toks, logits), store = run(path, expert_store_factory(cfg))
    assert store.policy.prefetch_from == 2 and store.policy.lookahead == 2
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    store.close()


@pytest.mark.parametrize("when", ["idle", "always"])
def test_idle_only_prefetch_is_deferred_while_a_copy_runs(when):
    """prefetch_when="idle": a hint that comes while a copy is running (or queued) is not copied
    (counted in prefetch_deferred); once the copier is idle the same hint is. "always" copies it."""
    from tests.experts.sources import SlowSource

    # host="mmap": copies read the slow source itself (a host copy would be stacked, fast, at construction,
    # and the copy could finish before the hint comes: the test then raced the copier)
    store = OffloadExpertStore(SlowSource(0.05), torch.float32, "cpu", 4, LRUPolicy(), top_k=2, cpu_experts="off",
                               admit="always", prefetch_when=when, host="mmap")
    store.begin_layer(0, [0])  # a demand miss: the worker copies it (two 50 ms copies)
    assert store.copier.busy()
    store.prefetch(1, [1])
    m = store.metrics()
    assert (m["prefetch_issued"], m["prefetch_deferred"]) == ((0, 1) if when == "idle" else (1, 0))
    settle(store.copier, (int(store.ticket[int(store.cache.slot_of[0])]), int(store.cache.slot_of[0])))
    store.end_layer(0)
    while store.copier.busy():  # "always": its prefetch is still copying
        time.sleep(0.01)
    store.prefetch(1, [1, 2])  # idle now: the first hint is copied; then the copier is busy again
    m = store.metrics()
    assert m["prefetch_issued"] == (1 if when == "idle" else 2)
    store.close()


def test_prefetch_when_is_checked():
    with pytest.raises(ValueError, match="expert_cache.prefetch_when must be always or idle"):
        OffloadExpertStore(TinySource(), torch.float32, "cpu", 4, LRUPolicy(), top_k=2, prefetch_when="early")
    with pytest.raises(ValueError, match="prefetch_when"):
        ExpertCacheConfig(expert_cache_slots=4, prefetch_when="early")
