"""Routing statistics a placement is fitted on: load, co-activation, layer-to-layer transitions.

All functions take the trace's `experts` array (int [T, L, K]) or a RoutingTrace and return plain numpy:

    expert_load      float64 [L, E]       tokens routed to each expert (every top-k choice counts)
    coactivation     float64 [L, E, E]    tokens that chose both e and f at the same layer (diag 0)
    transitions      float64 [L-1, E, E]  tokens that chose e at layer l and f at layer l+1
    window_loads     float64 [W, L, E]    expert_load over consecutive windows of rows

Co-activation is what fan-out depends on: a token's k experts cost one dispatch copy per distinct rank,
so experts that are often chosen together should share a rank. Transitions matter for cross-layer rank
changes (a token whose next-layer experts sit on the same rank needs no new hop for its hidden state).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _experts(x) -> np.ndarray:
    arr = getattr(x, "experts", x)
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"stats: experts must be [T, L, K], got shape {arr.shape}")
    return arr.astype(np.int64)


def _num_experts(x, num_experts: int | None) -> int:
    if num_experts is not None:
        return int(num_experts)
    if hasattr(x, "num_experts"):
        return int(x.num_experts)
    arr = _experts(x)
    return int(arr.max()) + 1 if arr.size else 1


def expert_load(x, num_experts: int | None = None) -> np.ndarray:
    """float64 [L, E]: how many of the trace's tokens chose each expert, per layer."""
    ex, E = _experts(x), _num_experts(x, num_experts)
    T, L, K = ex.shape
    flat = (np.arange(L)[None, :, None] * E + ex).ravel()
    return np.bincount(flat, minlength=L * E).reshape(L, E).astype(np.float64)


def coactivation(x, num_experts: int | None = None) -> np.ndarray:
    """float64 [L, E, E]: tokens that chose both experts at the same layer (symmetric, zero diagonal)."""
    ex, E = _experts(x), _num_experts(x, num_experts)
    T, L, K = ex.shape
    out = np.zeros((L, E, E), dtype=np.float64)
    for l in range(L):
        onehot = np.zeros((T, E), dtype=np.float32)
        np.put_along_axis(onehot, ex[:, l], 1.0, axis=1)
        c = onehot.T @ onehot  # [E, E]
        np.fill_diagonal(c, 0.0)
        out[l] = c
    return out


def transitions(x, num_experts: int | None = None) -> np.ndarray:
    """float64 [L-1, E, E]: tokens with e among layer l's choices and f among layer l+1's."""
    ex, E = _experts(x), _num_experts(x, num_experts)
    T, L, K = ex.shape
    out = np.zeros((max(L - 1, 0), E, E), dtype=np.float64)
    prev = None
    for l in range(L):
        onehot = np.zeros((T, E), dtype=np.float32)
        np.put_along_axis(onehot, ex[:, l], 1.0, axis=1)
        if prev is not None:
            out[l - 1] = prev.T @ onehot
        prev = onehot
    return out


def window_loads(x, window: int, stride: int | None = None, num_experts: int | None = None) -> np.ndarray:
    """float64 [W, L, E]: expert_load over rows [s, s+window) for s = 0, stride, ... (last partial dropped
    unless it is the only window)."""
    ex, E = _experts(x), _num_experts(x, num_experts)
    if window < 1:
        raise ValueError(f"stats: window must be >= 1, got {window}")
    stride = stride or window
    T = ex.shape[0]
    starts = list(range(0, max(T - window, 0) + 1, stride)) or [0]
    return np.stack([expert_load(ex[s:s + window], E) for s in starts])


@dataclass
class RoutingStats:
    """The statistics an algorithm may use, fitted on one trace (or a window of one)."""

    load: np.ndarray  # [L, E]
    coact: np.ndarray  # [L, E, E]
    trans: np.ndarray  # [L-1, E, E]
    window_load: np.ndarray  # [W, L, E]
    num_tokens: int

    @classmethod
    def from_experts(cls, x, num_experts: int | None = None, window: int = 512) -> "RoutingStats":
        ex, E = _experts(x), _num_experts(x, num_experts)
        return cls(expert_load(ex, E), coactivation(ex, E), transitions(ex, E),
                   window_loads(ex, min(window, max(ex.shape[0], 1)), num_experts=E), int(ex.shape[0]))
