"""Hooks around each MoE layer's router: the trace recorder, routing replay and the predictor.

The model calls `hooks.route(...)` right after each router has produced its choice, with the
router's inputs and outputs. `NO_HOOKS` does nothing and costs nothing (no tensor is copied), so
recording off is free. A hook may replace the routing (replay) by returning new ids and weights.

Shapes: N tokens in the step, H hidden size, K experts per token.
"""
from __future__ import annotations

import torch

from moe_serve.models.batch import ForwardBatch


class RouterHooks:
    """Base class and the no-op: subclasses override what they need."""

    active: bool = False  # False: the model skips calling the hooks at all
    # True: route() reads only expert_ids (hidden may be None) and never replaces the routing, so a
    # compiled step may report a step's routing after the fact (models/compiled.py)
    reads_ids_only: bool = False

    def begin_step(self, batch: ForwardBatch) -> None:
        """Called once before the forward of a step."""

    def route(
        self,
        moe_layer: int,  # index among the MoE layers (0 .. L-1), not the model layer
        hidden: torch.Tensor | None,  # [N, H] the hidden state entering the router (None: see reads_ids_only)
        expert_ids: torch.Tensor,  # long [N, K] the router's choice
        weights: torch.Tensor,  # [N, K] their combine weights
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Observe (and optionally replace) one layer's routing; return None to keep it."""
        return None

    def end_step(self, batch: ForwardBatch) -> None:
        """Called once after the forward of a step."""

    def fork(self, parent: int, children: list[int], rows: int | None = None) -> None:
        """Sequences `children` go on from `parent`'s computed rows, all of them or its first `rows` (their
        KV is a copy of its prompt's: a request's n completions share one prefill); a hook keeping rows
        per sequence copies them."""


NO_HOOKS = RouterHooks()


class HookChain(RouterHooks):
    """Several hooks in order; a replacement by one is what the next ones see."""

    def __init__(self, hooks: list[RouterHooks]):
        self.hooks = [h for h in hooks if h.active]
        self.active = bool(self.hooks)

    @property
    def reads_ids_only(self) -> bool:
        return all(h.reads_ids_only for h in self.hooks)

    def begin_step(self, batch):
        for h in self.hooks:
            h.begin_step(batch)

    def route(self, moe_layer, hidden, expert_ids, weights):
        replaced = None
        for h in self.hooks:
            out = h.route(moe_layer, hidden, expert_ids, weights)
            if out is not None:
                expert_ids, weights = out
                replaced = out
        return replaced

    def end_step(self, batch):
        for h in self.hooks:
            h.end_step(batch)

    def fork(self, parent, children, rows=None):
        for h in self.hooks:
            h.fork(parent, children, rows)
