"""The one config tree: small dataclasses, validated on construction, every field documented.

Each field's `metadata["help"]` is its documentation and the help text of the CLI flag derived from
it (`--max-num-seqs` for `max_num_seqs`, see `moe_serve.cli.flags`). Validation errors name the
field and the limit. Sections: model, kv cache, scheduler, expert cache, parallel, server; `EngineConfig`
groups them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "default_model")


def doc(help: str, **kw):
    """A dataclass field with its documentation attached (the CLI help text)."""
    return field(metadata={"help": help}, **kw)


def require(cond: bool, section: str, name: str, limit: str, value) -> None:
    if not cond:
        raise ValueError(f"{section}.{name} must be {limit}, got {value!r}")


@dataclass
class ModelConfig:
    model: str = doc("Hugging Face checkpoint directory (config.json + *.safetensors)", default=DEFAULT_MODEL)
    dtype: str = doc("compute dtype: auto (the checkpoint's), float32, bfloat16 or float16", default="auto")
    device: str = doc("compute device, e.g. cpu or cuda:0", default="cpu")
    max_model_len: int | None = doc("longest sequence (prompt + output); default: the model's context", default=None)
    seed: int = doc("seed for requests that give none", default=0)

    def __post_init__(self):
        require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "model", "dtype",
                "one of auto, float32, bfloat16, float16", self.dtype)
        require(self.max_model_len is None or self.max_model_len > 0, "model", "max_model_len", "> 0", self.max_model_len)


@dataclass
class KVCacheConfig:
    kv_cache_gb: float = doc("memory budget of the KV cache in GiB", default=0.5)
    max_num_seqs: int = doc("most sequences decoded at once (KV cache slots)", default=16)

    def __post_init__(self):
        require(self.kv_cache_gb > 0, "kv_cache", "kv_cache_gb", "> 0", self.kv_cache_gb)
        require(self.max_num_seqs >= 1, "kv_cache", "max_num_seqs", ">= 1", self.max_num_seqs)


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = doc("most tokens in one forward step (prefill chunks + decodes)", default=512)
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

    @classmethod
    def from_flat(cls, **kwargs) -> "EngineConfig":
        """Build the tree from flat keyword arguments (`LLM(model=..., max_num_seqs=...)`, CLI flags)."""
        sections = {f.name: f.default_factory for f in fields(cls)}  # type: ignore[misc]
        built = {}
        remaining = dict(kwargs)
        for name, factory in sections.items():
            section_cls = factory().__class__
            names = {f.name for f in fields(section_cls)}
            mine = {k: remaining.pop(k) for k in list(remaining) if k in names}
            built[name] = section_cls(**mine)
        if remaining:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(remaining))}")
        return cls(**built)
