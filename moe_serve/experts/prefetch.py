"""The predictor's view of a running batch: a router hook that keeps each token's routing so far.

`RoutingHook` sits in the model's hook chain after routing replay (it sees the routing the experts
stage will use). Per step it fills experts/weights [N, L, K] layer by layer and knows each token's
previous token (the previous row of the same sequence in this step, or the sequence's last token of
the previous step), which is what `predictors.RoutingState` asks for. The store reads `state(layer)`
when its policy wants to query the predictor.

With a `learner` (a predictor that `adapts`, e.g. mlp_online), the hook also hands it the routing of
finished steps, `learn_every` tokens at a time (one `observe` call per chunk, after the step's
forward): the predictor keeps adapting to the served traffic, and only ever learns from routing that
has already happened. Prediction only steers copies, so this never changes what the model computes.
"""
from __future__ import annotations

import logging

import torch

from moe_serve.models.batch import ForwardBatch
from moe_serve.models.hooks import RouterHooks

log = logging.getLogger(__name__)


class RoutingHook(RouterHooks):
    active = True

    def __init__(self, num_layers: int, top_k: int, learner=None, learn_every: int = 64):
        if learn_every < 1:
            raise ValueError(f"RoutingHook: learn_every must be >= 1, got {learn_every}")
        self.L, self.K = num_layers, top_k
        self.learner, self.learn_every = learner, learn_every
        self._pending: list[tuple[torch.Tensor, ...]] = []  # finished steps' (experts, weights, prev_e, prev_w)
        self._pending_rows = 0
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # seq id -> ([L, K] ids, weights)
        self.experts = torch.full((0, num_layers, top_k), -1, dtype=torch.long)
        self.weights = torch.zeros((0, num_layers, top_k))
        self.prev_e, self.prev_w = self.experts, self.weights
        self._inner: torch.Tensor | None = None  # rows after the first of a prefill chunk (None: no such row)
        self._routed = -1  # last layer `route` filled this step

    def begin_step(self, batch: ForwardBatch) -> None:
        N, L, K = batch.num_tokens, self.L, self.K
        self.experts = torch.full((N, L, K), -1, dtype=torch.long)
        self.weights = torch.zeros((N, L, K))
        self.prev_e = torch.full((N, L, K), -1, dtype=torch.long)
        self.prev_w = torch.zeros((N, L, K))
        seq_ids = batch.seq_ids or batch.slot_ids
        inner, row = [], 0
        for sid, n in zip(seq_ids, batch.query_lens):
            if sid in self.last:
                self.prev_e[row], self.prev_w[row] = self.last[sid]
            inner += range(row + 1, row + n)  # rows after the first of a chunk
            row += n
        self._inner = torch.tensor(inner, dtype=torch.long) if inner else None  # once per step, not per layer
        self._routed = -1

    def route(self, moe_layer, hidden, expert_ids, weights):
        self.experts[:, moe_layer] = expert_ids.detach().to("cpu", torch.long)
        self.weights[:, moe_layer] = weights.detach().to("cpu", torch.float32)
        self._routed = max(self._routed, moe_layer)
        return None

    def state(self, layer: int):
        """`predictors.RoutingState` after `layer`'s router, for every token of the step."""
        from predictors.base import RoutingState

        experts, weights = self.experts, self.weights
        if self._routed > layer:  # layers are routed in order, so later ones are still unset (-1, 0): this
            known = (torch.arange(self.L) <= layer)[None, :, None]  # masking is needed only out of order
            experts, weights = torch.where(known, experts, -1), torch.where(known, weights, 0.0)
        prev_e, prev_w = self._previous()
        return RoutingState(experts=experts, weights=weights, prev_experts=prev_e, prev_weights=prev_w)

    def _previous(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's previous token's routing [N, L, K]: the row before it in a prefill chunk."""
        if self._inner is None:  # decode: every row's previous token is from an earlier step
            return self.prev_e, self.prev_w
        idx = self._inner
        prev_e, prev_w = self.prev_e.clone(), self.prev_w.clone()
        prev_e[idx], prev_w[idx] = self.experts[idx - 1], self.weights[idx - 1]
        return prev_e, prev_w

    def _learn(self) -> None:
        if self.learner is None or self.experts.shape[0] == 0:
            return
        self._pending.append((self.experts, self.weights, *self._previous()))
        self._pending_rows += self.experts.shape[0]
        if self._pending_rows < self.learn_every:
            return
        chunks, self._pending, self._pending_rows = self._pending, [], 0
        try:  # the forward runs in inference mode; learning needs autograd and ordinary tensors
            with torch.inference_mode(False):
                self.learner.observe(*(torch.cat(t) for t in zip(*chunks)))
        except Exception as exc:  # prediction only steers copies: a failing learner must not fail the step
            log.warning("expert cache: the predictor stopped learning online (%s: %s)", type(exc).__name__, exc)
            self.learner = None

    def end_step(self, batch: ForwardBatch) -> None:
        self._learn()
        live = {}
        row = 0
        for sid, n in zip(batch.seq_ids or batch.slot_ids, batch.query_lens):
            row += n
            live[sid] = (self.experts[row - 1].clone(), self.weights[row - 1].clone())
        self.last = live  # sequences not in this step are done or waiting: forget them
