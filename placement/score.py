"""Scoring a placement plan on a routing trace: what it would cost the EP dispatch.

Definitions (per MoE layer l, N ranks; replicas split tokens by `placement.replica.choose_replica`):

- rank load: routing choices (token, k) served by each rank.
- imbalance of a batch: max over ranks / mean over ranks of that batch's rank load (1.0 is perfect).
  Batches hold B tokens drawn without replacement in a seeded random order (a decode batch mixes
  tokens of many requests); the trailing partial batch only counts towards the whole-trace figure.
  `imbalance_mean/p50/p99/max` are over all (batch, layer) pairs.
- whole-trace imbalance (`imbalance_trace`): max/mean of the rank loads summed over the whole trace,
  averaged over layers (`imbalance_trace_max`: the worst layer). This is the plan's imbalance with the
  sampling noise of small batches removed.
- fan-out: distinct ranks holding a token's k choices (= dispatch copies of its hidden state).
- dispatch bytes per token: fan-out x hidden_size x dtype_bytes, summed over layers (one direction;
  the combine sends the same amount back).
- rank changes: ranks a token needs at layer l+1 that it did not use at layer l (mean per token and
  layer pair) - hops a hidden state makes that co-location across layers could have saved.
- replica memory: extra physical slots beyond one per logical expert, per layer and as a fraction.
"""
from __future__ import annotations

import numpy as np

from placement.plan import PlacementPlan
from placement.replica import choose_replica


def batch_ids(num_tokens: int, batch_size: int, seed: int | None = 0) -> np.ndarray:
    """int64 [T]: batch of each row; rows are dealt to batches of `batch_size` in a seeded random order
    (seed None: in row order)."""
    if batch_size < 1:
        raise ValueError(f"score: batch_size must be >= 1, got {batch_size}")
    perm = np.arange(num_tokens) if seed is None else np.random.default_rng(seed).permutation(num_tokens)
    out = np.empty(num_tokens, dtype=np.int64)
    out[perm] = np.arange(num_tokens) // batch_size
    return out


def check_trace(plan: PlacementPlan, experts: np.ndarray, empty_ok: bool = False) -> tuple[int, int, int]:
    """(T, L, K) of `experts` int [T, L, K]; ValueError unless it fits `plan` (its layers, ids < its experts)."""
    if experts.ndim != 3:
        raise ValueError(f"score: trace experts must be [T, L, K], got shape {experts.shape}")
    T, L, K = experts.shape
    if T == 0 and not empty_ok:
        raise ValueError("score: trace has no tokens")
    if L != plan.num_layers:
        raise ValueError(f"score: trace has {L} MoE layers, plan has {plan.num_layers}")
    if experts.size and experts.max() >= plan.num_experts:
        raise ValueError(f"score: trace expert id {experts.max()} >= plan num_experts={plan.num_experts}")
    if experts.size and experts.min() < 0:  # -1 indexed log2phy from the end: scored as the last expert
        raise ValueError(f"score: trace expert id {experts.min()} < 0")
    return T, L, K


def trace_ids(experts) -> np.ndarray:
    """int64 [T, L, K] of `experts` (an int array or a RoutingTrace); ValueError for non-integer ids, which
    the cast would truncate (0.9 -> expert 0) rather than refuse."""
    experts = np.asarray(getattr(experts, "experts", experts))
    if experts.size and not np.issubdtype(experts.dtype, np.integer):
        raise ValueError(f"score: expert ids must be integers, got {experts.dtype}")
    return experts.astype(np.int64, copy=False)


def max_over_mean(load: np.ndarray) -> np.ndarray:
    """Imbalance max/mean over the last axis of rank loads float [..., N]; 1.0 where the mean is 0: no
    load is perfectly balanced (0 / eps said 0, below the best a plan can do)."""
    mean = load.mean(-1)
    return np.where(mean > 0, load.max(-1) / np.where(mean > 0, mean, 1.0), 1.0)


def assign_ranks(plan: PlacementPlan, experts: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """int64 [T, L, K]: rank serving each routing choice under the plan and the replica rule."""
    experts = np.asarray(experts, dtype=np.int64)
    T, L, K = check_trace(plan, experts, empty_ok=True)
    ranks = np.empty_like(experts)
    for l in range(L):
        slots = choose_replica(experts[:, l], plan.log2phy[l], plan.replica_count[l],
                               plan.slots_per_rank, plan.num_ranks, batch)
        ranks[:, l] = slots // plan.slots_per_rank
    return ranks


def touched_ranks(ranks: np.ndarray, num_ranks: int) -> np.ndarray:
    """bool [T, L, N]: whether the token sends its hidden state to rank n at layer l."""
    T, L, K = ranks.shape
    out = np.zeros((T, L, num_ranks), dtype=bool)
    t = np.broadcast_to(np.arange(T)[:, None, None], ranks.shape)
    l = np.broadcast_to(np.arange(L)[None, :, None], ranks.shape)
    out[t, l, ranks] = True
    return out


def score_plan(plan: PlacementPlan, experts, batch_size: int = 512, hidden_size: int = 2048,
               dtype_bytes: int = 2, seed: int | None = 0) -> dict:
    """All scores of `plan` on `experts` (int [T, L, K] or a RoutingTrace), as a flat JSON-able dict.
    seed: batching order (None: consecutive rows form a batch)."""
    experts = trace_ids(experts)
    check_trace(plan, experts)
    batch = batch_ids(experts.shape[0], batch_size, seed)
    ranks = assign_ranks(plan, experts, batch)
    out = score_ranks(ranks, batch, batch_size, plan.num_ranks, hidden_size, dtype_bytes)
    extra = plan.num_slots - plan.num_experts
    out.update(slots_per_rank=plan.slots_per_rank, replica_slots_per_layer=int(extra),
               replica_memory_fraction=float(extra / plan.num_experts),
               solver_seconds=float(plan.meta.get("solver_seconds", 0.0)), algorithm=str(plan.meta.get("algorithm", "")))
    return out


def score_ranks(ranks: np.ndarray, batch: np.ndarray, batch_size: int, num_ranks: int, hidden_size: int = 2048,
                dtype_bytes: int = 2) -> dict:
    """Scores from the rank serving each choice (int [T, L, K]) and each row's batch id (int [T])."""
    T, L, K = ranks.shape
    N = num_ranks
    nb = int(batch.max()) + 1
    # rank load per (batch, layer): [nb, L, N]
    flat = (batch[:, None, None] * L + np.arange(L)[None, :, None]) * N + ranks
    load = np.bincount(flat.ravel(), minlength=nb * L * N).reshape(nb, L, N).astype(np.float64)
    full = np.bincount(batch, minlength=nb) == batch_size
    per_batch = load[full] if full.any() else load
    imb = max_over_mean(per_batch).ravel()
    whole = load.sum(0)  # [L, N]
    imb_trace = max_over_mean(whole)
    touched = touched_ranks(ranks, N)  # [T, L, N]
    fan = touched.sum(-1)  # [T, L]
    changes = (touched[:, 1:] & ~touched[:, :-1]).sum(-1) if L > 1 else np.zeros((T, 1))
    return dict(
        tokens=T, layers=L, top_k=K, num_ranks=N, batch_size=batch_size, num_batches=int(full.sum()) or nb,
        imbalance_mean=float(imb.mean()), imbalance_p50=float(np.percentile(imb, 50)),
        imbalance_p99=float(np.percentile(imb, 99)), imbalance_max=float(imb.max()),
        imbalance_trace=float(imb_trace.mean()), imbalance_trace_max=float(imb_trace.max()),
        fanout_mean=float(fan.mean()), fanout_p99=float(np.percentile(fan, 99)),
        dispatch_bytes_per_token=float(fan.sum(1).mean() * hidden_size * dtype_bytes),
        hidden_size=hidden_size, rank_changes_mean=float(changes.mean()),
        imbalance_series=[float(x) for x in max_over_mean(per_batch).mean(1)],
    )


def _water_level(base: np.ndarray, amount: float) -> float:
    """Level h with sum(max(h - base, 0)) == amount (base float [R]): pouring `amount` onto the lowest."""
    b = np.sort(base)
    level = (amount + np.cumsum(b)) / np.arange(1, len(b) + 1)  # level if the j lowest are filled
    j = int(np.argmax(np.r_[level[:-1] <= b[1:], True]))  # first j whose level stays below the next base
    return float(level[j])


def score_load(plan: PlacementPlan, load) -> dict:
    """Imbalance of `plan` under per-expert loads only (float [L, E], e.g. aggregate counts): single-copy
    experts load their rank; replicated experts are split as the replica rule does in expectation
    (least-loaded water-filling over the ranks holding a copy, each rank once however many copies it
    holds, ascending expert id, unsettled ones counted as an even split over those ranks)."""
    load = np.asarray(load, dtype=np.float64)
    if load.shape != (plan.num_layers, plan.num_experts):
        raise ValueError(f"score: load must be [L={plan.num_layers}, E={plan.num_experts}], got {load.shape}")
    bad = (~np.isfinite(load)).sum(), (load < 0).sum()  # a NaN scored as balanced, a negative cancelled real load
    if any(bad):
        raise ValueError(f"score: load must be finite and >= 0, got {bad[0]} NaN or infinite" if bad[0] else
                         f"score: load must be finite and >= 0, got {bad[1]} negative")
    N, spr = plan.num_ranks, plan.slots_per_rank
    rank_load = np.zeros((plan.num_layers, N))
    for l in range(plan.num_layers):
        cnt = plan.replica_count[l]
        ranks_of = {e: np.unique(plan.log2phy[l, e, :cnt[e]] // spr) for e in np.flatnonzero(cnt > 1)}
        single = cnt[plan.phy2log[l]] == 1
        rank_load[l] = np.bincount(np.arange(plan.num_slots)[single] // spr, weights=load[l, plan.phy2log[l, single]],
                                   minlength=N)
        for e, ranks in ranks_of.items():  # unsettled: an even split over the ranks holding a copy
            rank_load[l, ranks] += load[l, e] / len(ranks)
        for e, ranks in ranks_of.items():
            rank_load[l, ranks] -= load[l, e] / len(ranks)
            rank_load[l, ranks] = np.maximum(rank_load[l, ranks], _water_level(rank_load[l, ranks], load[l, e]))
    imb = max_over_mean(rank_load)
    return dict(imbalance_trace=float(imb.mean()), imbalance_trace_max=float(imb.max()),
                imbalance_per_layer=[float(x) for x in imb])
