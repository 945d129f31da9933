"""expert_cache.prefetch_from=auto: the nearest MoE layer ahead a prefetch can land for, measured.

`cache-sim --prefetch-from auto` derives it from its cost model (`CostModel.prefetch_from("auto")`:
ceil(copy time / layer time)). The runtime does the same with the same function, fed with what it
measures: the copy time of one expert from the start-up cost model (`cost.measure_costs`, a real
copy into a real slot), and the layer time from the first `samples` layer steps it serves, each
the time from one MoE layer's `begin_layer` to the next layer's of the same step (attention,
router and experts, as the cost model's layer time is), counted only for a layer whose experts
were all in place when it began (a layer that waits for a copy would count the copy as compute).
Until then the policy prefetches from the next layer (1, the default). On CUDA the times are
events on the compute stream, read once they have completed (no host sync); on CPU, wall time.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch

from moe_serve.experts.cost import ExpertCosts
from moe_serve.experts.replay import CostModel

log = logging.getLogger(__name__)


def prefetch_from_auto(costs: ExpertCosts, layer_s: float) -> int:
    """The replay's rule (`CostModel.prefetch_from("auto")`) on the runtime's measurements."""
    return CostModel(expert_bytes=costs.bytes_per_expert, bandwidth_gbps=costs.bandwidth / 1e9,
                     layer_ms=max(layer_s, 1e-9) * 1e3).prefetch_from("auto")


class AutoPrefetchFrom:
    def __init__(self, policy, costs: ExpertCosts, device: torch.device, lookahead: int, samples: int = 32):
        self.policy, self.costs, self.lookahead, self.samples = policy, costs, lookahead, samples
        self.cuda = torch.device(device).type == "cuda"
        self.layer_s: list[float] = []  # measured layer times
        self._pending: list[tuple] = []  # CUDA: (start event, end event) not read yet
        self._prev = None  # (moe_layer, clock, in place at its start, its mark)
        self.resolved: int | None = None

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, store, moe_layer: int) -> bool:
        """At the start of `store`'s begin_layer, before the policy hears of the layer (so that a
        rollback of a failed layer cannot undo the setting); True once prefetch_from is set."""
        now = self._now()
        if self._prev is not None:
            layer, clock, was_in_place, then = self._prev
            if was_in_place and moe_layer == layer + 1 and store.clock == clock + 1:  # the next layer of one step
                if self.cuda:
                    self._pending.append((then, now))
                else:
                    self.layer_s.append(now - then)
        self._prev = (moe_layer, store.clock, False, now)
        while self._pending and self._pending[0][1].query():  # completed on the device: readable without a sync
            start, end = self._pending.pop(0)
            self.layer_s.append(start.elapsed_time(end) / 1e3)
        return self._resolve()

    def note_in_place(self, store) -> None:
        """Later in the same begin_layer, its copies queued: are all the layer's experts in place (no
        miss, no copy still running)? Only such a layer's time is a layer time."""
        in_place = not (store._on_host or store._streamed) and all(
            store.copier.ready(int(store.ticket[s]), s) for s in store._used_slots)
        self._prev = (*self._prev[:2], in_place, self._prev[3])

    def _resolve(self) -> bool:
        if len(self.layer_s) < self.samples:
            return False
        layer_s = statistics.median(self.layer_s)
        self.resolved = prefetch_from_auto(self.costs, layer_s)
        self.policy.prefetch_from = self.resolved
        copy_s = self.costs.bytes_per_expert / self.costs.bandwidth
        log.info("expert_cache.prefetch_from=auto: %d (copy %.3g ms, layer %.3g ms, median of %d layer steps)",
                 self.resolved, copy_s * 1e3, layer_s * 1e3, len(self.layer_s))
        if self.resolved > self.lookahead:
            log.warning("expert_cache.prefetch_from=auto resolved to %d, beyond the %d MoE layer(s) predicted ahead: "
                        "no predicted layer is prefetched for (the forecast still steers eviction)",
                        self.resolved, self.lookahead)
        return True
