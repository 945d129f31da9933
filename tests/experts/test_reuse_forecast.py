"""The learned reuse forecast (policies/reuse.py) and the predicted policy that mixes it into eviction."""
from __future__ import annotations

import numpy as np
import pytest

from moe_serve.experts.policies import PredictedPolicy
from moe_serve.experts.policies.reuse import NF, ReuseForecast, fit_reuse, tokens_until, training_rows
from moe_serve.experts.replay import CostModel, replay


def test_transition_feature_learns_what_follows():
    # layer 0, E = 8, K = 1: expert 1 is always followed by expert 3 within the window, 5 never is
    state = ReuseForecast(1, 8)
    stream = [1, 3, 0, 2] * 20
    for t, e in enumerate(stream):
        state.observe(0, np.array([e]), t)
    state.observe(0, np.array([1]), len(stream))  # the last token used expert 1
    f = state.features(0, len(stream) + 1)  # [E, NF]
    assert f.shape == (8, NF)
    assert f[3, 12] > 0.5 > -0.5 > f[5, 12]  # 3 follows 1 in every window; 5 never appears
    assert f[1, 0] == 1.0 and f[1].sum() > 1.0  # gap 1 bucket, plus counts and bias
    assert f[7, 8] == 1.0 and np.all(f[7, 9:12] == 0.0)  # never used: the last gap bucket, no counts
    w = np.random.default_rng(1).normal(size=(NF, 7))  # the policy's path skips building the features
    assert np.allclose(state.logits(0, len(stream) + 1, w), f @ w)
    assert np.allclose(ReuseForecast(1, 8).logits(0, 0, w), ReuseForecast(1, 8).features(0, 0) @ w)


def test_tokens_until_is_an_expectation_within_the_horizon():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(16, NF))
    w = rng.normal(size=(NF, 8))
    u = tokens_until(f, w, 8)
    assert u.shape == (16,) and np.all(u >= 1.0) and np.all(u <= 8.0)
    assert np.all(tokens_until(f, w, 1) == 1.0)
    # certain use at the next opportunity: 1; certain no use within H: H
    assert np.allclose(tokens_until(np.ones((2, NF)), np.full((NF, 8), 50.0), 8), 1.0)
    assert np.allclose(tokens_until(np.ones((2, NF)), np.full((NF, 8), -50.0), 8), 8.0)


def _trace(T=120, L=3, E=8, K=2, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])


def test_training_rows_labels_match_the_stream():
    x = _trace()
    X, Y = training_rows(x, 8, horizon=4, every=4)
    T, L = x.shape[:2]
    assert X.shape == ((T - 1) // 4 * L * 8, NF) and Y.shape == (X.shape[0], 4)
    # row block of token 4, layer 1: Y[e, w-1] is whether e is used at layer 1 within tokens 4 .. 4 + w - 1
    block = Y[(0 * L + 1) * 8:(0 * L + 2) * 8]
    for e in range(8):
        for w in range(1, 5):
            assert block[e, w - 1] == any(e in x[t, 1] for t in range(4, 4 + w))


def test_policy_with_reuse_replays_and_mix_zero_is_the_hazard_policy():
    x = _trace(T=200, L=4, E=16, K=2)
    w = fit_reuse(x, 16, horizon=8, steps=10)
    assert w.shape == (NF, 8) and np.all(np.isfinite(w))
    cost = CostModel()
    plain = replay(x, 16, PredictedPolicy(horizon=8), 24, cost)
    mix0 = replay(x, 16, PredictedPolicy(horizon=8, reuse_weights=w, reuse_mix=0.0), 24, cost)
    mixed = replay(x, 16, PredictedPolicy(horizon=8, reuse_weights=w, reuse_mix=1.0), 24, cost)
    assert mix0 == plain
    assert 0.0 < mixed["hit_rate"] <= 1.0 and mixed["ready_in_time"] <= mixed["hit_rate"]


def test_reuse_arguments_are_checked():
    with pytest.raises(ValueError, match="reuse_mix"):
        PredictedPolicy(reuse_weights=np.zeros((NF, 8)), reuse_mix=1.5)
    with pytest.raises(ValueError, match="reuse_weights shape"):
        PredictedPolicy(horizon=8, reuse_weights=np.zeros((NF, 3))).bind(2, 8, 4)


def test_simulate_fits_the_reuse_forecast_on_the_fit_traces():
    from moe_serve.experts.simulate import simulate
    from predictors.traces import RoutingTrace

    def trace(seed):
        x = _trace(T=80, L=3, E=8, K=2, seed=seed)
        return RoutingTrace(x.astype(np.int16), np.ones(x.shape, np.float16), np.array([0, 80]), 8)
    test, fit = trace(1), trace(2)
    cost = CostModel()
    plain = simulate(test, ["predicted"], [0.5], cost, fit_traces=[fit])["0.5"]["predicted"]
    reuse = simulate(test, ["predicted"], [0.5], cost, fit_traces=[fit], reuse=True)["0.5"]["predicted"]
    weights = fit_reuse(fit.experts.astype(np.int64), 8)
    by_hand = replay(test.experts.astype(np.int64), 8, PredictedPolicy(reuse_weights=weights), 12, cost)
    assert reuse["hit_rate"] == by_hand["hit_rate"] and reuse["copies_per_token"] == by_hand["copies_per_token"]
    assert 0.0 < plain["hit_rate"] <= 1.0
    with pytest.raises(ValueError, match="fit_traces"):
        simulate(test, ["predicted"], [0.5], cost, reuse=True)


def test_cache_sim_reuse_flag(tmp_path, capsys, monkeypatch):
    """`cache-sim --reuse` replays the predicted policies with the reuse forecast fitted on --fit-trace
    (the same figures as simulate(reuse=True)), records it in the JSON config, and is refused where it
    would be fitted on nothing or change nothing."""
    import json

    from moe_serve.cli.main import main as cli_main
    from moe_serve.experts.simulate import simulate
    from predictors.traces import RoutingTrace, load_trace

    paths = {}
    for name, seed in (("test", 1), ("fit", 2)):
        x = _trace(T=80, L=3, E=8, K=2, seed=seed).astype(np.int16)
        paths[name] = str(tmp_path / f"{name}.npz")
        RoutingTrace(x, np.ones(x.shape, np.float16), np.array([0, 80]), 8).save(paths[name])
    out = tmp_path / "sim.json"
    base = ["cache-sim", "--trace", paths["test"], "--capacity", "0.5", "--expert-bytes", "1000"]
    assert cli_main([*base, "--policy", "predicted", "lru", "--fit-trace", paths["fit"], "--reuse",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["reuse"] is True
    cost = CostModel(expert_bytes=1000, bandwidth_gbps=25.0, layer_ms=0.25)
    want = simulate(load_trace(paths["test"], keys=()), ["predicted", "lru"], [0.5], cost,
                    fit_traces=[load_trace(paths["fit"], keys=())], reuse=True)["0.5"]
    got = data["results"]["test"]["0.5"]
    for name in ("predicted", "lru"):
        assert got[name]["hit_rate"] == want[name]["hit_rate"], name
        assert got[name]["copies_per_token"] == want[name]["copies_per_token"], name
    from moe_serve.experts.policies import reuse as reuse_module  # two traces replayed: fitted once

    fits = []
    monkeypatch.setattr(reuse_module, "fit_reuse", lambda *a, **k: fits.append(1) or fit_reuse(*a, **k))
    two = ["cache-sim", "--trace", paths["test"], paths["fit"], "--capacity", "0.5", "--expert-bytes", "1000"]
    assert cli_main([*two, "--policy", "predicted", "--fit-trace", paths["fit"], "--reuse"]) == 0
    assert fits == [1]
    short = str(tmp_path / "short.npz")
    ids = np.broadcast_to(np.array([0, 1], np.int16), (3, 3, 2)).copy()  # 3 tokens: too few to fit on
    RoutingTrace(ids, np.ones((3, 3, 2), np.float16), np.array([0, 3]), 8).save(short)
    capsys.readouterr()
    assert cli_main([*base, "--policy", "predicted", "--fit-trace", short, "--reuse"]) == 2
    assert "--reuse: --fit-trace" in capsys.readouterr().err
    assert cli_main([*base, "--policy", "predicted", "--reuse"]) == 2
    assert "--reuse fits the reuse forecast's weights on --fit-trace" in capsys.readouterr().err
    assert cli_main([*base, "--policy", "lru", "--fit-trace", paths["fit"], "--reuse"]) == 2
    assert "--reuse changes only the predicted policies" in capsys.readouterr().err
