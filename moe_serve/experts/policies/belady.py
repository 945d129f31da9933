"""Belady's MIN: evict the expert whose next use lies furthest in the future. Replay only.

It sees the whole access stream, so it is the bound on demand-fetch hit rate for a given capacity
(and the least number of expert copies any policy can do), not a product feature.
"""
from __future__ import annotations

import numpy as np

from moe_serve.experts.policies.base import CachePolicy

NEVER = np.iinfo(np.int64).max // 4


def next_use_table(steps: np.ndarray) -> np.ndarray:
    """steps int [S, K] global ids used at clock s (-1 = none) -> int64 [S, K]: the next clock
    at which that same expert is used again (NEVER if it is not)."""
    S, K = steps.shape
    flat = steps.reshape(-1).astype(np.int64)
    clock = np.repeat(np.arange(S, dtype=np.int64), K)
    valid = flat >= 0
    order = np.lexsort((clock, np.where(valid, flat, -1)))  # by gid, then clock
    g_sorted, c_sorted = flat[order], clock[order]
    nxt_sorted = np.full(flat.size, NEVER, dtype=np.int64)
    same = g_sorted[1:] == g_sorted[:-1]
    nxt_sorted[:-1][same] = c_sorted[1:][same]
    out = np.empty_like(nxt_sorted)
    out[order] = nxt_sorted
    return out.reshape(S, K)


class BeladyPolicy(CachePolicy):
    """`steps` int [S, K]: the global ids each clock will use (the future, known up front)."""

    name = "belady"
    uses_future = True

    def __init__(self, steps: np.ndarray):
        self.steps = np.asarray(steps, dtype=np.int64)
        self.nxt = next_use_table(self.steps)

    def bind(self, num_layers, num_experts, capacity):
        super().bind(num_layers, num_experts, capacity)
        self.next_use = np.full(num_layers * num_experts, NEVER, dtype=np.int64)
        S, K = self.steps.shape
        flat, clock = self.steps.reshape(-1), np.repeat(np.arange(S, dtype=np.int64), K)
        np.minimum.at(self.next_use, flat[flat >= 0], clock[flat >= 0])  # first use of each expert

    def on_access(self, layer, experts, clock):
        row = self.steps[clock]
        keep = row >= 0
        self.next_use[row[keep]] = self.nxt[clock][keep]

    def keep_score(self, gids):
        return -self.next_use[gids].astype(np.float64)


class BeladyPrefetchPolicy(BeladyPolicy):
    """Belady's eviction plus an oracle prefetch: after each router, the experts the next `lookahead`
    layer steps will really use, soonest first, admitted over a victim used later. Replay only: it is
    the reference for what prefetching could give under the cost model (ready in time, stall), as
    Belady is for the demand hit rate. It is not a bound proven optimal, only a strong oracle."""

    name = "belady-prefetch"

    def __init__(self, steps: np.ndarray, lookahead: int = 4):
        if lookahead < 1:
            raise ValueError(f"belady-prefetch: lookahead must be >= 1 layer step, got {lookahead}")
        super().__init__(steps)
        self.lookahead = lookahead

    def on_route(self, layer, state, clock):
        rows = self.steps[clock + 1: clock + 1 + self.lookahead].reshape(-1)
        return rows[rows >= 0]

    def admits(self, g, victim):
        return bool(self.next_use[g] < self.next_use[victim])
