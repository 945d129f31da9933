"""Demand policies that look only at the past: LRU, LFU and a static hot set from profiled load.

LRU is what mixtral-offloading uses; a static hot set is what Fiddler and ktransformers do (keep the
experts that profiling found busiest, stream the rest). They are the baselines the predictor-guided
policy has to beat.
"""
from __future__ import annotations

import numpy as np

from moe_serve.experts.policies.base import CachePolicy


class LRUPolicy(CachePolicy):
    """Evict the expert used longest ago."""

    name = "lru"

    def bind(self, num_layers, num_experts, capacity):
        super().bind(num_layers, num_experts, capacity)
        self.last = np.full(num_layers * num_experts, -1, dtype=np.int64)  # [L*E] clock of last use

    def on_access(self, layer, experts, clock):
        self.last[layer * self.num_experts + np.asarray(experts)] = clock

    def keep_score(self, gids):
        return self.last[gids].astype(np.float64)


class LFUPolicy(CachePolicy):
    """Evict the expert used least often (counts since start; ties broken by recency)."""

    name = "lfu"

    def bind(self, num_layers, num_experts, capacity):
        super().bind(num_layers, num_experts, capacity)
        n = num_layers * num_experts
        self.count = np.zeros(n, dtype=np.float64)  # [L*E] uses so far
        self.last = np.full(n, -1, dtype=np.int64)  # [L*E] clock of last use

    def on_access(self, layer, experts, clock):
        g = layer * self.num_experts + np.asarray(experts)
        self.count[g] += 1
        self.last[g] = clock

    def keep_score(self, gids):
        # recency only breaks ties: it is < 1 count's worth
        return self.count[gids] + self.last[gids] / (self.last.max() + 2.0)


class StaticPolicy(CachePolicy):
    """A fixed hot set: keep the experts with the highest profiled load, stream the rest.

    `load` float [L, E] (token counts from a profiling run or trace). The busiest `capacity - L`
    experts never leave; the remaining slots churn among the cold experts a step needs.
    """

    name = "static"

    def __init__(self, load: np.ndarray):
        self.load = np.asarray(load, dtype=np.float64)
        if self.load.ndim != 2:
            raise ValueError(f"static policy: load must be [L, E], got shape {self.load.shape}")

    def bind(self, num_layers, num_experts, capacity):
        super().bind(num_layers, num_experts, capacity)
        if self.load.shape != (num_layers, num_experts):
            raise ValueError(f"static policy: load shape {self.load.shape} != ({num_layers}, {num_experts})")
        flat = self.load.reshape(-1)
        self.score = np.zeros_like(flat)
        # rank 1 = busiest; the hot set's scores beat any cold expert's
        order = np.argsort(-flat, kind="stable")
        self.score[order] = np.arange(flat.size, 0, -1, dtype=np.float64)
        self.last = np.full(flat.size, -1, dtype=np.int64)

    def on_access(self, layer, experts, clock):
        self.last[layer * self.num_experts + np.asarray(experts)] = clock

    def keep_score(self, gids):
        hot_rank = self.score.size - max(self.capacity - self.num_layers, 0)
        hot = self.score[gids] > hot_rank
        # cold experts churn LRU-wise below the hot set
        return np.where(hot, 1e12 + self.score[gids], self.last[gids].astype(np.float64))

    def warm_set(self) -> np.ndarray:
        """Global ids of the hot set, to load at start-up."""
        return np.argsort(-self.score)[: max(self.capacity - self.num_layers, 0)]
