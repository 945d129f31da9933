"""Ours: affinity-aware balanced placement.

Per layer, in order (layer l sees layer l-1's finished placement):

1. Load: the fitted load, normalized, optionally blended with a uniform prior (`uniform_blend`) so a
   plan fitted on one domain trusts that domain's cold experts less.
2. Replication: spare slots go to the experts with the largest load per copy (EPLB's rule). The replica
   rule (placement.replica: least-loaded quotas, same-rank-first inside them) then balances replicated
   traffic per batch at run time.
3. Balanced start: physical experts in descending load, each to the lightest rank with a free slot that
   lacks it; the contiguous layout instead where that balances the load better under the replica rule
   (`no_worse_than_contiguous`: the greedy assumes even shares per copy, the rule does not).
4. Swap search over physical experts ("items", replicas included; placement.algorithms.swap_search).
   With the fitted tokens, each choice is first mapped to a copy by the run-time replica rule, so an
   item carries exactly the tokens it would serve. The cost is exact on those tokens:
       sum over tokens t, ranks n touched by t at this layer of (1 + cross_layer_weight * [n not touched
       by t at layer l-1]),
   i.e. fan-out plus weighted cross-layer rank changes; every candidate swap's change comes from a few
   [T, I] x [T, N] products (no per-token loops).
   a. explore: swaps that lower the cost under a loose cap, every rank <= (1 + explore_tol) x mean, so
      clusters of experts that fire together can form;
   b. tighten: cost + balance_weight x (load excess over the mean) under the tight cap
      (1 + balance_tol) x mean, accepting swaps that bring an over-cap pair closer to it, so balance is
      restored with the least fan-out given back.
   `rounds` re-maps replicated experts' tokens to their new copies and searches again.
   `window_tokens` > 0 also penalizes excess in windows of that many fitted tokens: random ones
   (batch-level balance) or, with `contiguous_windows`, consecutive ones (scenarios: the trace's phases,
   a within-domain stand-in for a shift). On the DeepSeek traces neither lowered per-batch or
   cross-domain imbalance (summary -> intent static 1.467 vs 1.446 with 512-token in-order windows), so
   both are off by default.
   Without tokens, the within-layer co-activation matrix gives the pairwise proxy (co-activation kept
   inside ranks); without either, the balanced start is the plan.
5. Guard: a layer whose result balances the load more than `balance_tol` worse than the contiguous
   layout is replaced by that layout (fan-out is bought with at most balance_tol of balance).
"""
from __future__ import annotations

import time

import numpy as np

from placement.algorithms.common import (check_sizes, no_worse_than_contiguous, replicate_greedy,
                                         single_thread_blas)
from placement.algorithms.swap_search import items_to_phy2log, swap_cost_pairs, swap_cost_tokens, swap_search
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


def place_layer(phy, w, count, num_ranks, slots_per_rank, tokens_l=None, prev_touch=None, C=None,
                balance_tol=0.02, cross_layer_weight=0.3, max_iters=400, rounds=3, max_swaps=None,
                balance_weight=4.0, explore_tol=0.0, window_tokens=0, contiguous_windows=False):
    """One layer's swap search from slots `phy` [P] (expert per slot). Returns (phy [P], touch [T, N]
    the ranks each token uses under the result, or None without tokens).

    With tokens, each round maps every choice to a copy with `choose_replica` (the run-time rule),
    makes each copy an item carrying its tokens and load, and swaps items; the next round re-maps the
    replicated experts' tokens to their new copies. Without tokens, items carry load w/count and the
    pairwise co-activation C (split evenly over copies)."""
    E, P = len(w), len(phy)
    item_rank = np.arange(P) // slots_per_rank
    item_expert = np.asarray(phy, dtype=np.int64)
    touch = None
    for _ in range(rounds if tokens_l is not None else 1):
        if tokens_l is not None:
            plan = PlacementPlan.from_phy2log(items_to_phy2log(item_rank, item_expert, num_ranks)[None], E, num_ranks)
            item_expert = plan.phy2log[0]
            item_rank = np.arange(P) // slots_per_rank
            slots = choose_replica(tokens_l, plan.log2phy[0], plan.replica_count[0], slots_per_rank, num_ranks)
            X = np.zeros((len(tokens_l), P), dtype=np.float32)
            np.put_along_axis(X, slots, 1.0, axis=1)
            item_load = X.sum(0).astype(np.float64)
            weight = np.ones((len(tokens_l), num_ranks), dtype=np.float32)
            if prev_touch is not None:
                weight += cross_layer_weight * (~prev_touch)
            cost = lambda ir, X=X, weight=weight: swap_cost_tokens(X, ir, num_ranks, weight)
        elif C is not None:
            Ci = C[np.ix_(item_expert, item_expert)] / np.outer(count[item_expert], count[item_expert])
            Ci[item_expert[:, None] == item_expert[None, :]] = 0.0
            item_load = (w / count)[item_expert] * max(C.sum(), 1.0) / 2  # in the units of C
            cost = lambda ir, Ci=Ci: swap_cost_pairs(Ci, ir, num_ranks)
        else:
            break
        rank_load = np.bincount(item_rank, weights=item_load, minlength=num_ranks)
        mean = rank_load.mean()
        if explore_tol > balance_tol:  # explore: clusters form under a loose cap ...
            item_rank, _ = swap_search(item_rank, item_expert, item_load, num_ranks, cost,
                                       (1.0 + explore_tol) * mean, max_iters, max_swaps)
        # ... then tighten: balance first (excess over the mean costs `balance_weight` per unit), fan-out next
        win = None
        if tokens_l is not None and window_tokens:  # per-window loads: random batches or in-order windows
            wid = np.arange(len(X)) if contiguous_windows else np.random.default_rng(12345).permutation(len(X))
            wid = wid // window_tokens
            win = np.stack([X[wid == i].sum(0) for i in range(max(int(wid.max()), 1))]).astype(np.float64)
        item_rank, _ = swap_search(item_rank, item_expert, item_load, num_ranks, cost, (1.0 + balance_tol) * mean,
                                   max_iters, max_swaps, balance_weight, window_load=win)
    phy = items_to_phy2log(item_rank, item_expert, num_ranks)
    return phy, touched(phy, tokens_l, E, num_ranks)


def touched(phy, tokens_l, num_experts: int, num_ranks: int):
    """bool [T, N]: the ranks each token of tokens_l int [T, K] uses under slots phy [P] and the replica
    rule (None without tokens)."""
    if tokens_l is None:
        return None
    plan = PlacementPlan.from_phy2log(np.asarray(phy)[None], num_experts, num_ranks)
    slots = choose_replica(tokens_l, plan.log2phy[0], plan.replica_count[0], plan.slots_per_rank, num_ranks)
    touch = np.zeros((len(tokens_l), num_ranks), dtype=bool)
    np.put_along_axis(touch, slots // plan.slots_per_rank, True, axis=1)
    return touch


def check_statistics(tokens, coact, num_layers: int, num_experts: int) -> None:
    """ValueError unless tokens int [T, L, K] and coact [L, E, E] are of the load's layers and experts
    (a trace of other layers was fitted silently, layer l's swaps judged on another layer's tokens)."""
    name = "placement algorithm affinity"
    if tokens is not None:
        shape = np.shape(tokens)
        if len(shape) != 3 or shape[1] != num_layers:
            raise ValueError(f"{name}: tokens must be [T, L={num_layers}, K] like the load, got shape {shape}")
        if np.size(tokens) and (np.max(tokens) >= num_experts or np.min(tokens) < 0):
            bad = np.max(tokens) if np.max(tokens) >= num_experts else np.min(tokens)
            raise ValueError(f"{name}: tokens hold expert id {bad}, outside [0, E={num_experts})")
    if coact is not None and np.shape(coact) != (num_layers, num_experts, num_experts):
        raise ValueError(f"{name}: coact must be [L={num_layers}, E={num_experts}, E={num_experts}] like the "
                         f"load, got shape {np.shape(coact)}")


def affinity(load, num_ranks: int, slots_per_rank: int, coact=None, transitions=None, tokens=None,
             uniform_blend: float = 0.0, max_tokens: int = 4096, balance_tol: float = 0.02,
             explore_tol: float = 0.25, balance_weight: float = 4.0, cross_layer_weight: float = 0.3,
             max_iters: int = 400, rounds: int = 2, window_tokens: int = 0, contiguous_windows: bool = False,
             **_) -> PlacementPlan:
    """load [L, E]; coact [L, E, E] (optional); tokens int [T, L, K], the fitted trace (optional, exact
    objective; subsampled to `max_tokens` rows, evenly spaced). `transitions` is accepted for the common
    interface; the cross-layer term is taken exactly from `tokens` instead."""
    load = np.asarray(load, dtype=np.float64)
    L, E = check_sizes(load, num_ranks, slots_per_rank)
    layer_kw = dict(balance_tol=balance_tol, explore_tol=explore_tol, balance_weight=balance_weight,
                    cross_layer_weight=cross_layer_weight, max_iters=max_iters, rounds=rounds,
                    window_tokens=window_tokens, contiguous_windows=contiguous_windows)
    t0, c0 = time.perf_counter(), time.process_time()
    check_statistics(tokens, coact, L, E)
    if tokens is not None:
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) > max_tokens:
            tokens = tokens[np.linspace(0, len(tokens) - 1, max_tokens).astype(np.int64)]
    P = num_ranks * slots_per_rank
    phy2log = np.zeros((L, P), dtype=np.int64)
    prev_touch = None
    with single_thread_blas():  # small matrices: threads only contend (10-50x slower on a busy host)
        for l in range(L):
            total = load[l].sum()
            w = load[l] / total if total > 0 else np.full(E, 1.0 / E)
            w = (1.0 - uniform_blend) * w + uniform_blend / E
            count = replicate_greedy(w, P)
            phy = np.array([e for r in balanced_start(w, count, num_ranks, slots_per_rank) for e in r])
            phy = no_worse_than_contiguous(phy, w, num_ranks, slots_per_rank)
            tok_l = None if tokens is None else tokens[:, l]
            C = None if coact is None else np.asarray(coact[l], dtype=np.float64)
            phy2log[l], touch = place_layer(phy, w, count, num_ranks, slots_per_rank, tok_l, prev_touch, C,
                                            **layer_kw)
            # fan-out is bought with at most balance_tol of balance against the default layout
            kept = no_worse_than_contiguous(phy2log[l], w, num_ranks, slots_per_rank, slack=balance_tol)
            if not np.array_equal(kept, phy2log[l]):
                phy2log[l], touch = kept, touched(kept, tok_l, E, num_ranks)
            prev_touch = touch
    meta = dict(algorithm="affinity", solver_seconds=time.perf_counter() - t0,
                solver_cpu_seconds=time.process_time() - c0, uniform_blend=uniform_blend,
                **layer_kw)
    return PlacementPlan.from_phy2log(phy2log, E, num_ranks, meta)
