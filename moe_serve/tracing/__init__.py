"""Routing traces in the runtime: record (TraceRecorder), replay (TraceReplay), expert load (ExpertLoadCounter).

All three are RouterHooks; the file format is `predictors.traces.RoutingTrace` (the shared traces' npz).
"""
from moe_serve.tracing.load import ExpertLoadCounter
from moe_serve.tracing.recorder import TraceRecorder
from moe_serve.tracing.replay import TraceReplay, fit_routing

__all__ = ["ExpertLoadCounter", "TraceRecorder", "TraceReplay", "fit_routing"]
