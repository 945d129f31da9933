"""Per-layer expert load: tokens routed to each expert of each MoE layer, counted on the device.

One `bincount` per MoE layer per step, accumulated in a device tensor (no host sync in the step);
the CLI's load table and the server's /metrics read a snapshot.
"""
from __future__ import annotations

import numpy as np
import torch

from moe_serve.models.hooks import RouterHooks


class ExpertLoadCounter(RouterHooks):
    active = True

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str = "cpu"):
        self.num_experts = num_experts
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.long, device=device)  # [L, E]

    def route(self, moe_layer, hidden, expert_ids, weights):
        self.counts[moe_layer] += torch.bincount(expert_ids.reshape(-1), minlength=self.num_experts)
        return None

    def snapshot(self) -> np.ndarray:
        """int64 [L, E] cumulative token counts."""
        return self.counts.cpu().numpy().copy()

    def reset(self) -> None:
        self.counts.zero_()
