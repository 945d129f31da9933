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


def test_reuse_trace_fits_the_predicted_policys_reuse_forecast(tiny_checkpoint, tmp_path):
    """`expert_cache.reuse_trace` (--reuse-trace) fits the learned reuse forecast on that trace at
    start-up and hands it to the predicted policy (what cache-sim --reuse replays); the tokens stay the
    resident store's. A trace of another shape, an unreadable or too short one, or a policy that would
    ignore it is refused, naming the field."""
    import numpy as np

    from moe_serve.experts.policies.reuse import fit_reuse
    from predictors.traces import RoutingTrace

    def save(name, T, L=3, E=8):
        x = np.random.default_rng(T).integers(0, E, size=(T, L, 2)).astype(np.int16)
        x[:, :, 1] = (x[:, :, 0] + 1) % E  # two distinct experts per token and layer
        RoutingTrace(x, np.ones(x.shape, np.float16), np.array([0, T]), E).save(tmp_path / name)
        return str(tmp_path / name), x

    path, x = save("fit.npz", 60)
    ckpt = tiny_checkpoint("mixtral")  # 3 MoE layers x 8 experts, top-2
    cfg = ExpertCacheConfig(expert_cache_slots=6, cache_policy="predicted", cpu_experts="off", reuse_trace=path)
    (toks, _), store = run(ckpt, expert_store_factory(cfg))
    np.testing.assert_array_equal(store.policy.reuse_weights, fit_reuse(x.astype(np.int64), 8))
    assert toks == run(ckpt)[0][0]
    store.close()
    plain = ExpertCacheConfig(expert_cache_slots=6, cache_policy="predicted", cpu_experts="off")
    (_, _), store = run(ckpt, expert_store_factory(plain))
    assert store.policy.reuse_weights is None
    store.close()

    for bad, message in [(save("wide.npz", 60, E=16)[0], r"has \(MoE layers, experts\) = \(3, 16\), the model has \(3, 8\)"),
                         (save("short.npz", 3)[0], r"fitted on a trace of >= 5 tokens, got 3"),
                         (str(tmp_path / "absent.npz"), "absent.npz")]:
        cfg = ExpertCacheConfig(expert_cache_slots=6, cache_policy="predicted", cpu_experts="off", reuse_trace=bad)
        with pytest.raises(ValueError, match=r"expert_cache.reuse_trace: .*" + message):
            run(ckpt, expert_store_factory(cfg))
    with pytest.raises(ValueError, match=r"expert_cache.reuse_trace must be unset unless cache_policy is predicted"):
        ExpertCacheConfig(expert_cache_slots=6, cache_policy="lru", reuse_trace=path)
