"""Small expert sources and a wait helper shared by the offload store and copier tests."""
from __future__ import annotations

import time

import numpy as np
import torch

from predictors.baselines import TransitionPredictor
from predictors.traces import RoutingTrace


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


class SlowTensor(torch.Tensor):
    """A host tensor whose copy out (`dst.copy_(self)`) takes at least `delay` seconds longer, and
    records the time each such copy took in `copy_s`: a copy source slowed down deterministically."""

    delay: float = 0.0
    copy_s: list[float] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            if func is not torch.Tensor.copy_:
                return func(*args, **(kwargs or {}))
            t0 = time.perf_counter()
            time.sleep(cls.delay)
            out = func(*args, **(kwargs or {}))
            cls.copy_s.append(time.perf_counter() - t0)
            return out


class SlowSource(TinySource):
    """TinySource whose experts copy out slowly (`SlowTensor`); `copy_s` lists each copy's time."""

    def __init__(self, delay: float):
        super().__init__()
        self.slow = type("Slow", (SlowTensor,), dict(delay=delay, copy_s=[]))
        self.copy_s = self.slow.copy_s

    def get(self, l, e):
        return tuple(t.as_subclass(self.slow) for t in super().get(l, e))


def fitted_predictor(path, layers: int, experts: int, top_k: int, lookahead: int = 1):
    """A transition predictor fitted on random routing of the model's shape, saved to `path`."""
    rng = np.random.default_rng(0)
    ex = np.stack([rng.permutation(experts)[:top_k] for _ in range(200 * layers)]).reshape(200, layers, top_k)
    trace = RoutingTrace(experts=ex.astype(np.int16), weights=np.ones(ex.shape, dtype=np.float16),
                         seq_offsets=np.array([0, 200]), num_experts=experts)
    TransitionPredictor(layers, experts, top_k, lookahead=lookahead).fit([trace]).save(path)
    return str(path)
