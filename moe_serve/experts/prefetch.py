"""The predictor's view of a running batch: a router hook that keeps each token's routing so far.

`RoutingHook` sits in the model's hook chain after routing replay (it sees the routing the experts
stage will use). Per step it fills experts/weights [N, L, K] layer by layer and knows each token's
previous token (the previous row of the same sequence in this step, or the sequence's last token of
the previous step), which is what `predictors.RoutingState` asks for. The store reads `state(layer)`
when its policy wants to query the predictor.
"""
from __future__ import annotations

import torch

from moe_serve.models.batch import ForwardBatch
from moe_serve.models.hooks import RouterHooks


class RoutingHook(RouterHooks):
    active = True

    def __init__(self, num_layers: int, top_k: int):
        self.L, self.K = num_layers, top_k
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # seq id -> ([L, K] ids, weights)
        self.experts = torch.full((0, num_layers, top_k), -1, dtype=torch.long)
        self.weights = torch.zeros((0, num_layers, top_k))
        self.prev_e, self.prev_w = self.experts, self.weights
        self.seq_of: list[int] = []

    def begin_step(self, batch: ForwardBatch) -> None:
        N, L, K = batch.num_tokens, self.L, self.K
        self.experts = torch.full((N, L, K), -1, dtype=torch.long)
        self.weights = torch.zeros((N, L, K))
        self.prev_e = torch.full((N, L, K), -1, dtype=torch.long)
        self.prev_w = torch.zeros((N, L, K))
        seq_ids = batch.seq_ids or batch.slot_ids
        self.seq_of, self.first_row = [], []
        row = 0
        for sid, n in zip(seq_ids, batch.query_lens):
            if sid in self.last:
                self.prev_e[row], self.prev_w[row] = self.last[sid]
            self.seq_of += [sid] * n
            self.first_row += [row] + [-1] * (n - 1)
            row += n

    def route(self, moe_layer, hidden, expert_ids, weights):
        self.experts[:, moe_layer] = expert_ids.detach().to("cpu", torch.long)
        self.weights[:, moe_layer] = weights.detach().to("cpu", torch.float32)
        return None

    def state(self, layer: int):
        """`predictors.RoutingState` after `layer`'s router, for every token of the step."""
        from predictors.base import RoutingState

        known = (torch.arange(self.L) <= layer)[None, :, None]
        prev_e, prev_w = self.prev_e.clone(), self.prev_w.clone()
        inner = torch.tensor([r < 0 for r in self.first_row], dtype=torch.bool)  # rows after the first of a chunk
        if inner.any():
            idx = torch.nonzero(inner).squeeze(1)
            prev_e[idx], prev_w[idx] = self.experts[idx - 1], self.weights[idx - 1]
        return RoutingState(
            experts=torch.where(known, self.experts, -1), weights=torch.where(known, self.weights, 0.0),
            prev_experts=prev_e, prev_weights=prev_w,
        )

    def end_step(self, batch: ForwardBatch) -> None:
        live = {}
        row = 0
        for sid, n in zip(batch.seq_ids or batch.slot_ids, batch.query_lens):
            row += n
            live[sid] = (self.experts[row - 1].clone(), self.weights[row - 1].clone())
        self.last = live  # sequences not in this step are done or waiting: forget them
