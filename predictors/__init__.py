"""Speculative expert predictors, fitted offline on routing traces and queried online.

    pred = make_predictor("mlp", num_layers, num_experts, top_k, lookahead=1).fit(traces)
    scores = pred.predict(RoutingState(...), layer)  # [B, lookahead, E]
    pred.save("p.safetensors"); pred = load_predictor("p.safetensors")
"""
from predictors.traces import RoutingTrace, load_trace, split_sequences
from predictors.base import Predictor, RoutingState
from predictors.registry import REGISTRY, load_predictor, make_predictor

__all__ = [
    "RoutingTrace", "load_trace", "split_sequences", "Predictor", "RoutingState",
    "REGISTRY", "load_predictor", "make_predictor",
]
