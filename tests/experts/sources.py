"""Small expert sources and a wait helper shared by the offload store and copier tests."""
from __future__ import annotations

import time

import torch


class TinySource:
    """Two MoE layers of four random experts, as the loader's ExpertSource hands them out."""

    num_moe_layers, num_experts = 2, 4

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w = {(l, e): (torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g))
                  for l in range(2) for e in range(4)}

    def get(self, l, e):
        return self.w[l, e]


class BrokenSource(TinySource):
    def get(self, l, e):
        gu, dn = super().get(l, e)
        return (gu[:-1], dn) if (l, e) == (1, 2) else (gu, dn)  # a short gate_up: the copy fails


def settle(copier, *tickets_slots):
    """Until these copies have landed at the worker's own pace (waiting would run a queued copy here)."""
    for _ in range(5000):
        if all(copier.ready(t, s) for t, s in tickets_slots):
            return
        time.sleep(0.001)
