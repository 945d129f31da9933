"""Training targets for every (token, layer) of a trace, vectorized: what each slot should predict.

Slot j of a lookahead-d predictor at layer l is the same token's layer l+1+j; for lookahead 0 it is
the next token's layer l. Rows without a target (past the last layer, end of a sequence) hold -1.
"""
from __future__ import annotations

import numpy as np
import torch

from predictors.base import next_index
from predictors.traces import RoutingTrace


def slot_targets(trace: RoutingTrace, lookahead: int) -> torch.Tensor:
    """long [T, L, D, K]: the true experts of each slot's target, -1 where there is none."""
    experts = torch.from_numpy(trace.experts.astype(np.int64))  # [T, L, K]
    T, L, K = experts.shape
    if lookahead == 0:
        nxt = torch.from_numpy(next_index(trace))
        tgt = torch.where((nxt >= 0)[:, None, None], experts[nxt.clamp(min=0)], -1)
        return tgt[:, :, None, :]
    out = torch.full((T, L, lookahead, K), -1, dtype=torch.long)
    for j in range(lookahead):
        d = j + 1
        if d < L:
            out[:, : L - d, j] = experts[:, d:]
    return out


def concat_targets(traces: list[RoutingTrace], lookahead: int) -> torch.Tensor:
    return torch.cat([slot_targets(t, lookahead) for t in traces])


def slot_target_dist(trace: RoutingTrace, lookahead: int) -> torch.Tensor:
    """float [T, L, D, E]: each slot target's gate weights as a distribution over experts (0 where none)."""
    ids = slot_targets(trace, lookahead)  # [T, L, D, K]
    w = torch.from_numpy(trace.weights.astype(np.float32))  # [T, L, K]
    T, L, K = w.shape
    if lookahead == 0:
        nxt = torch.from_numpy(next_index(trace))
        tw = w[nxt.clamp(min=0)][:, :, None, :]
    else:
        tw = torch.zeros(T, L, lookahead, K)
        for j in range(lookahead):
            if j + 1 < L:
                tw[:, : L - j - 1, j] = w[:, j + 1 :]
    valid = ids >= 0
    dist = torch.zeros(*ids.shape[:-1], trace.num_experts + 1)
    dist.scatter_add_(-1, torch.where(valid, ids, trace.num_experts), torch.where(valid, tw, 0.0))
    dist = dist[..., : trace.num_experts]
    return dist / dist.sum(-1, keepdim=True).clamp(min=1e-6)
