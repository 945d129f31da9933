"""Offline evaluation: fit on some traces, replay others layer by layer, score every slot.

`evaluate` replays each test trace as the runtime would see it (all rows of a layer at once, the
state right after that layer's router) and accumulates recall@k and precision/recall at a prefetch
budget per lookahead slot. `online_cost` times one predict() call for a decode-sized batch.

A predictor that adapts online (`adapts`, e.g. `mlp_online`) is evaluated prequentially instead:
each test trace is replayed in time order, `chunk` rows at a time; every layer of a chunk is
predicted first, and only then does the predictor observe that chunk's routing. So a prediction only
ever uses labels of tokens that came before its chunk (up to `chunk` - 1 tokens staler than a server
that updates every step would be).
"""
from __future__ import annotations

import statistics
import time

import torch

from predictors.base import Predictor, RoutingState, trace_tensors
from predictors.dataset import slot_targets
from predictors.metrics import MetricSum
from predictors.traces import RoutingTrace


def slot_name(predictor: Predictor, j: int) -> str:
    return "next_token" if predictor.next_token else f"lookahead_{j + 1}"


def evaluate(predictor: Predictor, traces: list[RoutingTrace], budget: int, chunk: int = 64) -> dict:
    """{slot name: {recall_at_k, precision_at_budget, recall_at_budget, rows}, 'predict_s': total}.

    Adapting predictors are replayed prequentially (see the module doc) and also report 'observe_s'.
    """
    if predictor.adapts:
        return evaluate_prequential(predictor, traces, budget, chunk)
    sums = [MetricSum(predictor.top_k, budget) for _ in range(predictor.slots)]
    predict_s = 0.0
    for trace in traces:
        targets = slot_targets(trace, predictor.lookahead)  # [T, L, D, K]
        for layer in range(trace.num_layers):
            state = RoutingState.from_trace(trace, layer)
            t0 = time.perf_counter()
            scores = predictor.predict(state, layer)  # [T, D, E]
            predict_s += time.perf_counter() - t0
            for j in range(predictor.slots):
                true = targets[:, layer, j]  # [T, K]
                ok = true[:, 0] >= 0
                sums[j].add(scores[ok, j], true[ok])
    out = {slot_name(predictor, j): s.result() for j, s in enumerate(sums)}
    out["predict_s"] = predict_s
    return out


def evaluate_prequential(predictor: Predictor, traces: list[RoutingTrace], budget: int, chunk: int = 64) -> dict:
    """Predict every layer of `chunk` rows (time order), then let the predictor observe them; repeat."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    sums = [MetricSum(predictor.top_k, budget) for _ in range(predictor.slots)]
    predict_s = observe_s = 0.0
    for trace in traces:
        targets = slot_targets(trace, predictor.lookahead)  # [T, L, D, K]
        experts, weights, prev_e, prev_w = trace_tensors(trace)  # [T, L, K] each
        hidden = None if trace.hidden is None else torch.from_numpy(trace.hidden).float()  # [T, L, H]
        layers = torch.arange(trace.num_layers)[None, :, None]
        for start in range(0, trace.num_tokens, chunk):
            rows = slice(start, min(start + chunk, trace.num_tokens))
            for layer in range(trace.num_layers):
                known = layers <= layer
                state = RoutingState(
                    experts=torch.where(known, experts[rows], -1), weights=torch.where(known, weights[rows], 0.0),
                    prev_experts=prev_e[rows], prev_weights=prev_w[rows],
                    hidden=None if hidden is None else hidden[rows, layer],
                )
                t0 = time.perf_counter()
                scores = predictor.predict(state, layer)  # [n, D, E]
                predict_s += time.perf_counter() - t0
                for j in range(predictor.slots):
                    true = targets[rows, layer, j]  # [n, K]
                    ok = true[:, 0] >= 0
                    sums[j].add(scores[ok, j], true[ok])
            t0 = time.perf_counter()
            predictor.observe(experts[rows], weights[rows], prev_e[rows], prev_w[rows], None if hidden is None else hidden[rows])
            observe_s += time.perf_counter() - t0
    out = {slot_name(predictor, j): s.result() for j, s in enumerate(sums)}
    out["predict_s"] = predict_s
    out["observe_s"] = observe_s
    return out


def online_cost(predictor: Predictor, trace: RoutingTrace, batch: int = 64, calls: int = 200, layer: int | None = None) -> float:
    """Median milliseconds of one predict() for `batch` tokens at one layer (the middle one by default)."""
    layer = trace.num_layers // 2 if layer is None else layer
    rows = torch.arange(min(batch, trace.num_tokens))
    state = RoutingState.from_trace(trace, layer, rows=rows.numpy())
    times = []
    with torch.inference_mode():
        for _ in range(10):
            predictor.predict(state, layer)
        for _ in range(calls):
            t0 = time.perf_counter()
            predictor.predict(state, layer)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
