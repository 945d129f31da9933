"""The one cache-policy interface, shared by the trace replay and the offloading expert store.

A policy never moves bytes: the cache (`moe_serve.experts.cache.SlotCache`) owns residency and asks
the policy three things:

- `on_access(layer, experts, clock)`: these experts of `layer` are used now (one MoE layer step).
- `on_route(layer, state, clock)`: the router of `layer` has chosen; return experts worth
  prefetching (global ids, most wanted first). Demand-only policies return nothing.
- `keep_score(gids)`: higher means more worth keeping. The cache evicts the lowest-scoring resident
  expert that is not in use by the current step (`victim`), and admits a prefetch when `admits`
  says so (the predicted policy: only when it scores higher than the expert it would evict).

Experts are named by a global id `g = layer * E + expert` so that one cache can be shared across
layers. `clock` counts MoE layer steps (`token * L + layer` in a batch-1 decode), the unit in which
recency and next use are measured.
"""
from __future__ import annotations

import numpy as np


class CachePolicy:
    name = "base"
    uses_future = False  # True only for Belady (replay only)

    def bind(self, num_layers: int, num_experts: int, capacity: int) -> None:
        """Size the policy's state for L layers x E experts and `capacity` slots."""
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity

    def on_access(self, layer: int, experts: np.ndarray, clock: int) -> None:
        """`experts` int [n] (unique ids within `layer`) are used at `clock`."""

    def on_route(self, layer: int, state, clock: int) -> np.ndarray:
        """Prefetch hints after `layer`'s router: int64 global ids, most wanted first."""
        return _NONE

    def keep_score(self, gids: np.ndarray) -> np.ndarray:
        """float [n]: higher = keep. Must accept non-resident ids (for prefetch admission)."""
        raise NotImplementedError

    def admits(self, g: int, victim: int) -> bool:
        """May prefetched expert `g` replace `victim`? Past-only policies take every hint."""
        return True

    def victim(self, candidates: np.ndarray) -> int:
        """The global id to evict among `candidates` (resident, not in use by the current step)."""
        return int(candidates[np.argmin(self.keep_score(candidates))])


_NONE = np.zeros(0, dtype=np.int64)
