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


def reference_on_route(pol: PredictedPolicy, layer: int, state) -> tuple[np.ndarray, set, np.ndarray]:
    """The predicted policy's routing step written layer by layer, the plain way: (hints, forced,
    expected tokens until use [L, E]). `on_route` does the same for all predicted layers at once."""
    from moe_serve.experts.policies.predicted import MAX_GAP, _gap, as_probabilities

    L, E = pol.num_layers, pol.num_experts
    tokens, forced, hints = pol.tokens.copy(), set(), []
    scores = as_probabilities(np.asarray(pol.predictor.predict(state, layer), dtype=np.float64), pol.predictor.top_k)[0]
    z_layer = np.log(np.clip(scores, 1e-4, 1 - 1e-4)) - np.log1p(-np.clip(scores, 1e-4, 1 - 1e-4)) - pol._z_base
    for j in range(min(pol.lookahead, scores.shape[0])):
        nl = layer + 1 + j
        if nl >= L:
            break
        gap = _gap(pol.token - pol.last_tok[nl])
        p = 1.0 / (1.0 + np.exp(-(z_layer[j] + pol.logit_h[nl, np.arange(E), gap])))
        order = np.argsort(-p)
        top = np.concatenate([np.argsort(-scores[j])[: pol.prefetch_top], order[: pol.combined_top]])
        forced.update((nl * E + top).tolist())
        later = pol._tab[max(pol.horizon - 1, 1)][nl, np.arange(E), np.minimum(gap + 1, MAX_GAP)]
        tokens[nl] = 1.0 + (1.0 - p) * later
        want = scores[j] >= pol.threshold
        want[top] = True
        hints.append(nl * E + order[want[order]])
    p_next = pol.h[layer, np.arange(E), _gap(pol.token + 1 - pol.last_tok[layer])]
    keep = np.flatnonzero(p_next >= pol.threshold)
    hints.append(layer * E + keep[np.argsort(-p_next[keep])])
    return np.concatenate(hints), forced, tokens


def test_on_route_matches_the_per_layer_reference():
    """80 tokens of a random 6-layer trace (16 experts, top 3), a transition predictor fitted on
    another random trace, lookahead 3 (so the last layers predict fewer layers than asked): after
    every router, the hints (in order), the forced picks and the expected next uses equal the
    plain per-layer computation."""
    rng = np.random.default_rng(0)
    L, E, K, T = 6, 16, 3, 80

    def random_trace(skew: float) -> RoutingTrace:
        p = rng.dirichlet(np.full(E, skew), size=L)  # skewed per-layer popularity: some hints pass 0.5
        x = np.stack([np.stack([rng.choice(E, K, replace=False, p=p[l]) for l in range(L)]) for _ in range(T)])
        return RoutingTrace(experts=x.astype(np.int16), weights=np.ones(x.shape, dtype=np.float16),
                            seq_offsets=np.array([0, T]), num_experts=E)

    fit, replayed = random_trace(0.3), random_trace(0.3)
    pred = TracePredictions(TransitionPredictor(L, E, K, lookahead=3).fit([fit]), replayed)
    pol = make_policy("predicted-prefetch", predictor=pred, lookahead=3)
    pol.bind(L, E, capacity=L * E // 2)
    n_hints = 0
    for t in range(T):
        for layer in range(L):
            pol.on_access(layer, replayed.experts[t, layer].astype(np.int64), t * L + layer)
            want_hints, want_forced, want_tokens = reference_on_route(pol, layer, t)
            hints = pol.on_route(layer, t, t * L + layer)
            np.testing.assert_array_equal(hints, want_hints)
            assert pol._forced == want_forced
            np.testing.assert_array_equal(pol.tokens, want_tokens)
            n_hints += hints.size
    assert n_hints > T * L  # the comparison saw real hint lists, not empty ones
