"""Cache policies on hand-worked access sequences, and the slot cache's invariants.

One layer (L=1) of E experts makes the global id the expert id and every access its own clock, so
the classic textbook sequences apply unchanged.
"""
from __future__ import annotations

import numpy as np
import pytest

from moe_serve.experts.cache import CacheFull, SlotCache
from moe_serve.experts.policies import (BeladyPolicy, LFUPolicy, LRUPolicy, PredictedPolicy, StaticPolicy,
                                        make_policy, next_use_table)

SEQ = [0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2]  # the classic page-reference string, E = 5


def run_demand(policy, seq, capacity, E=5):
    """Replay single accesses; returns (hits, evicted ids in order)."""
    cache = SlotCache(policy, 1, E, capacity)
    hits, evicted = 0, []
    for clock, e in enumerate(seq):
        cache.begin_step([e])
        policy.on_access(0, np.array([e]), clock)
        if cache.resident(e):
            hits += 1
            continue
        _, ev = cache.insert(e)
        if ev >= 0:
            evicted.append(ev)
    return hits, evicted


def test_lru_hand_worked():
    # cap 3: misses 0 1 2 | hit 0 | 3 evicts 1 | hit 0 | 4 evicts 2 | 2 evicts 3 | 3 evicts 0 | 0 evicts 4 | hit 3 | 2 evicts 0? no:
    # after "0" (clock 9) the cache holds {2, 3, 0}; 3 hits, then 2 hits.
    hits, evicted = run_demand(LRUPolicy(), SEQ, 3)
    assert evicted == [1, 2, 3, 0, 4]
    assert hits == 12 - 3 - 5


def test_belady_hand_worked():
    future = np.array(SEQ)[:, None]
    hits, evicted = run_demand(BeladyPolicy(future), SEQ, 3)
    # at 3 (clock 4): next uses 0@5, 1@never, 2@7 -> evict 1; at 4 (clock 6): 0@9, 2@7, 3@8 -> evict 0;
    # at 0 (clock 9): 4@never, 2@11, 3@10 -> evict 4. Misses: 0 1 2 3 4 0 = 6.
    assert evicted == [1, 0, 4]
    assert hits == 6


def test_lfu_hand_worked():
    # counts decide; ties go to the least recent. At 3 (clock 4): counts 0:2, 1:1, 2:1 -> 1 (older);
    # at 4 (clock 6): 0:3, 2:1, 3:1 -> 2 (older); at 2 (clock 7): 0:3, 3:1, 4:1 -> 3 (older);
    # at 3 (clock 8): 0:3, 4:1, 2:2 -> 4; hits: 0@3, 0@5, 0@9, 3@10, 2@11.
    hits, evicted = run_demand(LFUPolicy(), SEQ, 3)
    assert evicted == [1, 2, 3, 4]
    assert hits == 5


def test_belady_is_a_bound():
    rng = np.random.default_rng(1)
    seq = list(rng.zipf(1.4, 400) % 12)
    bel, _ = run_demand(BeladyPolicy(np.array(seq)[:, None]), seq, 4, E=12)
    for pol in (LRUPolicy(), LFUPolicy(), StaticPolicy(np.arange(12.0)[None]), PredictedPolicy()):
        hits, _ = run_demand(pol, seq, 4, E=12)
        assert hits <= bel


def test_static_keeps_its_hot_set():
    load = np.array([[10.0, 9.0, 1.0, 1.0, 1.0]])  # capacity 3, L=1: hot set {0, 1}, one churn slot
    pol = StaticPolicy(load)
    hits, evicted = run_demand(pol, [0, 1, 2, 3, 4, 0, 1, 2], 3)
    assert evicted == [2, 3, 4]  # the cold slot churns; 0 and 1 never leave
    assert sorted(pol.warm_set().tolist()) == [0, 1]
    assert hits == 2


def test_next_use_table():
    steps = np.array([[0, 1], [2, 0], [1, -1], [0, 2]])
    nxt = next_use_table(steps)
    never = nxt.max()
    assert nxt.tolist() == [[1, 2], [3, 3], [never, never], [never, never]]


def test_in_use_experts_are_never_victims():
    pol = LRUPolicy()
    cache = SlotCache(pol, 2, 4, 3)
    cache.begin_step([0, 1, 2])
    pol.on_access(0, np.array([0, 1, 2]), 0)
    for g in (0, 1, 2):
        cache.insert(g)
    with pytest.raises(CacheFull, match="in use"):
        cache.insert(4 + 3)
    assert cache.insert(4 + 3, prefetch=True) is None  # a prefetch never forces its way in
    cache.begin_step([0, 1])
    slot, ev = cache.insert(4 + 3)
    assert ev == 2 and cache.slot_of[7] == slot


def test_per_layer_pools_do_not_steal():
    pol = LRUPolicy()
    cache = SlotCache(pol, 2, 4, 4, per_layer=True)  # 2 slots per layer
    for clock, g in enumerate([0, 1, 4, 5, 2]):
        cache.begin_step([g])
        pol.on_access(g // 4, np.array([g % 4]), clock)
        _, ev = cache.insert(g)
    assert ev == 0  # layer 0's expert 2 evicted layer 0's LRU, not a layer-1 expert
    assert cache.resident(4) and cache.resident(5)


def test_predicted_prefers_recently_reused_experts():
    """Expert 0 is used every token, expert 1 once long ago: the predicted policy keeps 0."""
    pol = PredictedPolicy(prefetch_threshold=1.0, refresh_every=1)
    cache = SlotCache(pol, 1, 4, 2)
    seq = [1, 0, 2, 0, 3, 0, 2, 0, 3, 0]
    for clock, e in enumerate(seq):
        cache.begin_step([e])
        pol.on_access(0, np.array([e]), clock)
        cache.insert(e)
    assert cache.resident(0)
    assert pol.keep_score(np.array([0]))[0] > pol.keep_score(np.array([1]))[0]


def test_make_policy_errors_name_the_problem():
    with pytest.raises(ValueError, match="one of"):
        make_policy("mru")
    with pytest.raises(ValueError, match="replay only"):
        make_policy("belady")
    with pytest.raises(ValueError, match="profiled expert load"):
        make_policy("static")
    with pytest.raises(ValueError, match="capacity must lie in"):
        SlotCache(LRUPolicy(), 1, 4, 5)
