"""Balance-capped swap search over physical experts ("items"), shared by `affinity` and `online`.

An item is one physical expert: a logical expert id, a load, the rank it sits on and - when tokens are
known - the tokens whose choice it serves (column of X). Swapping two items exchanges their ranks; the
number of items per rank never changes, and two copies of one expert never share a rank.

Token cost of a placement (exact on the given tokens):
    sum over tokens t and ranks n that t touches of weight[t, n]
with weight = 1 (fan-out) plus a surcharge on ranks t did not touch at the previous layer (cross-layer
rank changes). The change of this cost for every candidate swap comes from a few matrix products.
"""
from __future__ import annotations

import numpy as np


def swap_cost_tokens(X: np.ndarray, item_rank: np.ndarray, num_ranks: int, weight: np.ndarray) -> np.ndarray:
    """D [I, I]: change of the token cost if items a and b exchange ranks.

    X float32 [T, I]: token t's choice is served by item i; item_rank int [I]; weight float32 [T, N]."""
    I = len(item_rank)
    onehot = np.zeros((I, num_ranks), dtype=np.float32)
    onehot[np.arange(I), item_rank] = 1.0
    cnt = X @ onehot  # [T, N] choices of token t served on rank n
    Z = (cnt == 0) * weight  # cost of opening rank n for token t
    O = (cnt == 1) * weight  # saving of closing rank n for token t
    G = X.T @ Z  # [I, N]
    loss = (X * O[:, item_rank]).sum(0)  # [I] item a is alone on its rank for those tokens
    Y = X * O[:, item_rank]
    corr = Y.T @ X + X.T @ Y  # tokens served by both a and b: the two move terms over-count
    move = G[:, item_rank] - loss[:, None]  # [a, b]: a moves to b's rank
    return move + move.T + corr


def swap_cost_pairs(C: np.ndarray, item_rank: np.ndarray, num_ranks: int) -> np.ndarray:
    """D [I, I] from item co-activation C [I, I]: minus the co-activation kept inside ranks after a swap."""
    I = len(item_rank)
    onehot = np.zeros((I, num_ranks))
    onehot[np.arange(I), item_rank] = 1.0
    A = C @ onehot  # [I, N]
    own = A[np.arange(I), item_rank]
    gain = A[:, item_rank] - own[:, None] - C  # [a, b]: a joins b's rank, leaving b behind
    return -(gain + gain.T)


def swap_search(item_rank, item_expert, item_load, num_ranks, cost_fn, cap, max_rounds=400, max_swaps=None,
                balance_weight=0.0, min_gain=1e-9, window_load=None, excess_tol=0.0):
    """Improve `item_rank` (int [I], modified copy returned) by swaps with negative cost that keep every
    rank's load <= cap. Each round applies the best swaps whose ranks are all distinct (at most N/2).
    `cost_fn(item_rank) -> D [I, I]`. `max_swaps` bounds the total (online budget). `balance_weight`
    adds that multiple of the change in the two ranks' load excess over the mean (lets a search that
    starts over the cap climb down towards it). `window_load` [W, I] (item loads in W windows of the
    tokens) adds the same weight x the change in per-window excess, summed over windows: balance that
    holds batch by batch, not only on average. Excess counts above (1 + excess_tol) x the mean (0: above
    the mean; > 0 leaves near-balanced ranks to the cost alone). A swap must cut the cost by more than
    `min_gain`.
    Returns (item_rank, swaps made)."""
    item_rank = np.array(item_rank, dtype=np.int64)
    E = int(item_expert.max()) + 1
    rank_load = np.bincount(item_rank, weights=item_load, minlength=num_ranks)
    mean = rank_load.mean()
    wl = None if window_load is None else np.asarray(window_load, dtype=np.float64)
    if wl is not None:
        win_load = np.stack([np.bincount(item_rank, weights=w, minlength=num_ranks) for w in wl])  # [W, N]
        win_mean = win_load.mean(1, keepdims=True)[:, :, None]
    swaps = 0
    for _ in range(max_rounds):
        D = cost_fn(item_rank)
        ra = item_rank
        new_a = rank_load[ra][:, None] - item_load[:, None] + item_load[None, :]  # a's rank after the swap
        new_b = new_a.T
        holds = np.zeros((E, num_ranks), dtype=bool)
        holds[item_expert, item_rank] = True
        twin_ok = ~holds[item_expert][:, ra] & ~holds[item_expert][:, ra].T  # a's expert not on b's rank...
        ok = (ra[:, None] != ra[None, :]) & twin_ok
        old_max = np.maximum(rank_load[ra][:, None], rank_load[ra][None, :])
        new_max = np.maximum(new_a, new_b)
        ok &= (new_max <= cap + 1e-12) | (new_max < old_max - 1e-12)  # under the cap, or closer to it
        if balance_weight:
            excess = lambda x: np.maximum(x - (1.0 + excess_tol) * mean, 0.0)
            D = D + balance_weight * (excess(new_a) + excess(new_b) - excess(rank_load[ra][:, None])
                                      - excess(rank_load[ra][None, :]))
            if wl is not None:
                cur = win_load[:, ra]  # [W, I]
                wa = cur[:, :, None] - wl[:, :, None] + wl[:, None, :]  # [W, a, b]: a's rank after the swap
                ex = lambda x: np.maximum(x - (1.0 + excess_tol) * win_mean, 0.0)
                D = D + balance_weight * (ex(wa) + ex(wa.transpose(0, 2, 1)) - ex(cur[:, :, None])
                                          - ex(cur[:, None, :])).sum(0)
        D = np.where(ok, D, np.inf)
        order = np.argsort(D, axis=None, kind="stable")
        used, moved = np.zeros(num_ranks, dtype=bool), 0
        I = len(item_rank)
        for flat in order[: 4 * I]:
            if not D.flat[flat] < -min_gain or (max_swaps is not None and swaps >= max_swaps):
                break
            a, b = divmod(int(flat), I)
            r, s = item_rank[a], item_rank[b]
            if used[r] or used[s]:
                continue
            used[r] = used[s] = True
            rank_load[r] += item_load[b] - item_load[a]
            rank_load[s] += item_load[a] - item_load[b]
            if wl is not None:
                win_load[:, r] += wl[:, b] - wl[:, a]
                win_load[:, s] += wl[:, a] - wl[:, b]
            item_rank[a], item_rank[b] = s, r
            moved += 1
            swaps += 1
        if not moved:
            break
    return item_rank, swaps


def items_to_phy2log(item_rank, item_expert, num_ranks: int) -> np.ndarray:
    """int64 [P]: slots rank-major; inside a rank, items by ascending expert id."""
    order = np.lexsort((item_expert, item_rank))
    if np.any(np.bincount(item_rank, minlength=num_ranks) != len(item_rank) // num_ranks):
        raise AssertionError("swap search changed the number of items per rank")
    return np.asarray(item_expert)[order].astype(np.int64)
