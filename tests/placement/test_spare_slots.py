"""Spare slots of the traffic-agnostic layouts (contiguous, round-robin): replicas on ranks lacking the expert."""
import numpy as np
import pytest

from placement.algorithms.simple import contiguous, round_robin


def doubled(plan) -> list[tuple[int, int, int]]:
    """(layer, rank, expert) where a rank holds two copies of an expert that has at most num_ranks copies."""
    out = []
    for l in range(plan.num_layers):
        per_rank = plan.phy2log[l].reshape(plan.num_ranks, plan.slots_per_rank)
        for n, row in enumerate(per_rank):
            for e in set(row.tolist()):
                if (row == e).sum() > 1 and plan.replica_count[l, e] <= plan.num_ranks:
                    out.append((l, n, e))
    return out


@pytest.mark.parametrize("E, N, redundant", [(8, 2, 2), (16, 4, 4), (64, 8, 8), (8, 4, 4)])
def test_the_runtimes_default_plan_puts_no_two_copies_on_one_rank(E, N, redundant):
    """The runtime's plan without a placement file (runner.default_plan: contiguous on a uniform load) put
    the last replica on the only rank left with a free slot even when that rank held the expert already:
    with ep=8 and 8 redundant experts on 64, rank 0 held expert 7 twice ([0..7, 7]), a slot that serves
    nothing (the replica rule gives a rank one share of an expert however many copies it holds)."""
    from moe_serve.distributed.runner import default_plan

    plan = default_plan(3, E, N, redundant)
    assert doubled(plan) == [], plan.phy2log[0].reshape(N, -1).tolist()
    assert (plan.replica_count >= 1).all() and plan.replica_count.sum(1).tolist() == [E + redundant] * 3


@pytest.mark.parametrize("algorithm", [contiguous, round_robin])
def test_spare_slots_hold_no_doubled_copy_and_home_blocks_stay(algorithm):
    """Random loads and shapes (E divisible by N, at most N copies of any expert): no rank holds an expert
    twice, every expert but those a doubled copy was swapped with stays on its home rank (contiguous block /
    e % N), and the copies per expert are replicate_greedy's."""
    from placement.algorithms.common import replicate_greedy

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        N = int(rng.integers(2, 6))
        E = N * int(rng.integers(1, 5))
        spr = E // N + int(rng.integers(1, 4))
        load = rng.gamma(0.7, size=(2, E)) * (rng.random((2, E)) < 0.8)  # some experts never used
        if any(replicate_greedy(load[l], N * spr).max() > N for l in range(2)):
            continue  # an expert with more copies than ranks must double up somewhere
        plan = algorithm(load, N, spr)
        assert doubled(plan) == [], (E, N, spr, plan.phy2log.tolist())
        home = np.arange(E) // (E // N) if algorithm is contiguous else np.arange(E) % N
        for l in range(2):
            away = [e for e in range(E) if not plan.expert_ranks()[l, e, home[e]]]
            assert len(away) <= N * spr - E, (away, plan.phy2log[l].reshape(N, spr).tolist())  # a swap each at most
            assert plan.replica_count[l].tolist() == replicate_greedy(load[l], N * spr).tolist()
        checked += 1
    assert checked > 50
