"""Predictor forecasts of the next MoE layer's dispatch counts, for the pre-planned all-to-all.

After layer l's router, `RoutingLog.forecast` asks a fitted `predictors` predictor to score layer
l+1's experts for this rank's tokens (`Predictor.predict(state, l)`, slot 0 = layer l+1), takes
each token's top-k, maps the ids through the placement plan with the replica rule the dispatch
itself uses (`ep._slots`), and counts the rows (distinct (token, rank) pairs) this rank will send
to every rank at layer l+1. The dispatch of layer l carries these counts to their receivers in its
block headers, so both sides of every block size layer l+1's buffers from the same forecast
without a message (see preplan.py).

The `RoutingState` is what this rank knows: its tokens' ids and gate weights of layers <= l in
this step, the previous token's routing of the same sequence where the runner knows it (decode
rows: the slot's last token of the previous step; -1 elsewhere), and the router input as hidden.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from moe_serve.distributed.ep import _slots


def load_forecaster(path: str, num_layers: int, num_experts: int, top_k: int):
    """The predictor file at `path`, checked against the model (parallel.preplan_predictor); a ValueError naming
    that option for a file absent, unreadable or not a predictor."""
    from predictors import load_predictor

    try:
        pred = load_predictor(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"parallel.preplan_predictor: {exc}") from exc
    got, want = (pred.num_layers, pred.num_experts, pred.top_k), (num_layers, num_experts, top_k)
    if got != want:
        raise ValueError(f"parallel.preplan_predictor: {path} predicts (MoE layers, experts, top_k)={got}, "
                         f"the model has {want}")
    if pred.lookahead < 1:
        raise ValueError(f"parallel.preplan_predictor: {path} has lookahead={pred.lookahead}; the dispatch "
                         "forecast needs lookahead >= 1 (slot 0 = the next MoE layer)")
    return pred


class RoutingLog:
    """This step's routing of this rank's tokens, layer by layer, and the forecasts built from it."""

    def __init__(self, predictor, num_layers: int, top_k: int):
        self.predictor, self.L, self.K = predictor, num_layers, top_k
        self.prev_experts: torch.Tensor | None = None  # long [n, L, K] set by the runner before a step
        self.prev_weights: torch.Tensor | None = None
        self.experts = torch.empty(0, num_layers, top_k, dtype=torch.long)
        self.weights = torch.empty(0, num_layers, top_k)
        self.caps: dict[int, tuple[list[int], list[int]]] = {}  # layer -> (send, recv) forecast rows per rank

    def begin(self, n: int) -> None:
        """Layer 0 of a step with n tokens on this rank: forget the last step's routing and forecasts."""
        self.experts = torch.full((n, self.L, self.K), -1, dtype=torch.long)
        self.weights = torch.zeros(n, self.L, self.K)
        self.caps = {}
        if self.prev_experts is None or self.prev_experts.shape[0] != n:
            self.prev_experts, self.prev_weights = self.experts.clone(), self.weights.clone()

    def forecast(self, l: int, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, plan, stats: dict):
        """long [W] forecast rows to each rank at MoE layer l+1 (None after the last layer)."""
        self.experts[:, l] = ids.long()
        self.weights[:, l] = weights.float()
        if l + 1 >= self.L:
            return None
        t = time.perf_counter()
        p = self.predictor
        from predictors import RoutingState

        state = RoutingState(experts=self.experts, weights=self.weights, prev_experts=self.prev_experts,
                             prev_weights=self.prev_weights, hidden=x.float() if p.needs_hidden else None)
        with torch.no_grad():
            scores = p.predict(state, l)[:, 0]  # [n, E]: layer l+1
        top = scores.topk(self.K, dim=-1).indices.numpy()  # [n, K]
        dest = _slots(plan, l + 1, top) // plan.slots_per_rank  # [n, K]
        touched = np.zeros((len(top), plan.num_ranks), dtype=bool)
        touched[np.arange(len(top))[:, None], dest] = True
        stats["predict_s"] += time.perf_counter() - t
        return torch.from_numpy(touched.sum(0).astype(np.int64))


def prev_routing(log: RoutingLog, memory: dict, slot_ids, query_lens, context_lens) -> None:
    """Set log.prev_* for the next step's rows from `memory` (slot -> last token's [L, K] ids, weights):
    the first row of a sequence that continues (context > 0) gets its slot's last token; others -1."""
    n = int(sum(query_lens))
    pe = torch.full((n, log.L, log.K), -1, dtype=torch.long)
    pw = torch.zeros(n, log.L, log.K)
    row = 0
    for s, q, c in zip(slot_ids, query_lens, context_lens):
        if c > 0 and s in memory:
            pe[row], pw[row] = memory[s]
        row += q
    log.prev_experts, log.prev_weights = pe, pw


def remember(log: RoutingLog, memory: dict, slot_ids, query_lens) -> None:
    """After a step: each slot's last row's full routing becomes the next step's previous token."""
    row = 0
    for s, q in zip(slot_ids, query_lens):
        row += q
        if row - 1 < log.experts.shape[0]:
            memory[s] = (log.experts[row - 1].clone(), log.weights[row - 1].clone())
