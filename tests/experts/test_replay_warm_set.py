"""The static policy's hot set is resident before the first token in the store (it is loaded at
start-up); the trace replay must start from it too, or its static figures are those of a cold cache
the runtime never has."""
from __future__ import annotations

import numpy as np
import torch

from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.experts.policies import StaticPolicy
from moe_serve.experts.replay import CostModel, replay
from tests.experts.sources import TinySource


def store_counts(experts: np.ndarray, load: np.ndarray, capacity: int) -> dict:
    """Run `experts` int [T, L, K] through the real offloading store (TinySource: 2 layers x 4 experts,
    every miss copied into a slot), layer by layer as a batch-1 decode; its hit and copy counters."""
    src = TinySource()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=capacity, policy=StaticPolicy(load),
                               top_k=experts.shape[2], cpu_experts="off", admit="always")
    x = torch.randn(1, 8)
    try:
        for row in experts:
            for layer, ids in enumerate(row.tolist()):
                store.begin_layer(layer, ids)
                for e in store.compute_order(layer, ids):
                    store.compute_expert(layer, ids[e], x)
                store.end_layer(layer)
        return store.metrics()
    finally:
        store.close()


def test_replay_starts_from_the_static_hot_set_as_the_store_does():
    # capacity 5, L = 2: the hot set is the 3 busiest experts, gids 0 (0, 0), 5 (1, 1) and 1 (0, 1)
    load = np.array([[9.0, 5.0, 1.0, 1.0], [1.0, 8.0, 1.0, 2.0]])
    experts = np.array([[[0], [1]], [[1], [1]], [[2], [3]], [[0], [1]], [[3], [0]], [[1], [1]]], dtype=np.int64)
    policy = StaticPolicy(load)
    r = replay(experts, 4, policy, 5, CostModel())
    assert sorted(policy.warm_set().tolist()) == [0, 1, 5]
    m = store_counts(experts, load, 5)
    # hand count, the hot set resident from the start: hits at t0 (0, 1), t1 (1, 1), t3 (0, 1), t5 (1, 1)
    # = 8 of 12; misses are the cold experts 2, 3 of layer 0 and 3, 0 of layer 1 (two slots churn)
    assert (m["hits"], m["misses"], m["copies"]) == (8, 4, 4), m
    assert round(r["hit_rate"] * r["accesses"]) == m["hits"] and r["accesses"] == m["hits"] + m["misses"]
    assert round(r["copies_per_token"] * r["tokens"]) == m["copies"]
    assert r["ready_in_time"] == r["hit_rate"]  # the hot set's copies are done before the first token
