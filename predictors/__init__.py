"""Speculative expert predictors, fitted offline on routing traces and queried online."""
from predictors.traces import RoutingTrace, load_trace, split_sequences

__all__ = ["RoutingTrace", "load_trace", "split_sequences"]
