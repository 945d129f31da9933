"""The predicted policy's prefetch distance and horizon: hints for layers a copy cannot reach in time
are not issued (their predictions still steer eviction), and the next-use horizon grows with the cache."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moe_serve.cli.main import main as cli_main
from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.policies import PredictedPolicy, make_policy
from moe_serve.experts.policies.predicted import auto_horizon
from moe_serve.experts.replay import CostModel
from predictors.traces import RoutingTrace

L, E = 4, 8


class FixedScores:
    """A predictor whose forecast after every layer is: expert (layer + d) % E at layer + d, sure."""
    top_k = 1

    def __init__(self, lookahead: int):
        self.lookahead = lookahead

    def predict(self, state, layer):
        scores = np.full((1, self.lookahead, E), 1e-3)
        for d in range(1, self.lookahead + 1):
            scores[0, d - 1, (layer + d) % E] = 1.0
        return scores


def routed_policy(prefetch_from: int, layer: int = 0) -> tuple[PredictedPolicy, np.ndarray]:
    pol = PredictedPolicy(predictor=FixedScores(3), lookahead=3, prefetch_from=prefetch_from, refresh_every=1)
    pol.bind(L, E, 16)
    pol.on_access(layer, np.array([0]), layer)
    return pol, pol.on_route(layer, state=0, clock=layer)


def test_hints_start_at_prefetch_from_but_eviction_still_uses_every_prediction():
    near, hints_near = routed_policy(1)
    far, hints_far = routed_policy(3)
    cross_layer = lambda hints: {(int(g) // E, int(g) % E) for g in hints if g // E != 0}  # noqa: E731
    assert cross_layer(hints_near) == {(1, 1), (2, 2), (3, 3)}
    assert cross_layer(hints_far) == {(3, 3)}  # layers 1 and 2 are nearer than 3
    assert {g // E for g in far._forced} <= {3}
    # the predictions for layers 1 and 2 still say when those experts are next used
    np.testing.assert_array_equal(near.tokens, far.tokens)
    gids = np.arange(L * E)
    np.testing.assert_array_equal(near.keep_score(gids), far.keep_score(gids))
    assert far.keep_score(np.array([1 * E + 1]))[0] > far.keep_score(np.array([1 * E + 2]))[0]


def test_prefetch_from_beyond_the_lookahead_leaves_only_next_token_hints():
    pol, hints = routed_policy(4)
    assert all(g // E == 0 for g in hints)  # at most the next token's experts of this layer


def test_bad_prefetch_from_and_horizon_are_refused():
    with pytest.raises(ValueError, match="prefetch_from must be >= 1"):
        PredictedPolicy(prefetch_from=0)
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        PredictedPolicy(horizon=0)
    with pytest.raises(ValueError, match="expert_cache.prefetch_from.*>= 1"):
        ExpertCacheConfig(prefetch_from=0)


def test_auto_horizon_grows_with_the_cache_and_an_explicit_one_wins():
    assert [auto_horizon(f) for f in (0.05, 0.125, 0.25, 0.375, 0.5, 1.0)] == [4, 4, 4, 6, 8, 8]
    for slots, horizon in ((8, 4), (16, 8)):  # 25% and 50% of 32 experts
        pol = PredictedPolicy()
        pol.bind(L, E, slots)
        assert pol.horizon == horizon
        assert max(pol._tab) == horizon  # E[min(N, H)] tabulated up to it
    pol = PredictedPolicy(horizon=5)
    pol.bind(L, E, 16)
    assert pol.horizon == 5
    assert make_policy("predicted", prefetch_from=3).prefetch_from == 3


def test_min_prefetch_distance_is_copy_over_layer_time_rounded_up():
    assert CostModel().min_prefetch_distance == 3  # 17.3 MB at 25 GB/s: 0.69 ms against 0.25 ms
    assert CostModel(bandwidth_gbps=54.8).min_prefetch_distance == 2  # 0.32 ms
    assert CostModel(expert_bytes=1000, bandwidth_gbps=1.0, layer_ms=0.001).min_prefetch_distance == 1  # equal
    assert CostModel(expert_bytes=1000, bandwidth_gbps=100.0).min_prefetch_distance == 1


def test_cli_prefetch_from_auto_is_resolved_and_recorded(tmp_path, capsys):
    path = tmp_path / "t.npz"
    rng = np.random.default_rng(0)
    x = np.stack([rng.permutation(E)[:2] for _ in range(30 * L)]).reshape(30, L, 2).astype(np.int16)
    RoutingTrace(experts=x, weights=np.ones_like(x, dtype=np.float16), seq_offsets=np.array([0, 30]),
                 num_experts=E).save(path)
    out = tmp_path / "sim.json"
    assert cli_main(["cache-sim", "--trace", str(path), "--policy", "predicted", "--prefetch-from", "auto",
                     "--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["prefetch_from"] == 3
    assert cli_main(["cache-sim", "--trace", str(path), "--policy", "predicted", "--prefetch-from", "0"]) == 2
    assert "--prefetch-from must be an integer >= 1 or auto, got '0'" in capsys.readouterr().err
