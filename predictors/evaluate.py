"""Offline evaluation: fit on some traces, replay others layer by layer, score every slot.

`evaluate` replays each test trace as the runtime would see it (all rows of a layer at once, the
state right after that layer's router) and accumulates recall@k and precision/recall at a prefetch
budget per lookahead slot. `online_cost` times one predict() call for a decode-sized batch.
"""
from __future__ import annotations

import statistics
import time

import torch

from predictors.base import Predictor, RoutingState
from predictors.dataset import slot_targets
from predictors.metrics import MetricSum
from predictors.traces import RoutingTrace


def slot_name(predictor: Predictor, j: int) -> str:
    return "next_token" if predictor.next_token else f"lookahead_{j + 1}"


def evaluate(predictor: Predictor, traces: list[RoutingTrace], budget: int) -> dict:
    """{slot name: {recall_at_k, precision_at_budget, recall_at_budget, rows}, 'predict_s': total}."""
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
