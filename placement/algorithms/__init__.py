"""Placement algorithms, one signature, a registry by name.

    algorithm(load [L, E], num_ranks, slots_per_rank, coact=None, transitions=None, **options) -> PlacementPlan

`load` may be any non-negative per-expert weight (token counts, window counts, predicted loads).
Algorithms ignore options they do not use, so callers can pass the same statistics to all of them.
"""
from __future__ import annotations

from placement.algorithms.affinity import affinity
from placement.algorithms.eplb import eplb
from placement.algorithms.simple import contiguous, round_robin

ALGORITHMS = {
    "contiguous": contiguous,
    "round_robin": round_robin,
    "eplb": eplb,
    "affinity": affinity,
}


def get_algorithm(name: str):
    if name not in ALGORITHMS:
        raise ValueError(f"placement: algorithm {name!r} is not one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
