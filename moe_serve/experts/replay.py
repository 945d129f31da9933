"""Trace-driven simulation of an expert cache: the serving policy code, no model.

A routing trace is replayed as a batch-1 decode (token by token, layer by layer, one cache shared
across layers, kept across sequences as a server would). A cost model turns residency into time:

- every expert copy takes `copy_ms = expert_bytes / bandwidth` on one copy engine. One engine at
  full bandwidth is right for host-to-device over PCIe (more engines share the same link). The order:
  `copy_order="fifo"` (default; what the store does today: every copy goes on one CUDA stream in
  submission order, so a demand fetch waits behind the prefetches already queued) or
  `"demand-first"` (prefetches wait in a host-side queue ordered by when they will be needed, and
  one is started only when the engine is free, so a demand fetch waits at most for the one copy in
  flight; a queued prefetch whose expert is evicted is cancelled, one whose expert is needed before
  its copy started counts as a miss and becomes a demand fetch: what `ThreadCopier` does);
- every MoE layer takes `layer_ms` of compute once all its experts are ready; the wait before it
  is stall.

Per access (token, layer, expert): a *hit* needs no new copy (resident, or its prefetch already
issued); *ready in time* means resident with its copy complete when the layer needs it.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from moe_serve.experts.cache import SlotCache
from moe_serve.experts.policies.base import CachePolicy

DSV2_LITE_EXPERT_BYTES = 3 * 2048 * 1408 * 2  # gate, up, down of one DeepSeek-V2-Lite expert in bf16


@dataclass
class CostModel:
    expert_bytes: int = DSV2_LITE_EXPERT_BYTES
    bandwidth_gbps: float = 25.0  # host-to-device GB/s (PCIe 4.0 x16, pinned memory, in practice)
    layer_ms: float = 0.25  # compute of one MoE layer at batch 1 (attention + experts), H100-class
    max_queued: int = 12  # most prefetches waiting on the copy engine at once
    copy_order: str = "fifo"  # or "demand-first" (see the module doc)
    prefetch_when: str = "always"  # or "idle": a hint is copied only while the copy engine has nothing to do

    def __post_init__(self):
        for name in ("expert_bytes", "bandwidth_gbps", "layer_ms"):  # inf made the times (and JSON) Infinity
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"cost model: {name} must be a finite number > 0, got {getattr(self, name)}")
        if not math.isfinite(self.copy_ms):
            raise ValueError(f"cost model: expert_bytes={self.expert_bytes} at bandwidth_gbps={self.bandwidth_gbps} "
                             f"gives a copy time of {self.copy_ms} ms; it must be finite")
        if self.copy_order not in ("fifo", "demand-first"):
            raise ValueError(f"cost model: copy_order must be 'fifo' or 'demand-first', got {self.copy_order!r}")
        if self.prefetch_when not in ("always", "idle"):
            raise ValueError(f"cost model: prefetch_when must be 'always' or 'idle', got {self.prefetch_when!r}")

    @property
    def copy_ms(self) -> float:
        return self.expert_bytes / (self.bandwidth_gbps * 1e9) * 1e3

    @property
    def min_prefetch_distance(self) -> int:
        """The nearest layer ahead a copy started after a router can land for: ceil(copy / layer time)."""
        return max(1, math.ceil(self.copy_ms / self.layer_ms - 1e-9))

    def prefetch_from(self, value: str) -> int:
        """`--prefetch-from`: a layer count >= 1, or auto (`min_prefetch_distance`)."""
        if value == "auto":
            return self.min_prefetch_distance
        n = int(value) if value.isdigit() else 0
        if n < 1:
            raise ValueError(f"--prefetch-from must be an integer >= 1 or auto, got {value!r}")
        return n


def capacity_slots(fraction: float, num_layers: int, num_experts: int, top_k: int) -> int:
    """Slots for `fraction` of all experts resident (at least one layer's top-k)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"capacity must be a fraction in (0, 1], got {fraction}")
    return max(int(round(fraction * num_layers * num_experts)), top_k)


def global_steps(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """experts int [T, L, K] -> int64 [T*L, K] global ids (layer * E + expert), one row per clock."""
    T, L, K = experts.shape
    return (np.arange(L)[None, :, None] * num_experts + experts.astype(np.int64)).reshape(T * L, K)


def check_routing(experts: np.ndarray, num_experts: int) -> None:
    """experts int [T, L, K]: ids in [0, E), distinct within a row. An id >= E would alias an expert
    of the next layer (global id layer * E + e); a repeated one would replay as a free hit."""
    if experts.size and (experts.min() < 0 or experts.max() >= num_experts):
        raise ValueError(f"replay: expert ids must lie in [0, {num_experts}), got [{experts.min()}, {experts.max()}]")
    ordered = np.sort(experts, axis=-1)
    same = ordered[..., 1:] == ordered[..., :-1]  # [T, L, K-1]
    if same.any():
        t, layer, k = (int(i[0]) for i in np.nonzero(same))
        raise ValueError(f"replay: token {t}, layer {layer} routes to expert {ordered[t, layer, k]} twice "
                         f"(a row's top-k experts are distinct)")


def replay(experts: np.ndarray, num_experts: int, policy: CachePolicy, capacity: int,
           cost: CostModel, state_fn=None) -> dict:
    """Replay `experts` int [T, L, K] through a cache of `capacity` slots run by `policy`.

    `state_fn(t, layer)` returns the predictor's input for token row t after `layer`'s router (or
    None); it is only called for policies that prefetch. Returns the metrics (see module doc)."""
    T, L, K = experts.shape
    check_routing(experts, num_experts)
    steps = global_steps(experts, num_experts)
    cache = SlotCache(policy, L, num_experts, capacity)
    if hasattr(policy, "warm_set"):  # a static hot set: resident before the first token, as the store loads it
        for g in policy.warm_set().tolist():  # at start-up (not counted: its copies end before any step)
            cache.insert(int(g))
    copy_ms = cost.copy_ms
    ready_at = np.zeros(L * num_experts)  # ms at which each expert's latest copy completes
    prefetched = np.zeros(L * num_experts, dtype=bool)  # prefetched, not yet used
    demand_first = cost.copy_order == "demand-first"
    idle_only = cost.prefetch_when == "idle"
    pending: list[tuple[int, int, int]] = []  # demand-first: heap of (need clock, seq, gid) not started
    is_pending = np.zeros(L * num_experts, dtype=bool)
    pend_seq = np.zeros(L * num_experts, dtype=np.int64)  # heap entries with another seq are stale
    issued_at = np.zeros(L * num_experts)
    now = copy_free = stall = 0.0
    seq = 0
    hits = in_time = copies = pf_issued = pf_used = pf_wasted = pf_cancelled = 0

    def evicted_one(ev: int) -> None:
        nonlocal pf_wasted, pf_cancelled, copies
        if ev < 0 or not prefetched[ev]:
            return
        prefetched[ev] = False
        if is_pending[ev]:  # never started: cancelled, no bytes moved
            is_pending[ev] = False
            pf_cancelled += 1
            copies -= 1
        else:
            pf_wasted += 1

    for clock in range(T * L):
        layer = clock % L
        gids = steps[clock]
        cache.begin_step(gids)
        policy.on_access(layer, experts[clock // L, layer], clock)
        while pending and copy_free < now:  # queued prefetches the engine started before this step
            _, sq, g = heapq.heappop(pending)
            if not is_pending[g] or pend_seq[g] != sq:
                continue
            is_pending[g] = False
            copy_free = max(copy_free, issued_at[g]) + copy_ms
            ready_at[g] = copy_free
        need = now
        for g in gids.tolist():
            if is_pending[g]:  # its prefetch never started: a miss, fetched now on demand
                is_pending[g] = False
                prefetched[g] = False
                copy_free = max(copy_free, now) + copy_ms
                ready_at[g] = copy_free
                continue
            if cache.resident(g):
                hits += 1
                in_time += ready_at[g] <= need
                if prefetched[g]:
                    pf_used += 1
                    prefetched[g] = False
                continue
            _, evicted = cache.insert(g)
            evicted_one(evicted)
            copy_free = max(copy_free, now) + copy_ms
            ready_at[g] = copy_free
            copies += 1
        hints = policy.on_route(layer, state_fn(clock // L, layer) if state_fn else None, clock)
        n_pending = int(is_pending.sum()) if demand_first and hints.size else 0
        for g in hints.tolist():
            if cache.resident(g):
                continue
            if n_pending >= cost.max_queued if demand_first else copy_free - now >= cost.max_queued * copy_ms:
                break
            if idle_only and (copy_free > now or n_pending):  # the link is busy: hints would delay demand copies
                break
            placed = cache.insert(g, prefetch=True)
            if placed is None:
                continue
            evicted_one(placed[1])
            if demand_first:
                seq += 1
                heapq.heappush(pending, (clock + (g // num_experts - layer - 1) % L + 1, seq, g))
                is_pending[g] = True
                pend_seq[g] = seq
                n_pending += 1
                issued_at[g] = now
                ready_at[g] = np.inf
            else:
                copy_free = max(copy_free, now) + copy_ms
                ready_at[g] = copy_free
            prefetched[g] = True
            copies += 1
            pf_issued += 1
        ready = ready_at[gids].max()
        if ready > now:
            stall += ready - now
            now = ready
        now += cost.layer_ms
    accesses = T * L * K
    misses = accesses - hits
    return dict(
        hit_rate=hits / accesses,
        ready_in_time=in_time / accesses,
        bytes_per_token=copies * cost.expert_bytes / T,
        stall_ms_per_token=stall / T,
        ms_per_token=now / T,
        copies_per_token=copies / T,
        prefetch_precision=pf_used / pf_issued if pf_issued else None,
        prefetch_recall=pf_used / (pf_used + misses) if pf_used + misses else None,
        prefetches_wasted=pf_wasted,
        prefetches_cancelled=pf_cancelled,
        tokens=T,
        accesses=accesses,
        capacity=capacity,
    )


class TracePredictions:
    """A fitted `predictors.Predictor` evaluated once over a whole trace, batched (the same `predict`
    code, one call per layer and chunk of rows instead of one per token and layer), then served to
    the policy. A predictor that adapts online (`adapts`) is replayed prequentially, as
    `predictors.evaluate` does: every layer of a 64-row chunk is predicted, and only then does it
    observe that chunk's routing, so no prediction uses the label of its own or a later token.

    `learn_lag`: chunks by which learning trails prediction. 0: the chunk is observed right after it
    is predicted (learning inline, in the decode step); 1: one chunk later, as with the runtime's
    `BackgroundLearner`, whose round for chunk c lands while chunk c + 1 is served (counted as
    landing only after all of it: the conservative side).

    The policy calls `predict(state, layer)`; in replay the `state` is the trace row t (use
    `state_fn=lambda t, layer: t`). Scores float32 [T, L, D, E]."""

    def __init__(self, predictor, trace, chunk: int = 4096, learn_lag: int = 0):
        from predictors.base import RoutingState, trace_tensors

        self.lookahead, self.top_k = predictor.lookahead, predictor.top_k
        T, L = trace.num_tokens, trace.num_layers
        adapts = getattr(predictor, "adapts", False)
        step = 64 if adapts else chunk
        tensors = trace_tensors(trace) if adapts else None  # experts, weights, prev_e, prev_w [T, L, K]
        if learn_lag < 0:
            raise ValueError(f"TracePredictions: learn_lag must be >= 0 chunks, got {learn_lag}")
        self.scores = torch.zeros(T, L, predictor.slots, trace.num_experts)
        waiting: list[np.ndarray] = []  # predicted chunks not yet observed
        for start in range(0, T, step):
            rows = np.arange(start, min(start + step, T))
            with torch.no_grad():
                for layer in range(L):
                    state = RoutingState.from_trace(trace, layer, rows)
                    self.scores[rows, layer] = predictor.predict(state, layer).float()
            if adapts:
                waiting.append(rows)
                if len(waiting) > learn_lag:
                    done = waiting.pop(0)
                    predictor.observe(*(t[done] for t in tensors))
        self.scores = self.scores.numpy()

    def predict(self, state: int, layer: int) -> np.ndarray:
        return self.scores[state, layer][None]  # [1, D, E]
