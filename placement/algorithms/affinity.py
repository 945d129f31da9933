"""Ours: affinity-aware balanced placement.

Per layer, in order (layer l sees layer l-1's finished placement):

1. Robust load: the fitted load, normalized, blended with a uniform prior (`uniform_blend`) so a plan
   fitted on one domain does not trust that domain's cold experts to stay cold.
2. Replication: spare slots go to the experts with the largest load per copy (EPLB's rule); copies of
   an expert land on different ranks. The replica rule (placement.replica) makes replicas a dynamic
   balancer at run time, so they go where balance needs them, not where affinity would want them.
3. Balanced start: physical experts in descending load, each to the lightest rank with a free slot.
4. Local search: swap two single-copy experts on different ranks when it lowers the cost and keeps
   every rank's load under `(1 + balance_tol) x mean`. The cost is exact on the fitted tokens:
       sum over tokens t, ranks n touched by t at this layer of (1 + cross_layer_weight * [n not touched
       by t at layer l-1]),
   i.e. fan-out plus weighted cross-layer rank changes. The gain of every candidate swap is computed at
   once with a few [T, E] x [T, N] products (no per-token loops). Without tokens, the within-layer
   co-activation matrix gives the classic pairwise proxy (co-activation kept inside ranks).
"""
from __future__ import annotations

import time

import numpy as np

from placement.algorithms.common import check_sizes, replicate_greedy, single_thread_blas
from placement.plan import PlacementPlan
from placement.replica import choose_replica


def balanced_start(w: np.ndarray, count: np.ndarray, num_ranks: int, slots_per_rank: int) -> list[list[int]]:
    """Physical experts (expert e repeated count[e] times, share w[e]/count[e]) packed greedily."""
    share = w / count
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    rank_load = np.zeros(num_ranks)
    for e in np.argsort(-share, kind="stable"):
        for _ in range(count[e]):
            open_ = [n for n in range(num_ranks) if len(ranks[n]) < slots_per_rank and e not in ranks[n]]
            open_ = open_ or [n for n in range(num_ranks) if len(ranks[n]) < slots_per_rank]
            n = min(open_, key=lambda n: (rank_load[n], n))
            ranks[n].append(int(e))
            rank_load[n] += share[e]
    return ranks


def _swap_cost_tokens(X, rank_of, single, num_ranks, weight):
    """D [E, E]: change of the token cost if single-copy experts a and b swap ranks.
    X float32 [T, E] one-hot choices; rank_of int [E]; weight float32 [T, N] per-(token, rank) cost."""
    onehot = np.zeros((len(rank_of), num_ranks), dtype=np.float32)
    onehot[np.flatnonzero(single), rank_of[single]] = 1.0
    cnt = X @ onehot  # [T, N] single-copy choices of token t on rank n
    Z = (cnt == 0) * weight  # cost of opening rank n for token t
    O = (cnt == 1) * weight  # saving of closing rank n for token t
    G = X.T @ Z  # [E, N]
    XO = X.T @ O  # [E, N]
    loss = XO[np.arange(len(rank_of)), rank_of]  # [E]
    Y = X * O[:, rank_of]  # [T, E] choice a is alone on its rank for token t
    corr = Y.T @ X + X.T @ Y  # tokens holding both a and b: the move terms over-count
    move = G[:, rank_of] - loss[:, None]  # [a, b]: a moves to b's rank
    return move + move.T + corr


def _swap_cost_pairs(C, rank_of, num_ranks):
    """D [E, E] from co-activation C [E, E]: minus the co-activation kept inside ranks after the swap."""
    onehot = np.zeros((len(rank_of), num_ranks))
    onehot[np.arange(len(rank_of)), rank_of] = 1.0
    A = C @ onehot  # [E, N]
    own = A[np.arange(len(rank_of)), rank_of]
    gain = A[:, rank_of] - own[:, None] - C  # [a, b]: a joins b's rank, leaving b behind
    return -(gain + gain.T)


def local_search(ranks, w, count, tokens_l=None, prev_touch=None, C=None, balance_tol=0.02,
                 cross_layer_weight=0.3, max_iters=400):
    """Improve `ranks` (list of lists) in place by balance-capped swaps of single-copy experts."""
    N, E = len(ranks), len(w)
    share = w / count
    slot_rank = np.array([n for n in range(N) for _ in ranks[n]])
    phys = np.array([e for r in ranks for e in r])
    single = count == 1
    rank_of = np.zeros(E, dtype=np.int64)
    rank_of[phys[single[phys]]] = slot_rank[single[phys]]
    rank_load = np.bincount(slot_rank, weights=share[phys], minlength=N)
    cap = max((1.0 + balance_tol) * rank_load.mean(), rank_load.max())
    if tokens_l is not None:
        X = np.zeros((len(tokens_l), E), dtype=np.float32)
        np.put_along_axis(X, tokens_l, 1.0, axis=1)
        weight = np.ones((len(tokens_l), N), dtype=np.float32)
        if prev_touch is not None:
            weight += cross_layer_weight * (~prev_touch)
    idx = np.flatnonzero(single)
    for _ in range(max_iters):
        if tokens_l is not None:
            D = _swap_cost_tokens(X, rank_of, single, N, weight)
        elif C is not None:
            D = _swap_cost_pairs(C, rank_of, N)
        else:
            return ranks
        D = D[np.ix_(idx, idx)]
        ra, wa = rank_of[idx], w[idx]
        new_a = rank_load[ra][:, None] - wa[:, None] + wa[None, :]  # a's rank after the swap
        ok = (ra[:, None] != ra[None, :]) & (new_a <= cap + 1e-12) & (new_a.T <= cap + 1e-12)
        D = np.where(ok, D, np.inf)
        order = np.argsort(D, axis=None, kind="stable")
        used, moved = np.zeros(N, dtype=bool), 0
        for flat in order[: 4 * len(idx)]:  # best swaps first, each rank in one swap per round
            if not D.flat[flat] < -1e-9:
                break
            a, b = idx[flat // len(idx)], idx[flat % len(idx)]
            r, s = rank_of[a], rank_of[b]
            if used[r] or used[s]:
                continue
            used[r] = used[s] = True
            moved += 1
            rank_load[r] += w[b] - w[a]
            rank_load[s] += w[a] - w[b]
            rank_of[a], rank_of[b] = s, r
            ranks[r][ranks[r].index(a)] = int(b)
            ranks[s][ranks[s].index(b)] = int(a)
        if not moved:
            break
    return ranks


def affinity(load, num_ranks: int, slots_per_rank: int, coact=None, transitions=None, tokens=None,
             balance_tol: float = 0.02, uniform_blend: float = 0.05, cross_layer_weight: float = 0.3,
             max_iters: int = 400, max_tokens: int = 8192, **_) -> PlacementPlan:
    """load [L, E]; coact [L, E, E] (optional); tokens int [T, L, K], the fitted trace (optional, exact
    objective; subsampled to `max_tokens` rows, evenly spaced). `transitions` is accepted for the common
    interface; the cross-layer term is taken exactly from `tokens` instead."""
    with single_thread_blas():  # small matrices: threads only contend (10-50x slower on a busy host)
        return _affinity(load, num_ranks, slots_per_rank, coact, tokens, balance_tol, uniform_blend,
                         cross_layer_weight, max_iters, max_tokens)


def _affinity(load, num_ranks, slots_per_rank, coact, tokens, balance_tol, uniform_blend, cross_layer_weight,
              max_iters, max_tokens) -> PlacementPlan:
    load = np.asarray(load, dtype=np.float64)
    L, E = check_sizes(load, num_ranks, slots_per_rank)
    t0 = time.perf_counter()
    if tokens is not None:
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) > max_tokens:
            tokens = tokens[np.linspace(0, len(tokens) - 1, max_tokens).astype(np.int64)]
    P = num_ranks * slots_per_rank
    phy2log = np.zeros((L, P), dtype=np.int64)
    prev_touch = None
    for l in range(L):
        total = load[l].sum()
        w = load[l] / total if total > 0 else np.full(E, 1.0 / E)
        w = (1.0 - uniform_blend) * w + uniform_blend / E
        count = replicate_greedy(w, P)
        ranks = balanced_start(w, count, num_ranks, slots_per_rank)
        ranks = local_search(ranks, w, count,
                             tokens_l=None if tokens is None else tokens[:, l], prev_touch=prev_touch,
                             C=None if coact is None else np.asarray(coact[l], dtype=np.float64),
                             balance_tol=balance_tol, cross_layer_weight=cross_layer_weight, max_iters=max_iters)
        phy2log[l] = [e for r in ranks for e in r]
        if tokens is not None:
            one = PlacementPlan.from_phy2log(phy2log[l:l + 1], E, num_ranks)
            slots = choose_replica(tokens[:, l], one.log2phy[0], one.replica_count[0], slots_per_rank, num_ranks)
            prev_touch = np.zeros((len(tokens), num_ranks), dtype=bool)
            np.put_along_axis(prev_touch, slots // slots_per_rank, True, axis=1)
    meta = dict(algorithm="affinity", solver_seconds=time.perf_counter() - t0, balance_tol=balance_tol,
                uniform_blend=uniform_blend, cross_layer_weight=cross_layer_weight)
    return PlacementPlan.from_phy2log(phy2log, E, num_ranks, meta)
