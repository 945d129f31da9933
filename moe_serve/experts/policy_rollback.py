"""Undo what a cache policy counted for a layer step that then failed.

The store tells the policy about a layer's accesses (`on_access`) and routing (`on_route`) in
`begin_layer`, before any expert is computed: the predicted policy needs them there (its next-use
scores and hints depend on them). When that layer then fails (a copy error, a failed host read,
Ctrl-C) the engine retries its requests, and the retry would count the same accesses again: LFU
counts and the predicted policy's use statistics inflated by every failure.

Policies (`policies/`) are plain numpy state and offer no undo of their own, so the store takes a
snapshot before `on_access` and puts it back when the layer fails. What it saves, per policy
attribute (the plan is worked out once per policy, from the arrays' shapes after `bind`):
- arrays with one row per MoE layer and per-expert detail below ([L, E, G]): row `layer` only
  (what an access of that layer changes; copying the whole array every layer step would cost more
  than the step's bookkeeping);
- other arrays sized by layer or expert ([L, E], [L * E], ...): all of them (small; a policy's
  periodic refresh rewrites them whole);
- everything else (scalars, sets, dicts): the value, shallow-copied where mutable; an attribute the
  policy rebinds (a refreshed table) gets its old object back.
"""
from __future__ import annotations

import copy

import numpy as np


class PolicySnapshot:
    def __init__(self, policy):
        self.policy = policy
        self._arrays: list[tuple[str, bool]] | None = None  # (array attribute, row only?)
        self._containers: list[str] = []  # attributes holding a set, dict or list (copied, not shared)
        self._saved: tuple | None = None

    def _make_plan(self) -> None:
        p = self.policy
        L, E = p.num_layers, p.num_experts
        self._arrays = [(name, v.ndim >= 3 and v.shape[0] == L) for name, v in vars(p).items()
                        if isinstance(v, np.ndarray) and v.ndim and v.shape[0] in (L, L * E)]
        self._containers = [name for name, v in vars(p).items() if isinstance(v, (set, dict, list))]

    def take(self, layer: int) -> None:
        """Before the policy hears of `layer`'s accesses (a few microseconds: this runs every layer step)."""
        if self._arrays is None:
            self._make_plan()
        p = self.policy
        attrs = dict(vars(p))
        for name in self._containers:
            attrs[name] = copy.copy(attrs[name])
        arrays = [(name, layer if row else slice(None), attrs[name][layer if row else slice(None)].copy())
                  for name, row in self._arrays]
        self._saved = (attrs, arrays)

    def restore(self) -> None:
        """The layer failed: the policy as it was at `take` (once; later calls do nothing)."""
        if self._saved is None:
            return
        attrs, arrays = self._saved
        self._saved = None
        vars(self.policy).clear()
        vars(self.policy).update(attrs)
        for name, index, values in arrays:  # into the object the restored attribute names
            getattr(self.policy, name)[index] = values

    def discard(self) -> None:
        """The layer succeeded: nothing to undo."""
        self._saved = None
