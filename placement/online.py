"""Online re-placement: adapt a plan to the traffic of a sliding window, moving few experts per step.

A stream of batches is served under the plan in effect; after each `step_batches` batches, every layer
is re-placed from the last `window` tokens, rewriting at most `budget` slots per layer (a slot
rewritten = one expert's weights copied to a rank). Per layer and step:

1. replicas follow the traffic: for at most `replica_moves` slots of the budget (default 2), one copy of
   an expert with spare copies is re-pointed to the expert with the largest window load per copy, when
   that is clearly (`hysteresis`) more than the donor's load per copy after giving one up;
2. balance-capped swaps (`swap_search`) with the remaining budget, two slots per swap, minimizing
   fan-out on the window's tokens plus `balance_weight` x the load excess over the mean, so swaps that
   cut the busiest ranks come first; a swap must save more than `min_gain` x window tokens (no chasing
   noise).
Why these defaults: after a domain shift a plan fitted with co-location has whole ranks hot (experts
that fire together turned hot together); replicas cannot fix that, swaps can, so the budget is split
(replicas first, at least one swap kept), and balance is weighted 20x a token's dispatch (fan-out has
slack against the target, per-batch balance does not). On DeepSeek-V2-Lite summary -> intent (budget
4, B=256/512) this took affinity+online from 1.105/1.110 to about 1.098/1.098 mean imbalance at a
fan-out of 3.67/3.72 (EPLB static: 4.45); see benches/results/imbalance/report.md for the suite's numbers.

Slots that keep their expert keep their position (nothing moves inside a rank). The stream is scored
over every batch, including those served before the plan adapted.
"""
from __future__ import annotations

import numpy as np

from placement.algorithms.common import replicate_greedy, single_thread_blas
from placement.algorithms.swap_search import items_to_phy2log, swap_cost_tokens, swap_search
from placement.plan import PlacementPlan
from placement.replica import choose_replica
from placement.score import batch_ids, check_trace, score_ranks, trace_ids


def stable_layout(old: np.ndarray, new: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """int64 [P]: `new`'s per-rank contents, laid out so every expert that stays on a rank keeps its slot."""
    out = np.array(old, dtype=np.int64)
    for n in range(len(old) // slots_per_rank):
        sl = slice(n * slots_per_rank, (n + 1) * slots_per_rank)
        want = list(new[sl])
        keep = np.zeros(slots_per_rank, dtype=bool)
        for i, e in enumerate(old[sl]):
            if e in want:
                want.remove(e)
                keep[i] = True
        out[sl][~keep] = want
    return out


def rebalance_layer(phy, window_tokens, num_experts, num_ranks, slots_per_rank, budget=4,
                    balance_tol=0.02, balance_weight=20.0, hysteresis=1.25, max_rounds=8, min_gain=0.02,
                    sub_window=0, lightest_donor=False, replica_moves=2, excess_tol=0.0):
    """phy int [P] (expert per slot), window_tokens int [W, K] -> (new phy [P], slots rewritten).
    sub_window > 0: the swaps also pay `balance_weight` x each rank's excess in every consecutive chunk
    of that many window tokens (per-batch balance, not only the window's total). lightest_donor: a
    re-pointed replica takes the donor's copy on the least-loaded rank (else the first eligible one).
    replica_moves: at most this many of the budget's slots go to re-pointing replicas (None: all), the
    rest is kept for swaps (a rank made hot by co-located experts needs swaps, not replicas)."""
    E, P = num_experts, len(phy)
    old = np.asarray(phy, dtype=np.int64)
    phy = old.copy()
    wload = np.bincount(window_tokens.ravel(), minlength=E).astype(np.float64) + 1e-3
    count = np.bincount(phy, minlength=E)
    moved = 0
    want = replicate_greedy(wload, P)
    while moved < min(budget, budget if replica_moves is None else replica_moves):
        takers = np.flatnonzero(want > count)
        donors = np.flatnonzero(count > np.maximum(want, 1))
        if not len(takers) or not len(donors):
            break
        x = takers[np.argmax(wload[takers] / count[takers])]
        y = donors[np.argmin(wload[donors] / (count[donors] - 1))]
        if wload[x] / count[x] <= hysteresis * wload[y] / (count[y] - 1):
            break
        slot_rank = np.arange(P) // slots_per_rank
        x_ranks = set(slot_rank[phy == x].tolist())
        cands = [p for p in np.flatnonzero(phy == y) if slot_rank[p] not in x_ranks]
        if not cands:
            break
        # the new copy goes where it can take load: the donor copy on the least-loaded rank
        rank_load = np.bincount(slot_rank, weights=(wload / count)[phy], minlength=num_ranks)
        phy[min(cands, key=lambda p: (rank_load[slot_rank[p]], p)) if lightest_donor else cands[0]] = x
        count[x] += 1
        count[y] -= 1
        moved += 1
    swaps_left = (budget - moved) // 2
    if swaps_left > 0:
        plan = PlacementPlan.from_phy2log(phy[None], E, num_ranks)
        slots = choose_replica(window_tokens, plan.log2phy[0], plan.replica_count[0], slots_per_rank, num_ranks)
        X = np.zeros((len(window_tokens), P), dtype=np.float32)
        np.put_along_axis(X, slots, 1.0, axis=1)
        item_load = X.sum(0).astype(np.float64)
        item_rank = np.arange(P) // slots_per_rank
        weight = np.ones((len(window_tokens), num_ranks), dtype=np.float32)
        cap = (1.0 + balance_tol) * item_load.sum() / num_ranks
        win = None
        if sub_window and len(X) >= 2 * sub_window:  # [C, P] item loads per chunk of sub_window tokens
            n_chunks = len(X) // sub_window
            win = X[: n_chunks * sub_window].reshape(n_chunks, sub_window, P).sum(1).astype(np.float64)
        item_rank, _ = swap_search(item_rank, phy, item_load, num_ranks,
                                   lambda ir: swap_cost_tokens(X, ir, num_ranks, weight), cap,
                                   max_rounds=max_rounds, max_swaps=swaps_left, balance_weight=balance_weight,
                                   min_gain=max(min_gain * len(window_tokens), 1e-9), window_load=win,
                                   excess_tol=excess_tol)
        phy = stable_layout(phy, items_to_phy2log(item_rank, phy, num_ranks), slots_per_rank)
    return phy, int((phy != old).sum())


def rebalance_plan(plan: PlacementPlan, window_experts, budget: int = 4, **layer_kw) -> tuple[PlacementPlan, np.ndarray]:
    """One online step for a whole plan (what a runtime calls): window_experts int [W, L, K], the recent
    routing. Returns (new plan, int [L] slots rewritten per layer); slots that keep their expert keep
    their index, so only the rewritten slots need weights copied."""
    window_experts = np.asarray(window_experts, dtype=np.int64)
    if window_experts.ndim != 3 or window_experts.shape[1] != plan.num_layers:
        raise ValueError(f"online: window_experts must be [W, L={plan.num_layers}, K], got {window_experts.shape}")
    phy2log = plan.phy2log.copy()
    moved = np.zeros(plan.num_layers, dtype=np.int64)
    with single_thread_blas():
        for l in range(plan.num_layers):
            phy2log[l], moved[l] = rebalance_layer(phy2log[l], window_experts[:, l], plan.num_experts,
                                                   plan.num_ranks, plan.slots_per_rank, budget, **layer_kw)
    return PlacementPlan.from_phy2log(phy2log, plan.num_experts, plan.num_ranks, dict(plan.meta)), moved


def online_replay(plan: PlacementPlan, experts, batch_size=256, window=1024, step_batches=1, budget=4,
                  seed=0, hidden_size=2048, **layer_kw):
    """Serve `experts` (int [T, L, K]) batch by batch (same batching as `score_plan`), re-placing after
    every `step_batches` batches. Returns (scores dict with `experts_moved_*`, final plan)."""
    experts = trace_ids(experts)  # float ids were truncated to experts they do not name
    T, L, K = check_trace(plan, experts)  # another shape was an IndexError, or replayed the trace's layers only
    N, spr, E = plan.num_ranks, plan.slots_per_rank, plan.num_experts
    batch = batch_ids(T, batch_size, seed)
    nb = int(batch.max()) + 1
    rows_of = [np.flatnonzero(batch == b) for b in range(nb)]
    phy2log = plan.phy2log.copy()
    ranks = np.empty_like(experts)
    moved_per_step = []
    with single_thread_blas():
        for b in range(nb):
            cur = PlacementPlan.from_phy2log(phy2log, E, N)
            rows = rows_of[b]
            for l in range(L):
                slots = choose_replica(experts[rows, l], cur.log2phy[l], cur.replica_count[l], spr, N)
                ranks[rows, l] = slots // spr
            if (b + 1) % step_batches or b == nb - 1:
                continue
            seen = np.concatenate(rows_of[max(0, b + 1 - -(-window // batch_size)):b + 1])
            step_moves = 0
            for l in range(L):
                phy2log[l], m = rebalance_layer(phy2log[l], experts[seen, l], E, N, spr, budget, **layer_kw)
                step_moves += m
            moved_per_step.append(step_moves)
    out = score_ranks(ranks, batch, batch_size, N, hidden_size)
    out.update(slots_per_rank=spr, algorithm=str(plan.meta.get("algorithm", "")) + "+online",
               solver_seconds=float(plan.meta.get("solver_seconds", 0.0)), online_window=window,
               online_budget_per_layer_step=budget, online_steps=len(moved_per_step),
               experts_moved_total=int(sum(moved_per_step)),
               experts_moved_per_step_max=int(max(moved_per_step, default=0)),
               experts_moved_per_layer_step_mean=float(np.mean(moved_per_step) / L) if moved_per_step else 0.0)
    final = PlacementPlan.from_phy2log(phy2log, E, N, dict(plan.meta, online=True))
    return out, final.validate()
