"""Online adaptation: `mlp_online` learns a new domain from observed routing, and the prequential
evaluation never lets a predictor see a label before it has predicted it."""
import numpy as np
import pytest
import torch

from predictors import load_predictor
from predictors.base import RoutingState
from predictors.baselines import PopularityPredictor
from predictors.evaluate import evaluate
from predictors.online import lookahead_targets
from predictors.registry import make_predictor
from tests.predictors.synth import layer_map_trace

L, E, K = 5, 16, 2
FAST = dict(epochs=10, dim=32, batch=32, lr=2e-2, trunk_dropout=0.9, online_steps=2, online_batch=64, online_lr=1e-2)


def _other_domain(tokens, seed):
    """Same shape, a different layer-to-layer map: what the offline fit learned is wrong here."""
    perms = np.stack([np.random.default_rng(500 + l).permutation(E) for l in range(L)])
    return layer_map_trace(tokens=tokens, seed=seed, perms=perms)


def test_online_mlp_learns_a_new_domain():
    train, test = layer_map_trace(tokens=400, seed=0), _other_domain(1200, seed=1)
    offline = make_predictor("mlp", L, E, K, 1, **{k: v for k, v in FAST.items() if not k.startswith("online_")}).fit([train])
    online = make_predictor("mlp_online", L, E, K, 1, **FAST).fit([train])
    before = evaluate(offline, [test], budget=4)["lookahead_1"]["recall_at_k"]
    after = evaluate(online, [test], budget=4, chunk=32)["lookahead_1"]["recall_at_k"]
    assert online.observed == test.num_tokens
    assert before < 0.5 and after > before + 0.25, (before, after)
    # the adapted weights are what a later replay of the same domain starts from
    late = evaluate(online, [_other_domain(200, seed=2)], budget=4)["lookahead_1"]["recall_at_k"]
    assert late > 0.9


class Spy(PopularityPredictor):
    """Popularity that adapts: records, at each predict, how many rows it had observed."""

    name = "popularity"
    adapts = True

    def fit(self, traces):
        super().fit(traces)
        self.seen, self.log = 0, []
        return self

    def predict(self, state, layer):
        self.log.append((self.seen, state.batch_size, layer))
        return super().predict(state, layer)

    def observe(self, experts, weights, prev_experts, prev_weights=None, hidden=None):
        assert experts.shape[1] == L and (experts >= 0).all()  # finished tokens: every layer known
        self.seen += experts.shape[0]


def test_prequential_predicts_a_chunk_before_observing_it():
    test = layer_map_trace(tokens=150, seed=3)
    spy = Spy(L, E, K, 1).fit([test])
    res = evaluate(spy, [test], budget=4, chunk=40)
    assert spy.seen == 150 and "observe_s" in res
    starts = [0, 40, 80, 120]
    assert [(s, min(40, 150 - s), l) for s in starts for l in range(L)] == spy.log
    # and for a predictor that does not adapt, chunked replay changes nothing
    plain = PopularityPredictor(L, E, K, 1).fit([test])
    a = evaluate(plain, [test], budget=4)["lookahead_1"]
    b = evaluate(spy.fit([test]), [test], budget=4, chunk=7)["lookahead_1"]
    assert a == b


def test_online_next_token_and_round_trip(tmp_path):
    train, test = layer_map_trace(tokens=300, seed=0), _other_domain(300, seed=1)
    pred = make_predictor("mlp_online", L, E, K, 0, **FAST).fit([train])
    pred.observe(*_finished(test))
    assert pred.observed == int((torch.from_numpy(test.prev_index()) >= 0).sum())  # one example per token with a predecessor
    path = tmp_path / "o.safetensors"
    pred.save(path)
    loaded = load_predictor(path)
    st = RoutingState.from_trace(test, 2)
    assert type(loaded) is type(pred) and torch.equal(pred.predict(st, 2), loaded.predict(st, 2))
    with pytest.raises(ValueError, match="observe"):
        pred.observe(torch.zeros(3, L + 1, K, dtype=torch.long), torch.zeros(3, L + 1, K), torch.zeros(3, L + 1, K, dtype=torch.long))


def _finished(trace):
    from predictors.base import trace_tensors

    return trace_tensors(trace)


def test_lookahead_targets():
    ex = torch.arange(2 * L * K).view(2, L, K)
    t = lookahead_targets(ex, 2)
    assert torch.equal(t[:, 0, 0], ex[:, 1]) and torch.equal(t[:, 0, 1], ex[:, 2])
    assert (t[:, L - 1] == -1).all() and (t[:, L - 2, 1] == -1).all() and torch.equal(t[:, L - 2, 0], ex[:, L - 1])


def test_hidden_direct_starts_from_the_routers_and_round_trips(tmp_path):
    from tests.predictors.synth import router_trace

    train, routers = router_trace(tokens=300, L=4, seed=0)
    test, _ = router_trace(tokens=200, L=4, seed=1, routers=routers)
    weights = {l: torch.from_numpy(routers[l]) for l in range(4)}
    # no training at all (lr 0): the direct map alone is the next layer's own router, so it ranks like it
    pred = make_predictor("mlp", 4, E, K, 1, epochs=1, dim=16, lr=0.0).with_router_weights(weights).fit([train])
    assert torch.equal(pred.net.hdirect[0, 0], weights[1]) and (pred.net.hdirect[0, 3] == 0).all()
    assert evaluate(pred, [test], budget=4)["lookahead_1"]["recall_at_k"] > 0.85
    plain = make_predictor("mlp", 4, E, K, 1, epochs=1, dim=16, lr=0.0).fit([train])
    assert plain.net.hdirect is None and evaluate(plain, [test], budget=4)["lookahead_1"]["recall_at_k"] < 0.5
    path = tmp_path / "h.safetensors"
    pred.save(path)
    st = RoutingState.from_trace(test, 1)
    assert torch.equal(load_predictor(path).predict(st, 1), pred.predict(st, 1))
    with pytest.raises(ValueError, match="router weights"):
        make_predictor("mlp", 4, E, K, 1).with_router_weights({0: weights[0]})


def test_replay_ring_keeps_the_newest_rows():
    train, test = layer_map_trace(tokens=200, seed=0), _other_domain(300, seed=1)
    pred = make_predictor("mlp_online", L, E, K, 1, **dict(FAST, online_buffer=100, online_steps=1)).fit([train])
    full = _finished(test)
    for s in range(0, 300, 70):  # 70 does not divide 100: the ring wraps mid-chunk
        pred.observe(*(t[s : s + 70] for t in full))
    assert pred.observed == 300 and pred._size == 100
    held = pred._buf[0][(pred._start + torch.arange(100)) % 100].long()  # time order
    assert torch.equal(held, full[0][200:])


def test_ensemble_passes_observed_routing_to_an_online_member():
    train, test = layer_map_trace(tokens=400, seed=0), _other_domain(600, seed=1)
    ens = make_predictor("ensemble", L, E, K, 1, members=["mlp_online", "prev_token"], member_params={"mlp_online": FAST}).fit([train])
    assert ens.adapts and not make_predictor("ensemble", L, E, K, 1, members=["transition"]).adapts
    evaluate(ens, [test], budget=4)
    assert ens.members[0].observed == test.num_tokens


def test_mlp_fits_a_tiny_trace_with_default_params():
    """10 epochs of one 256-row batch: the one-cycle schedule still has a warm-up step."""
    pred = make_predictor("mlp", L, E, K, 1, dim=16).fit([layer_map_trace(tokens=60, seed=2)])
    assert torch.isfinite(pred.predict(RoutingState.from_trace(layer_map_trace(tokens=30, seed=3), 0), 0)).all()


def test_replay_ring_keeps_hidden_states_past_float16_range():
    """The ring held hidden states as float16: a value past 65504 became inf, and the next AdamW step
    turned every weight it touched into NaN. They stay float16 while they fit, float32 after."""
    from tests.predictors.synth import router_trace

    train, _ = router_trace(tokens=200, L=4, seed=0)
    pred = make_predictor("mlp_online", 4, E, K, 1, epochs=1, dim=16, online_steps=1).fit([train])
    full = _finished(train)
    hidden = torch.from_numpy(train.hidden.astype(np.float32))
    pred.observe(*(t[:64] for t in full), hidden=hidden[:64])
    assert pred._buf[-1].dtype == torch.float16  # fits: half the memory
    big = hidden[64:128].clone()
    big[0, 0, 0] = 1e5
    pred.observe(*(t[64:128] for t in full), hidden=big)
    assert pred._buf[-1].dtype == torch.float32 and pred._buf[-1][64, 0, 0] == 1e5
    assert torch.allclose(pred._buf[-1][:64], hidden[:64], rtol=1e-3, atol=1e-3)  # the older rows kept
    assert all(torch.isfinite(p).all() for p in pred.net.parameters())
