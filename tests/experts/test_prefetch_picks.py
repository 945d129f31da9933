"""The predicted-prefetch policy's forced picks: the predictor's top plus the top by the combined
estimate (this token's earlier layers and the expert's own recent use at the target layer)."""
from __future__ import annotations

import numpy as np

from moe_serve.experts.policies import PredictedPolicy, make_policy
from moe_serve.experts.replay import CostModel, TracePredictions, capacity_slots, global_steps, replay
from predictors.baselines import TransitionPredictor
from predictors.traces import RoutingTrace, load_trace


def two_layer_trace(layer1_expert: int, T: int = 40) -> RoutingTrace:
    """L=2, E=4, K=1: layer 0 always uses expert 0, layer 1 always `layer1_expert`."""
    x = np.zeros((T, 2, 1), dtype=np.int16)
    x[:, 1, 0] = layer1_expert
    return RoutingTrace(experts=x, weights=np.ones_like(x, dtype=np.float16), seq_offsets=np.array([0, T]),
                        num_experts=4)


def test_combined_picks_add_the_reused_expert():
    # read the forced set right after layer 0's router (after layer 1 there is no layer to predict)
    fit, replayed = two_layer_trace(1), two_layer_trace(3)
    pred = TracePredictions(TransitionPredictor(2, 4, 1, lookahead=1).fit([fit]), replayed)
    out = {}
    for combined_top in (0, 2):
        pol = PredictedPolicy(predictor=pred, lookahead=1, prefetch_top=1, combined_top=combined_top,
                              refresh_every=1)
        pol.bind(2, 4, 2)
        for t in range(20):
            pol.on_access(0, replayed.experts[t, 0].astype(np.int64), 2 * t)
            pol.on_route(0, t, 2 * t)
            forced = {g - 4 for g in pol._forced}
            pol.on_access(1, replayed.experts[t, 1].astype(np.int64), 2 * t + 1)
            pol.on_route(1, t, 2 * t + 1)
        out[combined_top] = forced
    assert out[0] == {1}  # the predictor alone: the transition it learned on the other trace
    assert out[2] == {1, 3}  # plus the expert every recent token used at layer 1


def test_predicted_prefetch_cross_domain_beats_demand(shared_dir):
    """200 tokens of the intent trace at 25%, predictor and prior fitted on summary: forcing the
    likeliest experts in raises the hit rate over the demand-only predicted policy and over LRU."""
    from moe_serve.experts.policies import gap_counts

    tr = load_trace(shared_dir / "traces" / "dsv2lite_intent.npz").select_sequences(range(4))
    fit = load_trace(shared_dir / "traces" / "dsv2lite_summary.npz")
    x = tr.experts.astype(np.int64)
    pred = TracePredictions(TransitionPredictor(fit.num_layers, fit.num_experts, fit.top_k, lookahead=2).fit([fit]), tr)
    prior = gap_counts(fit.experts.astype(np.int64), fit.num_experts)
    cap = capacity_slots(0.25, tr.num_layers, tr.num_experts, tr.top_k)
    hit = {}
    for name in ("lru", "predicted", "predicted-prefetch"):
        pol = make_policy(name, predictor=pred, lookahead=2, prior=prior)
        hit[name] = replay(x, tr.num_experts, pol, cap, CostModel(), state_fn=lambda t, layer: t)["hit_rate"]
    assert hit["lru"] < hit["predicted"] < hit["predicted-prefetch"]
