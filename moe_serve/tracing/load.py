"""Per-layer expert load: tokens routed to each expert of each MoE layer, counted on the device.

`route` only keeps a reference to each layer's choice; `end_step` counts the whole step with one
`bincount` over (layer, expert) pairs, accumulated in a device tensor (no host sync in the step,
a handful of ops per step instead of per layer). The CLI's load table and the server's /metrics
read a snapshot.
"""
from __future__ import annotations

import numpy as np
import torch

from moe_serve.models.hooks import RouterHooks


class ExpertLoadCounter(RouterHooks):
    active = True
    reads_ids_only = True

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.long, device=device)  # [L, E]
        self._offsets = torch.arange(num_layers, device=device) * num_experts  # [L] first bin of each layer
        self._step: list[tuple[int, torch.Tensor]] = []  # (moe layer, expert ids [N, K]) seen this step

    def begin_step(self, batch) -> None:
        self._step.clear()

    def route(self, moe_layer, hidden, expert_ids, weights):
        self._step.append((moe_layer, expert_ids))
        return None

    def end_step(self, batch) -> None:
        if not self._step:
            return
        layers = torch.tensor([layer for layer, _ in self._step], device=self.counts.device)
        ids = torch.stack([e.reshape(-1) for _, e in self._step])  # [layers seen, N*K]
        bins = (ids + self._offsets[layers, None]).reshape(-1)
        self.counts += torch.bincount(bins, minlength=self.counts.numel()).view_as(self.counts)
        self._step.clear()

    def snapshot(self) -> np.ndarray:
        """int64 [L, E] cumulative token counts."""
        return self.counts.cpu().numpy().copy()

    def reset(self) -> None:
        self.counts.zero_()
