"""The recorder writes each row highest gate weight first, as the trace format says, whatever the router's order."""
import numpy as np
import torch

from moe_serve.models import load_model
from moe_serve.models.batch import ForwardBatch
from moe_serve.models.hooks import HookChain, RouterHooks
from moe_serve.models.moe import Router
from moe_serve.tracing.recorder import TraceRecorder


def test_rows_are_highest_weight_first_with_a_biased_router(tiny_checkpoint):
    """noaux_tc routing (DeepSeek-V3) picks experts by score + correction bias but weighs them by the
    score alone: rows came out in the biased order, so the weights were not descending and a replay
    into a smaller top_k kept the wrong experts (fit_routing keeps the first ones)."""
    model = load_model(tiny_checkpoint("deepseek_v3"))
    gen = torch.Generator().manual_seed(0)
    for router in (m for m in model.modules() if isinstance(m, Router)):
        router.e_score_correction_bias.copy_(torch.rand(router.num_experts, generator=gen) * 0.5)
    model.allocate_kv_cache(num_slots=1, max_len=32)
    spec = model.spec
    chosen = {}

    class Seen(RouterHooks):
        active = True

        def route(self, moe_layer, hidden, expert_ids, weights):
            chosen[moe_layer] = expert_ids.clone()

    rec = TraceRecorder(spec.num_moe_layers, spec.num_experts, spec.top_k)
    model.hooks = HookChain([Seen(), rec])
    model(ForwardBatch.single(list(range(3, 23))))
    trace = rec.to_trace()
    w = trace.weights.astype(np.float32)
    assert trace.num_tokens == 20 and np.all(np.diff(w, axis=-1) <= 0)
    for layer, ids in chosen.items():  # the router's experts, reordered
        assert np.array_equal(np.sort(trace.experts[:, layer], -1), np.sort(ids.numpy(), -1))
    assert any(not np.array_equal(trace.experts[:, layer], ids.numpy()) for layer, ids in chosen.items())
