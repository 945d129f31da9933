"""Ctrl-C landing while the offloading store gives an expert a slot and queues its copy: whatever point
it lands at (`interrupts.py`), the expert's next use must compute with its own weights, never with
what the slot held before (LLM.generate aborts its requests on Ctrl-C and the engine serves on)."""
from __future__ import annotations


import torch

from moe_serve.experts.cache import SlotCache
from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.experts.policies import LRUPolicy
from moe_serve.experts.slot_copies import SlotCopies
from moe_serve.experts.store import expert_forward
from tests.experts.interrupts import call_interrupted, interrupt_at
from tests.experts.sources import TinySource

TRACED = (SlotCopies._copy_in, getattr(SlotCopies, "host_copy_source", None), SlotCache.insert,
          OffloadExpertStore.host_expert, OffloadExpertStore.begin_layer)


def test_ctrl_c_while_an_expert_takes_a_slot_never_leaves_it_the_victims_weights():
    """Interrupted right after the cache gave (0, 1) the slot of (0, 0) and before its copy was
    queued (the try that takes the slot back began later), (0, 1) stayed resident with the slot's
    old ticket, long landed: its next use was a hit computed with (0, 0)'s weights."""
    src, x = TinySource(), torch.randn(3, 8)
    k = 0
    while True:
        store = OffloadExpertStore(src, torch.float32, "cpu", capacity=1, policy=LRUPolicy(), top_k=2,
                                   cpu_experts="off", admit="always")
        store.begin_layer(0, [0])
        store.compute_expert(0, 0, x)
        store.end_layer(0)
        tracer, fired = interrupt_at(k, TRACED)
        call_interrupted(tracer, store.begin_layer, 0, [1])  # (0, 1) evicts (0, 0) from the one slot
        if not fired[0]:  # begin_layer ran to its end before a k-th point: every point was tried
            assert k > 10
            store.close()
            return
        for e in (1, 0, 1):  # the next steps (the engine starts the layer afresh)
            store.begin_layer(0, [e])
            y = store.compute_expert(0, e, x)
            store.end_layer(0)
            torch.testing.assert_close(y, expert_forward(x, *src.w[0, e]), msg=f"interrupted at point {k}, expert {e}")
        store.close()
        k += 1
