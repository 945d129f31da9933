"""THE replica-selection rule: which copy of a replicated expert a token's choice is sent to.

The scorer uses this function and the runtime must use the same one, or the scores mean nothing.

Rule, applied to one MoE layer over a batch of tokens whose routing is known together:

1. A choice of an expert with one copy goes to that copy. These fix each rank's "load so far"
   (per batch) and the ranks each token already touches. Replicated experts not yet settled count in
   the load so far as an even split of their choices over the ranks holding their copies (so the order
   in which they are settled does not skew the balance).
2. Replicated experts are then settled one at a time, in ascending logical id. For expert e with n_b
   choices in batch b:
   a. quotas, least-loaded-so-far: the n_b choices are split over e's copies as if handed out one at a
      time, each to the copy whose rank has the least load so far (ties -> lowest replica index). This
      greedy is computed in closed form (water-filling on integer loads), so nothing loops over tokens.
      A rank holding two copies is one bin (its load rises with either), so its share goes to its
      lowest-index copy and the other copy serves nothing: a doubled copy is a wasted slot, never a
      second share of the expert's traffic for one rank.
   b. same-rank-first, within the quotas: a token that already touches a rank holding a copy of e
      prefers that copy (no extra dispatch; among several, the one whose rank had the least load before
      e was settled, ties -> lowest replica index) and gets it while the copy's quota lasts, in row order.
   c. the other tokens fill the copies' remaining quotas in replica order, in row order.
   So balance is exactly that of least-loaded-so-far, and co-location saves dispatches wherever the
   quotas allow. Loads and touched ranks are updated before the next replicated expert.

It is deterministic (no randomness, no dependence on anything but the batch and the plan) and loops
only over replicated experts of the layer, never over tokens.
"""
from __future__ import annotations

import numpy as np


def _water_fill(loads: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Greedy one-at-a-time fill, in closed form.

    loads: int64 [B, R] current loads of R bins; count: int64 [B] items to add.
    Returns int64 [B, R]: items per bin when each item goes to the least-loaded bin (ties -> lowest index).
    """
    B, R = loads.shape
    order = np.lexsort((np.broadcast_to(np.arange(R), (B, R)), loads), axis=-1)  # by load, then index
    srt = np.take_along_axis(loads, order, axis=1)  # [B, R] ascending
    csum = np.cumsum(srt, axis=1)
    j = np.arange(1, R + 1)
    need = j * srt - csum  # items to lift the first j bins to the j-th load
    J = (need <= count[:, None]).sum(axis=1)  # >= 1 since need[:, 0] == 0
    S = np.take_along_axis(csum, (J - 1)[:, None], axis=1)[:, 0]
    base, rem = np.divmod(count + S, J)
    in_fill = j[None, :] <= J[:, None]  # sorted positions that reach the level
    add_sorted = np.where(in_fill, base[:, None] - srt, 0)
    add = np.zeros_like(loads)
    np.put_along_axis(add, order, add_sorted, axis=1)
    # the `rem` extra items go, one each, to the lowest-index bins among those at the level
    filled = np.zeros((B, R), dtype=bool)
    np.put_along_axis(filled, order, in_fill, axis=1)
    extra = filled & (np.cumsum(filled, axis=1) <= rem[:, None])
    return add + extra


def _first_on_rank(rank: np.ndarray) -> np.ndarray:
    """bool [R]: copy i is the lowest-index copy on its rank (rank int [R], the rank of each copy)."""
    first = np.zeros(len(rank), dtype=bool)
    first[np.unique(rank, return_index=True)[1]] = True
    return first


def _rank_within(key: np.ndarray) -> np.ndarray:
    """int64 [n]: how many earlier entries share each entry's key (position within its group)."""
    order = np.argsort(key, kind="stable")
    sk = key[order]
    first = np.r_[True, sk[1:] != sk[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(sk)), 0))
    out = np.empty(len(key), dtype=np.int64)
    out[order] = np.arange(len(sk)) - start
    return out


def choose_replica(experts, log2phy, replica_count, slots_per_rank: int, num_ranks: int, batch=None) -> np.ndarray:
    """Physical slot for each routing choice of one MoE layer.

    experts: int [N, K] logical ids chosen by N tokens; log2phy: int [E, Rmax]; replica_count: int [E];
    batch: int [N] batch id of each token (0..nb-1, tokens of a batch share "load so far"), None = one batch.
    Returns int64 [N, K] physical slots (rank = slot // slots_per_rank).
    """
    experts = np.asarray(experts, dtype=np.int64)
    N, K = experts.shape
    batch = np.zeros(N, dtype=np.int64) if batch is None else np.asarray(batch, dtype=np.int64)
    nb = int(batch.max()) + 1 if N else 1
    slots = log2phy[experts, 0].copy()  # [N, K]
    multi = replica_count[experts] > 1  # [N, K]
    single_rank = slots // slots_per_rank
    load = np.zeros((nb, num_ranks), dtype=np.int64)
    bsel = np.broadcast_to(batch[:, None], (N, K))
    np.add.at(load, (bsel[~multi], single_rank[~multi]), 1)
    touched = np.zeros((N, num_ranks), dtype=bool)
    rows = np.broadcast_to(np.arange(N)[:, None], (N, K))
    touched[rows[~multi], single_rank[~multi]] = True
    if not multi.any():
        return slots
    replicated = np.unique(experts[multi])
    even = {}  # provisional even split of each replicated expert's choices, until it is settled
    for e in replicated:
        cnt = int(replica_count[e])
        n_b = np.bincount(batch[np.nonzero(experts == e)[0]], minlength=nb)
        first = _first_on_rank(log2phy[e, :cnt] // slots_per_rank)
        d = int(first.sum())
        even[e] = np.zeros((nb, cnt), dtype=np.int64)
        even[e][:, first] = n_b[:, None] // d + (np.arange(d)[None, :] < (n_b % d)[:, None])
        np.add.at(load, (slice(None), log2phy[e, :cnt] // slots_per_rank), even[e])
    for e in replicated:
        cnt = int(replica_count[e])
        cand = log2phy[e, :cnt]  # [R] slots
        cand_rank = cand // slots_per_rank
        np.subtract.at(load, (slice(None), cand_rank), even[e])
        tok, kk = np.nonzero(experts == e)  # each token picks e at most once, rows ascending
        tb = batch[tok]
        n_b = np.bincount(tb, minlength=nb)
        # [nb, R] copies' shares, least-loaded-so-far over the copies' *ranks*: a rank holding two copies
        # is one bin (its load rises with either copy), its share going to its lowest-index copy
        first = _first_on_rank(cand_rank)
        quota = np.zeros((nb, cnt), dtype=np.int64)
        quota[:, first] = _water_fill(load[:, cand_rank[first]], n_b)
        hit = touched[tok][:, cand_rank]  # [n, R] copies on ranks the token already touches
        lo = np.where(hit, load[tb][:, cand_rank], np.iinfo(np.int64).max)
        pref = np.where(hit.any(axis=1), np.argmin(lo, axis=1), cnt)  # cnt = no preference
        # (a) same-rank-first, within the copy's quota, in row order
        key = tb * (cnt + 1) + pref
        pos = _rank_within(key)
        take = (pref < cnt) & (pos < quota[tb, np.minimum(pref, cnt - 1)])
        choice = np.where(take, pref, -1)
        left = quota - np.bincount(tb[take] * cnt + pref[take], minlength=nb * cnt).reshape(nb, cnt)
        # (b) the rest fill the copies' remaining quota in copy order, in row order
        rest = np.flatnonzero(~take)
        pos_rest = _rank_within(tb[rest])
        choice[rest] = (pos_rest[:, None] >= np.cumsum(left, axis=1)[tb[rest]]).sum(axis=1)
        np.add.at(load, (tb, cand_rank[choice]), 1)
        slots[tok, kk] = cand[choice]
        touched[tok, cand_rank[choice]] = True
    return slots
