"""Baselines that ignore traffic when placing logical experts: contiguous (vLLM's default) and
round-robin. Spare slots (redundant experts) hold replicas of the busiest experts of `load`, never two copies
of one expert on a rank while it has at most num_ranks copies (`fill_spare_slots`)."""
from __future__ import annotations

import numpy as np

from placement.algorithms.common import check_sizes, fill_spare_slots
from placement.plan import plan_from_rank_lists


def _split(E: int, N: int) -> list[int]:
    return [E // N + (1 if n < E % N else 0) for n in range(N)]


def contiguous(load, num_ranks: int, slots_per_rank: int, coact=None, transitions=None, **_) -> "PlacementPlan":
    """Rank n holds the n-th contiguous block of logical ids (experts 0..E/N-1 on rank 0, ...)."""
    load = np.asarray(load, dtype=np.float64)
    L, E = check_sizes(load, num_ranks, slots_per_rank)
    bounds = np.concatenate([[0], np.cumsum(_split(E, num_ranks))])
    home = [list(range(bounds[n], bounds[n + 1])) for n in range(num_ranks)]
    ranks = [fill_spare_slots(home, load[l], slots_per_rank) for l in range(L)]
    return plan_from_rank_lists(ranks, E, dict(algorithm="contiguous"))


def round_robin(load, num_ranks: int, slots_per_rank: int, coact=None, transitions=None, **_) -> "PlacementPlan":
    """Expert e lives on rank e % N."""
    load = np.asarray(load, dtype=np.float64)
    L, E = check_sizes(load, num_ranks, slots_per_rank)
    home = [list(range(n, E, num_ranks)) for n in range(num_ranks)]
    ranks = [fill_spare_slots(home, load[l], slots_per_rank) for l in range(L)]
    return plan_from_rank_lists(ranks, E, dict(algorithm="round_robin"))
