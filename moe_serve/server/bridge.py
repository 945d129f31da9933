"""What the server reads from the engine, in one place: tokenizer, context, vocabulary, live stats.

The server talks to `AsyncEngine` (generate, abort, shutdown); the rest (queue depths, expert load,
expert-cache and predictor counters) lives on the engine core and its expert store. This module is
the only one that knows where; a counter the engine does not have is reported as absent (None / {}),
never as a made-up 0.
"""
from __future__ import annotations

import inspect

from moe_serve.server.metrics import EngineStats

_CACHE_KEYS = ("hits", "misses", "bytes_moved")
_PREDICTOR_KEYS = {"precision": ("precision", "predictor_precision", "prefetch_precision"),
                   "recall": ("recall", "predictor_recall", "prefetch_recall")}


class EngineBridge:
    def __init__(self, engine):
        self.engine = engine  # AsyncEngine
        self.core = getattr(engine, "engine", engine)  # LLMEngine
        from moe_serve.engine.async_engine import EngineDeadError
        from moe_serve.engine.scheduler import QueueFullError

        self.queue_full_errors = (QueueFullError,)
        self.dead_errors = (EngineDeadError,)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.core.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.core.spec.vocab_size)

    @property
    def generation_defaults(self) -> dict:
        """The checkpoint's sampling defaults, read (and checked) when the engine started."""
        return dict(self.core.generation_defaults)

    @property
    def spec(self):
        return self.core.spec

    @property
    def model(self):
        return self.core.model

    def alive(self) -> bool:
        return self.dead_reason() is None

    def dead_reason(self) -> str | None:
        """Why the engine can serve no more (its step loop stopped; worker ranks: which rank died or failed, and
        how: every request then fails at once, DistributedModel.failure), else None."""
        dead = getattr(self.engine, "dead", None)
        if dead is not None:
            return str(dead)
        failure = getattr(self.core.model, "failure", None)
        return None if failure is None else failure()

    def stats(self) -> EngineStats:
        s = EngineStats(num_requests_running=self.core.num_running, num_requests_waiting=self.core.num_waiting)
        load = self.engine.expert_load()
        s.expert_load = load
        raw = self._cache_stats()
        s.cache = {k: float(raw[k]) for k in _CACHE_KEYS if raw.get(k) is not None}
        for key, names in _PREDICTOR_KEYS.items():
            value = next((raw[n] for n in names if raw.get(n) is not None), None)
            if value is not None:
                s.predictor[key] = float(value)
        return s

    def _cache_stats(self) -> dict:
        """The expert store's counters as a dict, when the store keeps any (the resident store does not)."""
        for owner in (self.engine, self.core):
            fn = getattr(owner, "expert_cache_stats", None)
            if callable(fn):
                return _as_dict(fn())
        model = self.core.model
        if model is None:
            return {}
        store = getattr(model, "store", None) or getattr(getattr(model, "runtime", None), "store", None)
        for name in ("metrics", "cache_stats", "stats"):  # the offloading store's metrics(): hits, misses, ...
            fn = getattr(store, name, None)
            if callable(fn):
                return _as_dict(fn())
        return {}

    async def shutdown(self) -> None:
        result = self.engine.shutdown()
        if inspect.isawaitable(result):
            await result


def _as_dict(obj) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
