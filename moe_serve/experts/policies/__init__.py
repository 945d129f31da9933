"""Expert-cache policies behind one interface (`CachePolicy`); `make_policy` builds one by name."""
from __future__ import annotations

import numpy as np

from moe_serve.experts.policies.base import CachePolicy
from moe_serve.experts.policies.belady import BeladyPolicy, BeladyPrefetchPolicy, next_use_table
from moe_serve.experts.policies.classic import LFUPolicy, LRUPolicy, StaticPolicy
from moe_serve.experts.policies.predicted import PredictedPolicy, gap_counts

POLICY_NAMES = ("lru", "lfu", "static", "predicted", "predicted-prefetch", "belady", "belady-prefetch")
SERVING_POLICIES = ("lru", "lfu", "static", "predicted", "predicted-prefetch")  # belady*: replay only


def make_policy(name: str, *, load: np.ndarray | None = None, future: np.ndarray | None = None,
                predictor=None, lookahead: int = 1, prior=None, prefetch_from: int = 1,
                reuse_weights: np.ndarray | None = None, reuse_mix: float = 0.75) -> CachePolicy:
    """`load` float [L, E] profiled expert load (static); `future` int [S, K] global ids per clock
    (belady); `predictor` and `prior` (from `gap_counts`) for predicted. "predicted-prefetch" is
    predicted that also fetches the predictor's top-k experts of the next layers unconditionally
    (more hits, more bytes moved), and the k + 4 likeliest by the combined estimate. `prefetch_from`:
    the nearest predicted layer the predicted policies prefetch for (see `PredictedPolicy`).
    `reuse_weights` (from `reuse.fit_reuse`, opt-in): the predicted policies mix the learned reuse
    forecast into eviction with weight `reuse_mix`."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "static":
        if load is None:
            raise ValueError("cache policy 'static' needs a profiled expert load (a trace to profile)")
        return StaticPolicy(load)
    if name in ("predicted", "predicted-prefetch"):
        top = predictor.top_k if name == "predicted-prefetch" and predictor is not None else 0
        # predicted-prefetch also forces the top k + 4 by the combined estimate (predictor and the
        # expert's own recent use): about k - 2 of those are resident already, the rest are the
        # likeliest misses the predictor alone ranks too low
        return PredictedPolicy(predictor=predictor, lookahead=lookahead, prior=prior, prefetch_top=top,
                               combined_top=top + 4 if top else 0, prefetch_from=prefetch_from,
                               reuse_weights=reuse_weights, reuse_mix=reuse_mix)
    if name in ("belady", "belady-prefetch"):
        if future is None:
            raise ValueError(f"cache policy {name!r} sees the future: it exists for trace replay only")
        return BeladyPolicy(future) if name == "belady" else BeladyPrefetchPolicy(future)
    raise ValueError(f"cache policy must be one of {', '.join(POLICY_NAMES)}, got {name!r}")


__all__ = ["CachePolicy", "LRUPolicy", "LFUPolicy", "StaticPolicy", "PredictedPolicy", "BeladyPolicy", "BeladyPrefetchPolicy",
           "make_policy", "next_use_table", "gap_counts", "POLICY_NAMES", "SERVING_POLICIES"]
