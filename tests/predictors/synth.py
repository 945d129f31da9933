"""Synthetic routing traces with a known structure that a predictor must recover.

- `layer_map_trace`: the experts at layer l+1 are a fixed permutation of those at layer l
  (a deterministic layer-to-layer map; layer 0 is random per token).
- `copy_trace`: every token of a sequence routes exactly like the sequence's first token.
- `router_trace`: experts are the top-k of a random linear router on a hidden state that drifts
  a little from layer to layer (hidden states recorded).
"""
from __future__ import annotations

import numpy as np

from predictors.traces import RoutingTrace


def _offsets(rng, tokens: int, seqs: int) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, tokens), size=seqs - 1, replace=False))
    return np.concatenate([[0], cuts, [tokens]]).astype(np.int64)


def _weights(rng, shape) -> np.ndarray:
    w = np.sort(rng.random(shape), axis=-1)[..., ::-1]
    return (w / w.sum(-1, keepdims=True)).astype(np.float16)


def layer_map_trace(tokens=600, L=5, E=16, K=2, seqs=12, seed=0, perms=None) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    perms = perms if perms is not None else np.stack([np.random.default_rng(100 + l).permutation(E) for l in range(L)])
    ex = np.zeros((tokens, L, K), np.int64)
    ex[:, 0] = np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)])
    for l in range(1, L):
        ex[:, l] = perms[l][ex[:, l - 1]]
    return RoutingTrace(ex.astype(np.int16), _weights(rng, ex.shape), _offsets(rng, tokens, seqs), E)


def copy_trace(tokens=600, L=5, E=16, K=2, seqs=30, seed=0) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    offs = _offsets(rng, tokens, seqs)
    ex = np.zeros((tokens, L, K), np.int64)
    for s in range(seqs):
        pattern = np.stack([rng.choice(E, K, replace=False) for _ in range(L)])  # [L, K]
        ex[offs[s] : offs[s + 1]] = pattern
    return RoutingTrace(ex.astype(np.int16), _weights(rng, ex.shape), offs, E)


def router_trace(tokens=600, L=4, E=16, K=2, H=32, seqs=10, drift=0.05, seed=0, routers=None):
    """(trace with hidden [T, L, H], routers [L, E, H])."""
    rng = np.random.default_rng(seed)
    routers = routers if routers is not None else np.random.default_rng(7).standard_normal((L, E, H)).astype(np.float32)
    h = rng.standard_normal((tokens, H)).astype(np.float32)
    hidden = np.zeros((tokens, L, H), np.float32)
    for l in range(L):
        hidden[:, l] = h
        h = h + drift * rng.standard_normal((tokens, H)).astype(np.float32)
    logits = np.einsum("tlh,leh->tle", hidden, routers)
    ex = np.argsort(-logits, -1)[..., :K]
    w = np.take_along_axis(np.exp(logits - logits.max(-1, keepdims=True)), ex, -1)
    trace = RoutingTrace(ex.astype(np.int16), w.astype(np.float16), _offsets(rng, tokens, seqs), E, hidden=hidden.astype(np.float16))
    return trace, routers
