"""moe-serve: a serving runtime for Mixture-of-Experts language models.

    from moe_serve import LLM, SamplingParams, AsyncEngine

The names are imported lazily, so `import moe_serve.config` (the CLI, other tools) does not pay for
torch and the model code.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "moe_serve.engine.llm",
    "LLMEngine": "moe_serve.engine.llm_engine",
    "AsyncEngine": "moe_serve.engine.async_engine",
    "SamplingParams": "moe_serve.engine.sampling_params",
    "RequestOutputKind": "moe_serve.engine.sampling_params",
    "RequestOutput": "moe_serve.engine.outputs",
    "CompletionOutput": "moe_serve.engine.outputs",
    "QueueFullError": "moe_serve.engine.scheduler",
    "EngineConfig": "moe_serve.config",
    "DEFAULT_MODEL": "moe_serve.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe_serve' has no attribute {name!r}")
