"""`stall_s`: the time the compute thread spent waiting for expert weights, and nothing else."""
from __future__ import annotations

import time

import pytest
import torch

from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.experts.policies import LRUPolicy
from moe_serve.experts.store import expert_forward
from tests.experts.sources import SlowSource, settle

DELAY = 0.02  # each copy out of the source (two per expert) takes at least this long


def _copy_of(store, g):
    """(ticket, copier slot) of the copy that brings expert `g` of this layer in: into its staging
    buffer when streamed, else into its cache slot."""
    if g in store._streamed:
        b = store.ring.where[store._streamed[g]]
        return store.ring.ticket[b], store.ring.first + b
    slot = int(store.cache.slot_of[g])
    return int(store.ticket[slot]), slot


@pytest.mark.parametrize("admit", ["reuse", "always"])
def test_stall_is_the_time_spent_waiting(admit):
    """A miss, streamed through the staging ring (reuse: its expert was not used lately) or given a
    cache slot (always), stalls for nothing when its copy has landed (the streamed path used to
    time the ring's bookkeeping as stall), and, when the compute thread has to run the copy (the
    worker held), for between the copy's own time and the whole call's."""
    src = SlowSource(DELAY)
    # reuse: one slot, filled first, so both misses below stream (a miss takes a free slot when there is one)
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=1 if admit == "reuse" else 3, policy=LRUPolicy(),
                               top_k=2, cpu_experts="off", host="mmap", admit=admit)
    x = torch.randn(2, 8)
    if admit == "reuse":
        store.begin_layer(1, [3])
        store.get(1, 3)
        store.end_layer(1)
        store.reset_metrics()
    store.begin_layer(0, [0])  # a miss: the worker copies it meanwhile
    settle(store.copier, _copy_of(store, 0))
    assert store.copier.ready(*_copy_of(store, 0))
    torch.testing.assert_close(store.compute_expert(0, 0, x), expert_forward(x, *src.w[0, 0]))
    store.end_layer(0)
    assert store.stats["stall_s"] == 0.0  # landed before it was needed: no wait
    with store.copier._cv:  # the worker cannot start a copy: the compute thread runs it (waits for it)
        store.begin_layer(1, [1])
        n = len(src.copy_s)
        t0 = time.perf_counter()
        torch.testing.assert_close(store.compute_expert(1, 1, x), expert_forward(x, *src.w[1, 1]))
        wall = time.perf_counter() - t0
        store.end_layer(1)
    copy = sum(src.copy_s[n:])  # gate_up and down, in this thread
    assert len(src.copy_s) == n + 2 and copy >= 2 * DELAY
    assert copy <= store.stats["stall_s"] <= wall
    assert store.metrics()["streamed"] == (2 if admit == "reuse" else 0)
    store.close()
