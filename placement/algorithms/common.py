"""Pieces the placement algorithms share: argument checks, replica counts, filling spare slots."""
from __future__ import annotations

import contextlib

import numpy as np


def single_thread_blas():
    """Context limiting BLAS to one thread (threadpoolctl, a scikit-learn dependency), else a no-op."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def check_sizes(load: np.ndarray, num_ranks: int, slots_per_rank: int) -> tuple[int, int]:
    """Validate the common arguments; return (L, E)."""
    load = np.asarray(load)
    if load.ndim != 2:
        raise ValueError(f"placement: load must be [L, E], got shape {load.shape}")
    if num_ranks < 1:
        raise ValueError(f"placement: num_ranks must be >= 1, got {num_ranks}")
    L, E = load.shape
    if slots_per_rank * num_ranks < E:
        raise ValueError(
            f"placement: num_ranks={num_ranks} x slots_per_rank={slots_per_rank} = "
            f"{num_ranks * slots_per_rank} slots cannot hold E={E} experts"
        )
    if np.any(load < 0) or not np.all(np.isfinite(load)):
        raise ValueError("placement: load must be finite and >= 0")
    return L, E


def replicate_greedy(load: np.ndarray, num_slots: int) -> np.ndarray:
    """int64 [E] copies per expert: start at 1, then repeatedly give one more copy to the expert with the
    largest load per copy (ties -> lowest id) until `num_slots` copies exist. Minimizes the largest
    per-copy load (EPLB's replication step)."""
    E = len(load)
    count = np.ones(E, dtype=np.int64)
    for _ in range(num_slots - E):
        count[int(np.argmax(load / count))] += 1
    return count


def fill_spare_slots(home: list[list[int]], load: np.ndarray, slots_per_rank: int) -> list[list[int]]:
    """Top `home[n]` (logical experts of rank n, each expert exactly once) up to `slots_per_rank` with
    replicas of the busiest experts (`replicate_greedy`). Each replica goes to the rank with free slots
    and the least load so far that does not already hold that expert (ties -> lowest rank)."""
    E, N = len(load), len(home)
    count = replicate_greedy(np.asarray(load, dtype=np.float64), N * slots_per_rank)
    share = load / count
    ranks = [list(r) for r in home]
    rank_load = np.array([sum(share[e] for e in r) for r in ranks], dtype=np.float64)
    extra = [e for e in np.argsort(-share, kind="stable") for _ in range(count[e] - 1)]
    for e in extra:
        free = [n for n in range(N) if len(ranks[n]) < slots_per_rank]
        fresh = [n for n in free if e not in ranks[n]] or free
        n = min(fresh, key=lambda n: (rank_load[n], n))
        ranks[n].append(int(e))
        rank_load[n] += share[e]
    return ranks
