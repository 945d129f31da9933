"""The engine: scheduler, sampler, detokenizer, the sync core (LLMEngine), AsyncEngine and LLM."""
from moe_serve.engine.async_engine import AsyncEngine, EngineDeadError
from moe_serve.engine.llm import LLM
from moe_serve.engine.llm_engine import LLMEngine
from moe_serve.engine.sampling_params import RequestOutputKind, SamplingParams
from moe_serve.engine.scheduler import QueueFullError
from moe_serve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

__all__ = ["AsyncEngine", "CompletionOutput", "EngineDeadError", "LLM", "LLMEngine", "QueueFullError",
           "RequestMetrics", "RequestOutput", "RequestOutputKind", "SamplingParams"]
