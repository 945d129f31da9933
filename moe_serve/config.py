"""The one config tree: small dataclasses, validated on construction, every field documented.

Each field's `metadata["help"]` is its documentation and the help text of the CLI flag derived from
it (`--max-num-seqs` for `max_num_seqs`, see `moe_serve.cli.flags`). Validation errors name the
field and the limit. Sections: model, kv cache, scheduler, trace, server here; parallel
(`config_parallel.py`) and expert cache (`config_expert_cache.py`) in files of their own; `EngineConfig`
groups them, and every section is importable from here. The field helpers are in `config_fields.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from moe_serve.config_expert_cache import ExpertCacheConfig
from moe_serve.config_fields import check_output_file, doc, require, same_file
from moe_serve.config_parallel import ParallelConfig
from moe_serve.config_types import check_types

__all__ = ["DEFAULT_MODEL", "GENERATION_CONFIG_MODES", "MLA_DECODE_MODES", "EngineConfig", "ExpertCacheConfig",
           "KVCacheConfig", "ModelConfig", "ParallelConfig", "SchedulerConfig", "ServerConfig", "TraceConfig",
           "check_output_file", "doc", "require"]

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "default_model")


MLA_DECODE_MODES = ("absorbed", "expanded")  # DeepSeek decode attention: in the latent space, or expanded K/V
GENERATION_CONFIG_MODES = ("auto", "none")  # the checkpoint's sampling defaults, or the built-in ones


@dataclass
class ModelConfig:
    model: str = doc("Hugging Face checkpoint directory (config.json + *.safetensors)", default=DEFAULT_MODEL)
    dtype: str = doc("compute dtype: auto (the checkpoint's), float32, bfloat16 or float16", default="auto")
    device: str = doc("compute device, e.g. cpu or cuda:0", default="cpu")
    max_model_len: int | None = doc("longest sequence (prompt + output); default: the model's context", default=None)
    seed: int = doc("seed for requests that give none", default=0)
    generation_config: str = doc("sampling defaults for the fields a request (or LLM.generate without "
                                 "SamplingParams) leaves unset: auto (the checkpoint's generation_config.json: "
                                 "temperature, top_p, top_k, max_new_tokens as max_tokens, as vLLM's default) "
                                 "or none (temperature 1, top_p 1, top_k -1)", default="auto")
    cpu_threads: int | None = doc("torch intra-op CPU threads (process-wide); default: torch's choice. "
                                  "On a CPU shared with other work, 1 avoids waiting on descheduled threads",
                                  default=None)
    mla_decode: str = doc("DeepSeek (MLA) decode attention: absorbed (in the latent space, no per-step "
                          "expansion of the cache: the fast one) or expanded (transformers' op order: bit-exact "
                          "in bf16, cost grows with context x heads)", default="absorbed")
    compile_decode: bool = doc("run decode-only steps of up to compile_max_batch sequences as one torch.compile "
                               "(inductor) graph: ~2x faster decode on small models, after ~45 s of "
                               "compiling when the engine starts (on a CPU inductor needs a C++ compiler). "
                               "Single-rank, resident experts, GQA families; otherwise, or if compiling "
                               "fails, the eager step runs and a warning says why", default=False)
    compile_max_batch: int | None = doc("largest decode batch that runs compiled; default: timed when the engine "
                                        "starts (the compiled step reads each token's experts separately, so big "
                                        "batches of big models are faster eager)", default=None)

    def __post_init__(self):
        require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "model", "dtype",
                "one of auto, float32, bfloat16, float16", self.dtype)
        require(self.max_model_len is None or self.max_model_len > 0, "model", "max_model_len", "> 0", self.max_model_len)
        require(self.cpu_threads is None or self.cpu_threads >= 1, "model", "cpu_threads", ">= 1", self.cpu_threads)
        require(self.compile_max_batch is None or self.compile_max_batch >= 1, "model", "compile_max_batch", ">= 1",
                self.compile_max_batch)
        require(self.generation_config in GENERATION_CONFIG_MODES, "model", "generation_config",
                " or ".join(GENERATION_CONFIG_MODES), self.generation_config)
        require(self.mla_decode in MLA_DECODE_MODES, "model", "mla_decode", " or ".join(MLA_DECODE_MODES),
                self.mla_decode)


@dataclass
class KVCacheConfig:
    kv_cache_gb: float = doc("memory budget of the KV cache in GiB (the whole engine's: parallel ranks split it, "
                             "TP by heads, data-parallel attention by sequences)", default=0.5)
    max_num_seqs: int = doc("most sequences decoded at once (KV cache slots)", default=16)

    def __post_init__(self):
        require(self.kv_cache_gb > 0, "kv_cache", "kv_cache_gb", "> 0", self.kv_cache_gb)
        require(self.max_num_seqs >= 1, "kv_cache", "max_num_seqs", ">= 1", self.max_num_seqs)


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = doc("most tokens in one forward step (prefill chunks + decodes); at least "
                                      "kv_cache.max_num_seqs, one decode token per sequence", default=512)
    prefill_chunk: int = doc("longest prompt chunk prefilled in one step", default=256)
    max_queue: int = doc("most requests waiting; more are refused with a clear error", default=1024)

    def __post_init__(self):
        require(self.prefill_chunk >= 1, "scheduler", "prefill_chunk", ">= 1", self.prefill_chunk)
        require(self.max_num_batched_tokens >= self.prefill_chunk, "scheduler", "max_num_batched_tokens",
                f">= prefill_chunk ({self.prefill_chunk})", self.max_num_batched_tokens)
        require(self.max_queue >= 1, "scheduler", "max_queue", ">= 1", self.max_queue)


@dataclass
class TraceConfig:
    record_trace: str | None = doc("write a routing trace (.npz) of everything served to this path", default=None)
    record_hidden: bool = doc("also record the hidden state entering each router", default=False)
    replay_trace: str | None = doc("drive every router from this recorded trace instead of its gate", default=None)
    expert_load_stats: bool = doc("count tokens per expert of each MoE layer (CLI load table, /metrics)", default=True)

    def __post_init__(self):
        # the server's live recording takes record_hidden in POST /v1/traces/start, not from here
        require(not self.record_hidden or bool(self.record_trace), "trace", "record_hidden",
                "set only with trace.record_trace (it records nothing alone)", self.record_hidden)
        if self.record_trace and self.replay_trace and same_file(self.record_trace, self.replay_trace):
            # the recording, written at close, replaced the trace just replayed
            raise ValueError(f"trace.record_trace {self.record_trace} is also trace.replay_trace "
                             f"{self.replay_trace}: the recording would replace it; name another file")


@dataclass
class ServerConfig:
    host: str = doc("address the HTTP server binds (loopback by default)", default="127.0.0.1")
    port: int = doc("TCP port of the HTTP server (0: any free port)", default=8000)
    served_model_name: str | None = doc("model name in the API (default: the checkpoint directory's name)", default=None)
    api_key: str | None = doc("if set, /v1/* requires 'Authorization: Bearer <api_key>'", default=None)
    max_pending_requests: int = doc("most requests the server holds at once (running + waiting); more get 429",
                                    default=256)
    request_timeout_s: float = doc("a request still running after this many seconds is aborted (504)", default=600.0)
    trace_dir: str = doc("directory where POST /v1/traces/dump writes routing traces", default="traces")

    def __post_init__(self):
        require(0 <= self.port <= 65535, "server", "port", "in [0, 65535]", self.port)
        require(self.max_pending_requests >= 1, "server", "max_pending_requests", ">= 1", self.max_pending_requests)
        require(self.request_timeout_s > 0, "server", "request_timeout_s", "> 0", self.request_timeout_s)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    expert_cache: ExpertCacheConfig = field(default_factory=ExpertCacheConfig)

    def __post_init__(self):
        # every running sequence decodes one token a step: a smaller token budget leaves the sequences in
        # the higher KV slots, and the prompts behind them, waiting until the others finish (vLLM refuses it too)
        require(self.scheduler.max_num_batched_tokens >= self.kv_cache.max_num_seqs, "scheduler",
                "max_num_batched_tokens", f">= kv_cache.max_num_seqs ({self.kv_cache.max_num_seqs})",
                self.scheduler.max_num_batched_tokens)

    @classmethod
    def sections(cls) -> dict[str, type]:
        """Section name -> section dataclass, in declaration order (the CLI's flag groups)."""
        return {f.name: f.default_factory().__class__ for f in fields(cls)}  # type: ignore[misc]

    @classmethod
    def from_flat(cls, **kwargs) -> "EngineConfig":
        """Build the tree from flat keyword arguments (`LLM(model=..., max_num_seqs=...)`, CLI flags)."""
        built = {}
        remaining = dict(kwargs)
        for name, section_cls in cls.sections().items():
            names = {f.name for f in fields(section_cls)}
            mine = {k: remaining.pop(k) for k in list(remaining) if k in names}
            check_types(name, section_cls, mine)
            built[name] = section_cls(**mine)
        if remaining:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(remaining))}")
        return cls(**built)
