"""Loading the model for the engine: its router hooks, its context length, its KV budget.

The hooks must be handed to `load_model` before the model's shape is known, so `EngineHooks` is a
hook chain whose members (replay, expert-load counter, trace recorder, in that order: the counter
and the recorder see the replayed routing) are attached once the spec is read. When none is wanted
the model gets NO_HOOKS and never calls a hook.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe_serve.config import ModelConfig, TraceConfig, check_output_file
from moe_serve.models.hooks import NO_HOOKS, HookChain, RouterHooks
from moe_serve.tracing.load import ExpertLoadCounter
from moe_serve.tracing.recorder import TraceRecorder
from moe_serve.tracing.replay import TraceReplay, load_replay


class EngineHooks(HookChain):
    def __init__(self, trace: TraceConfig):
        self.trace_config = trace
        self.hooks: list[RouterHooks] = []
        self.active = bool(trace.expert_load_stats or trace.record_trace or trace.replay_trace)
        self.counter: ExpertLoadCounter | None = None
        self.recorder: TraceRecorder | None = None
        self.replay: TraceReplay | None = None  # read by `prepare`, before the weights
        if trace.record_trace:
            check_output_file(trace.record_trace, "trace.record_trace")  # it is written at close

    def prepare(self, spec) -> None:
        """What can be checked from config.json's spec before any weight is read: the replay trace (a bad
        file is refused in a second, not after a big model has loaded)."""
        if self.trace_config.replay_trace and self.replay is None:
            self.replay = load_replay(self.trace_config.replay_trace, spec.num_moe_layers, spec.num_experts,
                                      spec.top_k)

    def attach(self, spec, device: torch.device, meta: dict) -> None:
        tc = self.trace_config
        L, E, K = spec.num_moe_layers, spec.num_experts, spec.top_k
        if tc.replay_trace:
            self.prepare(spec)  # done already by load_engine_model
            self.hooks.append(self.replay)
        if tc.expert_load_stats:
            self.counter = ExpertLoadCounter(L, E, device)
            self.hooks.append(self.counter)
        if tc.record_trace:
            self.recorder = TraceRecorder(L, E, K, record_hidden=tc.record_hidden, meta=meta)
            self.hooks.append(self.recorder)

    def for_model(self) -> RouterHooks:
        return self if self.active else NO_HOOKS

    def expert_load(self) -> np.ndarray | None:
        return None if self.counter is None else self.counter.snapshot()

    def save_trace(self, path=None):
        if self.recorder is None:
            raise ValueError("trace.record_trace is not set: this engine records no routing trace")
        return self.recorder.save(path or self.trace_config.record_trace)


def load_engine_model(mc: ModelConfig, hooks: EngineHooks, expert_cache=None, parallel=None):
    from moe_serve.models import load_model

    if not Path(mc.model).is_dir():
        raise FileNotFoundError(f"model.model: checkpoint directory {mc.model} does not exist")
    if parallel is not None and parallel.world_size > 1:  # worker ranks (moe_serve/distributed)
        from moe_serve.distributed.executor import distributed_engine_model

        return distributed_engine_model(mc, parallel, hooks, expert_cache)
    if hooks.trace_config.replay_trace:  # config.json only: no weight is read yet
        from moe_serve.models.loader import read_spec

        hooks.prepare(read_spec(mc.model)[2])
    factory = None
    if expert_cache is not None:  # the offloading expert store (experts/factory.py); None: all resident
        from moe_serve.experts.factory import expert_store_factory

        factory = expert_store_factory(expert_cache)
    return load_model(mc.model, dtype=mc.dtype, device=mc.device, hooks=hooks.for_model(),
                      expert_store_factory=factory, mla_decode=mc.mla_decode)


def resolve_max_model_len(requested: int | None, context: int, kv_cache_gb: float, kv_bytes_per_token: int) -> int:
    """The requested length (at most the model's context), or by default the context capped by the KV budget."""
    if requested is not None:
        if requested > context:
            raise ValueError(f"model.max_model_len={requested} exceeds the model's context of {context} tokens "
                             "(max_position_embeddings, or original_max_position_embeddings x factor under YaRN)")
        return requested
    budget_tokens = int(kv_cache_gb * 2**30) // max(1, kv_bytes_per_token)
    return max(2, min(context, budget_tokens))
