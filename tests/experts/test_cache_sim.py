"""Trace replay and `moe-serve cache-sim` on small synthetic traces with hand-counted results."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from moe_serve.cli.main import main as cli_main
from moe_serve.experts.policies import make_policy
from moe_serve.experts.replay import CostModel, capacity_slots, global_steps, replay
from predictors.traces import RoutingTrace, load_trace

CYCLE = np.array([0, 1, 2, 3] * 3)  # one layer, one expert per token, cycling through 4


def cycle_experts():
    return CYCLE[:, None, None].astype(np.int64)  # [T=12, L=1, K=1]


def test_cycle_lru_vs_belady_hand_counted():
    x = cycle_experts()
    cost = CostModel(expert_bytes=1000, bandwidth_gbps=1.0, layer_ms=0.5)  # copy_ms = 0.001
    lru = replay(x, 4, make_policy("lru"), 3, cost)
    bel = replay(x, 4, make_policy("belady", future=global_steps(x, 4)), 3, cost)
    assert lru["hit_rate"] == 0.0  # LRU's worst case: a cycle one longer than the cache
    assert bel["hit_rate"] == 6 / 12  # misses at accesses 0, 1, 2, 3, 6, 9 (worked out in the docstring)
    assert lru["bytes_per_token"] == 1000.0 and bel["bytes_per_token"] == 6 * 1000 / 12
    # every miss stalls its layer for one copy (the copy engine is idle when it is asked)
    assert lru["stall_ms_per_token"] == pytest.approx(cost.copy_ms)
    assert lru["ready_in_time"] == 0.0 and bel["ready_in_time"] == bel["hit_rate"]


def test_two_layer_shared_cache_all_hits_after_warmup():
    T = 10
    x = np.zeros((T, 2, 1), dtype=np.int64)
    x[:, 1, 0] = 3  # layer 0 always expert 0, layer 1 always expert 3
    for name in ("lru", "lfu", "predicted"):
        r = replay(x, 4, make_policy(name), 2, CostModel())
        assert r["hit_rate"] == (2 * T - 2) / (2 * T), name
        assert r["copies_per_token"] == 2 / T


def test_copy_queue_makes_late_prefetches_stall():
    """Two misses in one layer: the second waits behind the first on the one copy engine."""
    x = np.array([[[0, 1]]], dtype=np.int64)  # T=1, L=1, K=2
    cost = CostModel(expert_bytes=10**6, bandwidth_gbps=1.0, layer_ms=0.1)  # copy 1 ms
    r = replay(x, 2, make_policy("lru"), 2, cost)
    assert r["stall_ms_per_token"] == pytest.approx(2.0)
    assert r["ms_per_token"] == pytest.approx(2.1)


def test_capacity_slots():
    assert capacity_slots(0.25, 26, 64, 6) == 416
    assert capacity_slots(0.001, 2, 4, 2) == 2  # never below one layer's top-k
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        capacity_slots(1.5, 2, 4, 2)


def test_cli_cache_sim_json(tmp_path, capsys):
    path = tmp_path / "cycle.npz"
    x = cycle_experts().astype(np.int16)
    RoutingTrace(experts=x, weights=np.ones_like(x, dtype=np.float16), seq_offsets=np.array([0, 12]),
                 num_experts=4).save(path)
    out = tmp_path / "sim.json"
    rc = cli_main(["cache-sim", "--trace", str(path), "--capacity", "0.75", "--policy", "all",
                   "--expert-bytes", "1000", "--copy-order", "demand-first", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["config"]["copy_order"] == "demand-first"
    row = data["results"]["cycle"]["0.75"]
    assert set(row) == {"lru", "lfu", "static", "predicted", "predicted-prefetch", "belady", "belady-prefetch"}
    for name, m in row.items():
        assert {"hit_rate", "ready_in_time", "bytes_per_token", "stall_ms_per_token"} <= set(m)
        assert m["ready_in_time"] <= row["belady-prefetch"]["ready_in_time"], name
    assert row["lru"]["hit_rate"] == 0.0 and row["belady"]["hit_rate"] == 0.5
    assert row["belady"]["vs_belady"] == 1.0
    assert row["belady-prefetch"]["oracle_lookahead"] == 4  # its own horizon, not --lookahead's
    assert "belady" in capsys.readouterr().out


def test_cli_rejects_bad_capacity(tmp_path, capsys):
    path = tmp_path / "cycle.npz"
    x = cycle_experts().astype(np.int16)
    RoutingTrace(experts=x, weights=np.ones_like(x, dtype=np.float16), seq_offsets=np.array([0, 12]),
                 num_experts=4).save(path)
    assert cli_main(["cache-sim", "--trace", str(path), "--capacity", "2"]) == 2
    assert "--capacity must be a fraction" in capsys.readouterr().err
    assert cli_main(["cache-sim", "--trace", str(path), "--policy", "mru"]) == 2
    assert cli_main(["cache-sim", "--trace", str(path), "--learn-lag", "-1"]) == 2
    assert "--learn-lag must be >= 0 chunks, got -1" in capsys.readouterr().err


def test_real_trace_lru_far_from_belady(shared_dir):
    """On 300 tokens of the DeepSeek-V2-Lite intent trace at 25%: LRU well below Belady, and the
    predicted policy (demand only, no predictor) between them."""
    tr = load_trace(shared_dir / "traces" / "dsv2lite_intent.npz")
    x = tr.experts[:300].astype(np.int64)
    cap = capacity_slots(0.25, tr.num_layers, tr.num_experts, tr.top_k)
    hit = {n: replay(x, tr.num_experts, make_policy(n, future=global_steps(x, tr.num_experts)), cap,
                     CostModel())["hit_rate"] for n in ("lru", "predicted", "belady")}
    assert hit["lru"] < 0.8 * hit["belady"]
    assert hit["lru"] < hit["predicted"] < hit["belady"]


def test_demand_first_lets_a_miss_overtake_queued_prefetches():
    """Layer 0 prefetches 3 experts of layer 1 (1 ms copies, 0.1 ms layers); layer 1 then misses on
    another one. FIFO: the miss waits behind all three (ready at 4 ms). Demand-first: only the copy
    already in flight runs first (ready at 2 ms), the two queued prefetches after it."""
    from moe_serve.experts.policies import PredictedPolicy

    class ThreeHints(PredictedPolicy):  # the predicted policy, hinting layer 1's experts 1, 2, 3
        def on_route(self, layer, state, clock):
            return np.array([5, 6, 7]) if layer == 0 else np.zeros(0, dtype=np.int64)

    x = np.array([[[0], [0]]], dtype=np.int64)  # T=1, L=2, K=1: layer 0 expert 0, layer 1 expert 0 (gid 4)
    out = {}
    for order in ("fifo", "demand-first"):
        cost = CostModel(expert_bytes=10**6, bandwidth_gbps=1.0, layer_ms=0.1, copy_order=order)
        out[order] = replay(x, 4, ThreeHints(), 5, cost)
    # layer 0: demand copy 0..1 ms (stall 1), compute to 1.1; layer 1 asks at 1.1
    assert out["fifo"]["stall_ms_per_token"] == pytest.approx(1.0 + (5.0 - 1.1))
    assert out["demand-first"]["stall_ms_per_token"] == pytest.approx(1.0 + (3.0 - 1.1))
    for m in out.values():
        assert m["hit_rate"] == 0.0 and m["copies_per_token"] == 5


def test_cost_model_rejects_unknown_copy_order():
    with pytest.raises(ValueError, match="copy_order"):
        CostModel(copy_order="lifo")


def test_demand_first_prefetch_not_started_in_time_is_a_miss():
    """Layer 0 prefetches layer 1's experts 1 and 2 (gids 5, 6); layer 1 needs expert 2 while its copy
    still waits behind expert 1's. FIFO: committed to the stream, a hit (not ready). Demand-first: a
    miss, fetched on demand; the stall is the same here (3 ms - 1.1 ms at layer 1)."""
    from moe_serve.experts.policies import LRUPolicy

    class TwoHints(LRUPolicy):  # LRU, hinting layer 1's experts 1, 2 after layer 0's router
        def on_route(self, layer, state, clock):
            return np.array([5, 6]) if layer == 0 else np.zeros(0, dtype=np.int64)

    x = np.array([[[0], [2]]], dtype=np.int64)  # T=1, L=2, K=1
    out = {order: replay(x, 4, TwoHints(), 5, CostModel(expert_bytes=10**6, bandwidth_gbps=1.0, layer_ms=0.1,
                                                       copy_order=order))
           for order in ("fifo", "demand-first")}
    assert out["fifo"]["hit_rate"] == 0.5 and out["fifo"]["ready_in_time"] == 0.0
    assert out["demand-first"]["hit_rate"] == 0.0
    for m in out.values():
        assert m["stall_ms_per_token"] == pytest.approx(1.0 + (3.0 - 1.1))
        assert m["copies_per_token"] == 3


def test_oracle_prefetch_is_in_time_where_belady_stalls():
    """The cycle of 4 experts through 3 slots, copies 0.2 ms, layers 1 ms: Belady misses at accesses
    0-3, 6 and 9 and stalls on each; the oracle prefetch fetches each of those one step ahead, in
    time (the first access still waits), but it moves twice the bytes: each prefetch evicts the
    expert needed furthest ahead, which is then fetched again (Belady moves the fewest)."""
    x = cycle_experts()
    cost = CostModel(expert_bytes=200_000, bandwidth_gbps=1.0, layer_ms=1.0, copy_order="demand-first")
    bel = replay(x, 4, make_policy("belady", future=global_steps(x, 4)), 3, cost)
    pre = replay(x, 4, make_policy("belady-prefetch", future=global_steps(x, 4)), 3, cost)
    assert bel["ready_in_time"] == 0.5 and bel["stall_ms_per_token"] == pytest.approx(6 * 0.2 / 12)
    assert pre["ready_in_time"] == 11 / 12 and pre["stall_ms_per_token"] == pytest.approx(0.2 / 12)
    assert bel["copies_per_token"] == 0.5 and pre["copies_per_token"] == 1.0


def test_trace_predictions_replay_an_adapting_predictor_prequentially():
    """An adapting predictor is asked about a 64-row chunk before it observes that chunk: the score it
    gives (here: how many rows it has observed) is 64 * chunk index for every row and layer."""
    import torch

    from moe_serve.experts.replay import TracePredictions

    class Counting:  # adapts: its prediction is the number of rows observed so far
        adapts, lookahead, slots, top_k = True, 1, 1, 1

        def __init__(self):
            self.seen = 0

        def predict(self, state, layer):
            return torch.full((state.experts.shape[0], 1, 4), float(self.seen))

        def observe(self, experts, weights, prev_experts, prev_weights):
            self.seen += experts.shape[0]

    x = np.tile(cycle_experts(), (20, 2, 1)).astype(np.int16)  # T=240, L=2, K=1
    trace = RoutingTrace(experts=x, weights=np.ones_like(x, dtype=np.float16), seq_offsets=np.array([0, 240]),
                         num_experts=4)
    pred = Counting()
    scores = TracePredictions(pred, trace).scores  # [T, L, 1, 4]
    want = (np.arange(240) // 64 * 64).astype(np.float32)
    assert np.array_equal(scores[:, 0, 0, 0], want) and np.array_equal(scores[:, 1, 0, 3], want)
    assert pred.seen == 240


def test_idle_only_prefetch_waits_for_a_free_copy_engine():
    """prefetch_when="idle": a hint is copied only while the copy engine has nothing to do, one per
    layer step (the copy it starts makes the engine busy). Two tokens of layer 0 -> 1, expert 0 each
    (1 ms copies, 0.1 ms layers); layer 0 hints layer 1's experts 1, 2, 3. Token 0: the hints come
    while expert 0's demand copy runs: none is copied. Token 1: layer 0 hits, the engine is idle:
    expert 1 of layer 1 is copied (2.2 - 3.2 ms, never used), the other two are not."""
    from moe_serve.experts.policies import LRUPolicy

    class ThreeHints(LRUPolicy):
        def on_route(self, layer, state, clock):
            return np.array([5, 6, 7]) if layer == 0 else np.zeros(0, dtype=np.int64)

    x = np.zeros((2, 2, 1), dtype=np.int64)  # T=2, L=2, K=1: expert 0 in both layers (gids 0 and 4)
    for order in ("fifo", "demand-first"):
        cost = CostModel(expert_bytes=10**6, bandwidth_gbps=1.0, layer_ms=0.1, copy_order=order, prefetch_when="idle")
        r = replay(x, 4, ThreeHints(), 5, cost)
        assert r["copies_per_token"] == 1.5, order  # the two demand copies and one prefetch
        assert r["prefetch_precision"] == 0.0 and r["hit_rate"] == 0.5
        assert r["stall_ms_per_token"] == pytest.approx((1.0 + 1.0) / 2)  # token 0's two misses, nothing more
        always = replay(x, 4, ThreeHints(), 5, CostModel(expert_bytes=10**6, bandwidth_gbps=1.0, layer_ms=0.1,
                                                         copy_order=order))
        assert always["copies_per_token"] == 2.5 and always["stall_ms_per_token"] > r["stall_ms_per_token"]
    with pytest.raises(ValueError, match="prefetch_when"):
        CostModel(prefetch_when="sometimes")


def test_cli_refuses_fit_traces_and_predictors_of_another_shape(tmp_path, capsys):
    """A predictor fitted for other expert counts failed inside torch (a traceback), a fit trace of
    other experts ran silently for predicted-prefetch, and an empty trace divided by zero."""
    from predictors.registry import make_predictor
    from tests.predictors.synth import layer_map_trace

    paths = {}
    for name, E in (("e16", 16), ("e8", 8)):
        paths[name] = str(tmp_path / f"{name}.npz")
        layer_map_trace(tokens=60, L=3, E=E, K=2, seqs=3).save(paths[name])
    pred = make_predictor("popularity", 3, 8, 2, 1)
    pred.fit([layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3)])
    pred.save(tmp_path / "p8.safetensors")
    empty = tmp_path / "empty.npz"
    RoutingTrace(experts=np.zeros((0, 3, 2), np.int16), weights=np.zeros((0, 3, 2), np.float16),
                 seq_offsets=np.array([0]), num_experts=16).save(empty)
    for argv, message in [
        (["--policy", "predicted", "--predictor", str(tmp_path / "p8.safetensors")], "--predictor .* was fitted for"),
        (["--policy", "predicted", "--fit-trace", paths["e8"]], "--fit-trace .*e8.npz has"),
    ]:
        assert cli_main(["cache-sim", "--trace", paths["e16"], *argv]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, argv
    assert cli_main(["cache-sim", "--trace", str(empty), "--policy", "lru"]) == 2
    assert "holds no tokens" in capsys.readouterr().err
