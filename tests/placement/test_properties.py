"""Invariants of every placement algorithm and of one online step, over random small inputs (fixed seed):
zero loads, all load on one expert, one token, more replicas than ranks included."""
import numpy as np
import pytest

from placement.algorithms import ALGORITHMS
from placement.online import rebalance_layer


def _cases(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        N, E, L = int(rng.integers(1, 5)), int(rng.integers(1, 11)), int(rng.integers(1, 3))
        spr = -(-E // N) + int(rng.integers(0, 3))
        kind = int(rng.integers(0, 4))
        load = [rng.random((L, E)) * 100, np.zeros((L, E)), np.zeros((L, E)),
                rng.integers(0, 3, (L, E)).astype(float)][kind]
        if kind == 2:
            load[:, rng.integers(0, E)] = 50.0  # all load on one expert
        T, K = int(rng.integers(1, 12)), int(rng.integers(1, min(E, 3) + 1))
        tokens = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
        yield N, E, L, spr, load, tokens


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_places_every_expert_in_the_slots_it_was_given(name):
    for N, E, L, spr, load, tokens in _cases(100):
        plan = ALGORITHMS[name](load, N, spr, tokens=tokens, max_iters=10)
        plan.validate()  # every expert in >= 1 slot, inverse maps consistent
        assert (plan.num_layers, plan.num_experts, plan.num_ranks, plan.slots_per_rank) == (L, E, N, spr)
        assert plan.replica_count.sum(1).tolist() == [N * spr] * L
        if name == "affinity":  # its swap search promises: two copies of one expert never share a rank
            held = plan.expert_ranks().sum(-1)
            assert np.all(held == np.minimum(plan.replica_count, N)), (N, E, spr, plan.phy2log.tolist())


def test_online_step_keeps_the_plan_valid_and_within_budget():
    for N, E, L, spr, load, tokens in _cases(100, seed=1):
        phy = ALGORITHMS["contiguous"](load, N, spr).phy2log[0]
        for budget in (0, 1, 4):
            new, moved = rebalance_layer(phy, tokens[:, 0], E, N, spr, budget=budget)
            assert moved <= budget and moved == int((new != phy).sum())
            assert np.all(np.bincount(new, minlength=E) >= 1), (phy.tolist(), new.tolist())
