"""The offloading store's counters (`stats`) and `metrics()`, the figures derived from them.

`StoreMetrics` is a mixin of `OffloadExpertStore` (offload.py), split out to keep that file to the
per-step logic. It reads the store's `stats`, `prefetched`, `slot_gu`, `capacity`, `ring` and `expert_bytes`.
"""
from __future__ import annotations

import numpy as np


class StoreMetrics:
    def reset_metrics(self) -> None:
        # prefetches issued before are counted already (issued, copies): from now on their experts are
        # plain residents, else they would count as used, late or cancelled (a copy off `copies`) of none issued
        self.prefetched[:] = False
        # [capacity]: the slot's latest copy was counted since this reset (a cancel takes back only those)
        self.copy_counted = np.zeros(self.capacity, dtype=bool)
        # cpu_computed: misses computed where they lie by choice (cost model, cpu_experts on, CPU device);
        # cpu_overflow: run on the host because every slot held an expert of the same step
        self.stats = dict(hits=0, misses=0, cpu_computed=0, cpu_overflow=0, streamed=0, prefetch_issued=0,
                          prefetch_used=0, prefetch_wasted=0, prefetch_cancelled=0, prefetch_late=0,
                          prefetch_deferred=0, copies=0, bytes_moved=0, stall_s=0.0)

    def metrics(self) -> dict:
        s = dict(self.stats)
        acc = s["hits"] + s["misses"]
        s["hit_rate"] = s["hits"] / acc if acc else None
        s["prefetch_precision"] = s["prefetch_used"] / s["prefetch_issued"] if s["prefetch_issued"] else None
        demand = s["misses"] + s["prefetch_used"]
        s["prefetch_recall"] = s["prefetch_used"] / demand if demand else None
        # slots allocated: none when every miss is computed in place (CPU device, cpu_experts auto/on),
        # whatever the budget; the budget itself (expert_cache_slots or _gb, at most every expert) apart
        s["capacity"] = int(self.slot_gu.shape[0])
        s["capacity_configured"] = self.capacity
        # device bytes: slots + staging buffers = nbytes(), within expert_cache_gb (the factory pays both from it)
        s["staging_buffers"] = self.ring.n if self.ring is not None else 0
        s["slot_bytes"], s["staging_bytes"] = s["capacity"] * self.expert_bytes, s["staging_buffers"] * self.expert_bytes
        return s
