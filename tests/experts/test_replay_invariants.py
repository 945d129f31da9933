"""Invariants of the trace replay on many small random traces (fixed seed), and a hand-counted
two-layer example: what every policy's figures must satisfy whatever the trace."""
from __future__ import annotations

import numpy as np
import pytest

from moe_serve.experts.policies import BeladyPolicy, make_policy
from moe_serve.experts.replay import CostModel, global_steps, replay
from moe_serve.experts.simulate import expert_load
from predictors.traces import RoutingTrace

DEMAND = ("lru", "lfu", "static", "predicted")


def random_trace(rng) -> tuple[np.ndarray, int]:
    """experts int64 [T, L, K] with unique ids per (token, layer), drawn from a few experts so that
    reuse (and so eviction choices) matter; and E."""
    L, E, T = int(rng.integers(1, 5)), int(rng.integers(4, 9)), int(rng.integers(1, 12))
    K = int(rng.integers(1, E + 1))
    pool = min(E, K + 2)
    x = np.stack([[rng.choice(pool, K, replace=False) for _ in range(L)] for _ in range(T)])
    return x.astype(np.int64), E


class WarmBelady(BeladyPolicy):
    """Belady's eviction from a cache holding `hot` (global ids) before the first token."""

    def __init__(self, steps: np.ndarray, hot: np.ndarray):
        super().__init__(steps)
        self.hot = hot

    def warm_set(self) -> np.ndarray:
        return self.hot


def counts(r: dict) -> tuple[int, int]:
    """(hits, copies) as integers from the rates."""
    return round(r["hit_rate"] * r["accesses"]), round(r["copies_per_token"] * r["tokens"])


def test_belady_bounds_every_demand_policy_and_counts_add_up():
    rng = np.random.default_rng(11)
    cost = CostModel(expert_bytes=1000, bandwidth_gbps=1.0, layer_ms=0.5)
    for _ in range(60):
        x, E = random_trace(rng)
        T, L, K = x.shape
        future = global_steps(x, E)
        load = expert_load([RoutingTrace(x.astype(np.int16), np.ones(x.shape, np.float16), np.array([0, T]), E)])
        first_uses = np.unique(future).size
        for cap in sorted({K, K + 1, L * E // 2, L * E} & set(range(K, L * E + 1))):
            res = {n: replay(x, E, make_policy(n, load=load, future=future), cap, cost) for n in (*DEMAND, "belady")}
            # static starts from its hot set, as the store does: its bound is Belady from the same contents
            warm = make_policy("static", load=load)
            warm.bind(L, E, cap)
            hot = warm.warm_set()
            bound = {n: res["belady"] for n in res} | {"static": replay(x, E, WarmBelady(future, hot), cap, cost)}
            for name, r in res.items():
                hits, copies = counts(r)
                cold = np.setdiff1d(np.unique(future), hot).size if name == "static" else first_uses
                assert r["accesses"] == T * L * K and r["tokens"] == T
                assert copies == r["accesses"] - hits, name  # demand only: one copy per miss
                assert r["bytes_per_token"] * T == pytest.approx(copies * cost.expert_bytes)
                assert 0.0 <= r["ready_in_time"] <= r["hit_rate"] <= 1.0, name
                assert copies >= cold, name  # every expert's first use is a miss, unless loaded up front
                assert r["hit_rate"] <= bound[name]["hit_rate"] + 1e-12, (name, cap, x.tolist())
                if cap == L * E:  # everything fits: only first uses of experts not loaded up front miss
                    assert copies == cold, name


def test_prefetching_policies_keep_their_counts_consistent():
    rng = np.random.default_rng(12)
    for _ in range(25):
        x, E = random_trace(rng)
        T, L, K = x.shape
        future = global_steps(x, E)
        for order in ("fifo", "demand-first"):
            cost = CostModel(expert_bytes=10**6, bandwidth_gbps=2.0, layer_ms=1.0, copy_order=order)
            for name in ("predicted-prefetch", "belady-prefetch"):
                r = replay(x, E, make_policy(name, future=future), max(K, L * E // 2), cost)
                hits, copies = counts(r)
                assert copies >= r["accesses"] - hits, name  # each miss is a copy; prefetches add more
                assert 0.0 <= r["ready_in_time"] <= r["hit_rate"] <= 1.0, name
                for key in ("prefetch_precision", "prefetch_recall"):
                    assert r[key] is None or 0.0 <= r[key] <= 1.0, (name, key)
                assert r["ms_per_token"] >= L * cost.layer_ms - 1e-9 and r["stall_ms_per_token"] >= 0.0


def test_two_layer_lru_and_lfu_hand_counted():
    """L=2, E=3, K=1, 2 slots shared by both layers; layer 0 uses experts 0 0 1 0, layer 1 uses
    0 1 0 0 (gids 3 4 3 3). Clocks c0..c7 alternate the layers.
    c0 0 miss, c1 3 miss | c2 0 hit, c3 4 miss: 3 goes (older, and used once) | c4 1 miss: LRU evicts 0
    (last used c2 < c3), LFU evicts 4 (once against twice) | c5 3 miss: LRU evicts 4 (c3 < c4), LFU
    evicts 1 (once against twice) | c6 0: LRU misses (evicting 1), LFU hits | c7 3 hits in both.
    LRU: 6 misses, 2 hits; LFU: 5 misses, 3 hits."""
    x = np.array([[[0], [0]], [[0], [1]], [[1], [0]], [[0], [0]]], dtype=np.int64)
    lru = replay(x, 3, make_policy("lru"), 2, CostModel())
    lfu = replay(x, 3, make_policy("lfu"), 2, CostModel())
    assert counts(lru) == (2, 6)
    assert counts(lfu) == (3, 5)


def test_replay_refuses_duplicated_or_out_of_range_ids():
    """Called directly (the benchmark and library path; trace files are checked on load), a row
    naming an expert twice replayed the second use as a free hit, and an id >= E aliased an
    expert of the next layer (global id layer * E + e). Both are refused now, naming the row."""
    cost = CostModel()
    dup = np.array([[[0, 1]], [[2, 2]]], dtype=np.int64)  # token 1 uses expert 2 twice
    with pytest.raises(ValueError, match=r"token 1, layer 0 .*expert 2 twice"):
        replay(dup, 4, make_policy("lru"), 2, cost)
    wide = np.array([[[0], [4]]], dtype=np.int64)  # expert 4 of E=4 at layer 1
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
        replay(wide, 4, make_policy("lru"), 2, cost)


def test_reuse_forecast_keeps_the_bounds_and_counts():
    """The predicted policies with the learned reuse forecast (any weights) obey the same invariants."""
    from moe_serve.experts.policies.reuse import NF

    rng = np.random.default_rng(13)
    weights = rng.normal(size=(NF, 8))
    for _ in range(30):
        x, E = random_trace(rng)
        T, L, K = x.shape
        future = global_steps(x, E)
        for cap in sorted({K, L * E // 2, L * E} & set(range(K, L * E + 1))):
            cost = CostModel(expert_bytes=1000, bandwidth_gbps=1.0, layer_ms=0.5)
            r = replay(x, E, make_policy("predicted", reuse_weights=weights), cap, cost)
            best = replay(x, E, make_policy("belady", future=future), cap, cost)
            hits, copies = counts(r)
            assert copies == r["accesses"] - hits and 0.0 <= r["ready_in_time"] <= r["hit_rate"] <= 1.0
            assert r["hit_rate"] <= best["hit_rate"] + 1e-12
            if cap == L * E:
                assert copies == np.unique(future).size
            p = replay(x, E, make_policy("predicted-prefetch", reuse_weights=weights), cap,
                       CostModel(expert_bytes=10**6, bandwidth_gbps=2.0, layer_ms=1.0, copy_order="demand-first"))
            hits, copies = counts(p)
            assert copies >= p["accesses"] - hits and 0.0 <= p["ready_in_time"] <= p["hit_rate"] <= 1.0
