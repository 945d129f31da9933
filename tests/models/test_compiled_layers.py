"""The per-layer compiled decode step (models/compiled_layers.py), taken for any store but the resident
one: against the eager model with the same store, the same logits (float rounding apart), expert
choices, store accesses and hook calls; routing replay; and a graph failing in the middle of a step."""
from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.factory import expert_store_factory
from moe_serve.models import ForwardBatch, load_model
from moe_serve.models.compiled_layers import CompiledLayers, layer_front
from moe_serve.tracing.load import ExpertLoadCounter
from tests.models.test_compiled_decode import PROMPTS, RecordIds, decodes, run

LRU3 = ExpertCacheConfig(expert_cache_slots=3, cache_policy="lru", cpu_experts="off", cache_admission="always")


def offloaded(path, **kw):
    model = load_model(path, expert_store_factory=expert_store_factory(LRU3), **kw)
    model.allocate_kv_cache(4, 64)
    return model


@pytest.mark.parametrize("family", ["mixtral_window", "qwen2_moe", "qwen3_moe"])
def test_offloading_store_compiled_per_layer_matches_eager(tiny_checkpoint, family):
    """mixtral_window decodes past its window; qwen2_moe has a dense layer (its own graph), a shared
    expert with its gate and a qkv bias; qwen3_moe per-head q/k norms."""
    path = tiny_checkpoint(family)
    eager, compiled = offloaded(path), offloaded(path)
    assert compiled.enable_compiled_decode(max_batch=4) is None
    assert isinstance(compiled.compiled, CompiledLayers)
    steps = 5
    want_logits, want_ids = run(eager, steps)
    got_logits, got_ids = run(compiled, steps)
    assert compiled.compiled.failed is None and compiled.compiled.steps == 2 * steps
    for want, got in zip(want_logits, got_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    for want, got in zip(want_ids, got_ids):
        assert all(torch.equal(w, g) for w, g in zip(want, got))
    a, b = eager.store.metrics(), compiled.store.metrics()  # the store saw the same accesses, in order
    assert (a["hits"], a["misses"], a["copies"]) == (b["hits"], b["misses"], b["copies"]) and a["misses"] > 0


def test_replayed_routing_and_the_warm_up(tiny_checkpoint):
    """Hooks that replace the routing run between the graphs (the whole-step graph cannot take them);
    the warm-up's throwaway decodes reach no hook."""
    from moe_serve.tracing.replay import TraceReplay
    from predictors.traces import RoutingTrace
    import numpy as np

    path = tiny_checkpoint("qwen3_moe")
    eager, compiled = offloaded(path), offloaded(path)
    spec = eager.spec
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(spec.num_experts, spec.top_k, replace=False) for _ in range(spec.num_moe_layers)])
                    for _ in range(64)])  # [T, L, K]
    trace = RoutingTrace(experts=ids.astype(np.int16), weights=np.full(ids.shape, 0.5, np.float16),
                         seq_offsets=np.array([0, 32, 64]), num_experts=spec.num_experts)
    counter = ExpertLoadCounter(spec.num_moe_layers, spec.num_experts)
    compiled.hooks = counter
    assert compiled.enable_compiled_decode(max_batch=4, warm_up=True) is None
    assert int(counter.counts.sum()) == 0
    graphs = counters["stats"]["unique_graphs"]
    for m in (eager, compiled):
        m.hooks = TraceReplay(trace, spec.num_moe_layers, spec.num_experts, spec.top_k)
    want, _ = run(eager, 3)
    got, _ = run(compiled, 3)
    assert compiled.compiled.steps == 6
    assert counters["stats"]["unique_graphs"] == graphs  # one graph for every layer, compiled at warm-up
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("failing_layer", [0, 1])
def test_a_graph_failing_mid_step_finishes_the_step_eagerly(tiny_checkpoint, caplog, failing_layer):
    """Failing at the first layer: nothing has seen the step, the eager model runs it. Later: the
    layers already run stay done, the rest run the same function eagerly; either way every hook sees
    each layer once, and later steps are eager."""
    path = tiny_checkpoint("mixtral")
    eager, model = offloaded(path), offloaded(path)
    for m in (eager, model):
        m(ForwardBatch.single(PROMPTS[0], slot=0))
    model.enable_compiled_decode(max_batch=2)
    calls = []

    def flaky(layer, *args):
        calls.append(layer)
        if len(calls) - 1 == failing_layer:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return layer_front(layer, *args)

    model.compiled._front = flaky
    model.hooks = RecordIds()
    with caplog.at_level(logging.WARNING, logger="moe_serve.models.compiled_layers"):
        got = model(decodes([5], (0,), (6,)))
    torch.testing.assert_close(got, eager(decodes([5], (0,), (6,))), rtol=1e-5, atol=1e-5)
    assert "C++ compiler" in model.compiled.failed and "compiled decode disabled" in caplog.text
    assert all(len(v) == 1 for v in model.hooks.ids.values()) and len(model.hooks.ids) == model.spec.num_moe_layers
    assert model.compiled.steps == (0 if failing_layer == 0 else 1)
    assert not model.compiled.accepts(decodes([6], (0,), (7,)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton kernels, the stream copier)")
def test_offloading_store_compiled_per_layer_on_cuda(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    eager, compiled = offloaded(path, device="cuda"), offloaded(path, device="cuda")
    assert compiled.enable_compiled_decode(max_batch=4, warm_up=True) is None
    want_logits, want_ids = run(eager, 3)
    got_logits, got_ids = run(compiled, 3)
    assert compiled.compiled.failed is None and compiled.compiled.steps == 6
    for want, got in zip(want_logits, got_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for want, got in zip(want_ids, got_ids):
        assert all(torch.equal(w, g) for w, g in zip(want, got))
