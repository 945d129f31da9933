"""The one config tree: small dataclasses, validated on construction, every field documented.

Each field's `metadata["help"]` is its documentation and the help text of the CLI flag derived from
it (`--max-num-seqs` for `max_num_seqs`, see `moe_serve.cli.flags`). Validation errors name the
field and the limit. Sections: model, kv cache, scheduler, expert cache, parallel, server; `EngineConfig`
groups them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from moe_serve.config_types import check_types

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "default_model")


def doc(help: str, **kw):
    """A dataclass field with its documentation attached (the CLI help text)."""
    return field(metadata={"help": help}, **kw)


def require(cond: bool, section: str, name: str, limit: str, value) -> None:
    if not cond:
        raise ValueError(f"{section}.{name} must be {limit}, got {value!r}")


def check_output_file(path: str, name: str) -> None:
    """Refuse an output file that could not be written, before the work that fills it (minutes of
    generation or fitting would otherwise end in a traceback from open()); creates its parent directories."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{name} {path}: is a directory, expected a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, or no permission
        raise ValueError(f"{name} {path}: cannot create its directory ({e.strerror})") from None
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{name} {path}: not writable")


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
class ParallelConfig:
    tp: int = doc("tensor-parallel ranks: attention heads, dense MLPs and shared experts are split over them", default=1)
    ep: int = doc("expert-parallel ranks: experts are spread over them per the placement plan "
                  "(world size = max(tp, ep); tp=1 with ep>1 runs attention data-parallel)", default=1)
    dispatch: str = doc("EP token dispatch: auto (alltoall when attention is data-parallel, else allgather), "
                        "allgather (all-gather / reduce-scatter) or alltoall", default="auto")
    preplan: bool = doc("pre-planned all-to-all dispatch: size each layer's buffers from the previous step's "
                        "counts and skip the count exchange (mispredictions are corrected)", default=False)
    preplan_predictor: str | None = doc("fitted predictor file (predictors' safetensors, lookahead >= 1): the "
                                        "pre-planned dispatch forecasts layer l+1's counts with it after layer l's "
                                        "router instead of using the previous step's counts", default=None)
    placement: str | None = doc("placement plan file (JSON or safetensors from `placement`); default: contiguous",
                                default=None)
    rebalance_every: int = doc("compute a new placement from live expert loads every N steps (0: never)", default=0)
    rebalance_window: int = doc("steps of expert-load history the rebalancer plans from", default=64)
    redundant_experts: int = doc("extra physical expert slots in all (replicas of hot experts); must make "
                                 "experts + redundant_experts divisible by ep", default=0)
    allreduce: str = doc("TP all-reduce: auto (DeepSpeed shm for small CPU messages when available, else "
                         "gloo/nccl), gloo or deepspeed", default="auto")
    startup_timeout_s: float = doc("seconds to wait for every rank to load and report ready", default=180.0)
    heartbeat_interval_s: float = doc("seconds between heartbeats of each rank", default=0.5)
    heartbeat_timeout_s: float = doc("a rank silent this long is declared dead", default=30.0)
    step_timeout_s: float = doc("longest a forward step may take on the ranks before it is failed", default=600.0)
    shutdown_grace_s: float = doc("seconds a shutdown waits for the step in flight, and the ranks for their Shutdown, "
                                  "before the ranks are stopped (SIGTERM, 2 s later SIGKILL): a hung rank cannot hold "
                                  "it for heartbeat_timeout_s or step_timeout_s", default=5.0)
    control_transport: str = doc("ZeroMQ control sockets: ipc (temp dir) or tcp (loopback, free ports); either way "
                                 "every frame is signed with a key drawn per engine", default="ipc")
    threads_per_rank: int = doc("torch threads of each rank on CPU (0: cores / ranks)", default=0)
    worker_endpoint: str | None = doc("tcp://host:port to bind for ranks started by torchrun (each rank gets "
                                      "MOE_SERVE_FRONTEND=host:port; it and the frontend the same hex "
                                      "MOE_SERVE_CONTROL_KEY); default: the engine starts its ranks",
                                      default=None)

    def __post_init__(self):
        require(self.tp >= 1, "parallel", "tp", ">= 1", self.tp)
        require(self.ep >= 1, "parallel", "ep", ">= 1", self.ep)
        w = max(self.tp, self.ep)
        require(w % self.tp == 0 and w % self.ep == 0, "parallel", "ep",
                f"a divisor or a multiple of tp={self.tp}", self.ep)
        require(self.tp in (1, w), "parallel", "tp", f"1 or max(tp, ep)={w} (mixed TP and DP attention "
                "is not supported)", self.tp)
        require(self.dispatch in ("auto", "allgather", "alltoall"), "parallel", "dispatch",
                "one of auto, allgather, alltoall", self.dispatch)
        require(not (self.dispatch == "alltoall" and self.tp > 1 and self.ep > 1), "parallel", "dispatch",
                "allgather or auto when tp > 1 (alltoall needs data-parallel attention, tp=1)", self.dispatch)
        require(not self.preplan or (self.tp == 1 and self.ep > 1 and self.dispatch != "allgather"), "parallel",
                "preplan", "False unless the dispatch is alltoall (tp=1, ep>1, dispatch auto or alltoall)", self.preplan)
        require(self.preplan_predictor is None or self.preplan, "parallel", "preplan_predictor",
                "unset unless preplan is on", self.preplan_predictor)
        require(self.rebalance_every >= 0, "parallel", "rebalance_every", ">= 0", self.rebalance_every)
        require(self.rebalance_window >= 1, "parallel", "rebalance_window", ">= 1", self.rebalance_window)
        require(self.redundant_experts >= 0, "parallel", "redundant_experts", ">= 0", self.redundant_experts)
        require(self.allreduce in ("auto", "gloo", "deepspeed"), "parallel", "allreduce",
                "one of auto, gloo, deepspeed", self.allreduce)
        for name in ("startup_timeout_s", "heartbeat_interval_s", "heartbeat_timeout_s", "step_timeout_s",
                     "shutdown_grace_s"):
            require(getattr(self, name) > 0, "parallel", name, "> 0", getattr(self, name))
        require(self.heartbeat_timeout_s > 2 * self.heartbeat_interval_s, "parallel", "heartbeat_timeout_s",
                f"> 2 x heartbeat_interval_s ({2 * self.heartbeat_interval_s:g})", self.heartbeat_timeout_s)
        require(self.control_transport in ("ipc", "tcp"), "parallel", "control_transport", "ipc or tcp",
                self.control_transport)
        require(self.threads_per_rank >= 0, "parallel", "threads_per_rank", ">= 0", self.threads_per_rank)
        require(self.worker_endpoint is None or (self.worker_endpoint.startswith("tcp://")
                                                 and self.worker_endpoint.rsplit(":", 1)[-1].isdigit()),
                "parallel", "worker_endpoint", "tcp://host:port", self.worker_endpoint)

    @property
    def world_size(self) -> int:
        return max(self.tp, self.ep)


@dataclass
class ExpertCacheConfig:
    expert_cache_gb: float | None = doc("GiB of expert slots on the compute device (the rest stay on the host), "
                                        "the staging buffers of cache_admission reuse (2 experts) included; "
                                        "default: every expert resident", default=None)
    expert_cache_slots: int | None = doc("expert slots on the compute device (instead of --expert-cache-gb; the 2 "
                                         "staging buffers of cache_admission reuse come on top)", default=None)
    cache_policy: str = doc("expert cache policy: lru, lfu, static, predicted (evict by predicted next use) or "
                            "predicted-prefetch (also fetch the predictor's top-k of the next layers)",
                            default="predicted")
    prefetch_lookahead: int = doc("MoE layers ahead the predictor prefetches experts for (0: none)", default=1)
    prefetch_from: int = doc("the nearest MoE layer ahead whose predicted experts are prefetched (1: the next). "
                             "A copy slower than d layers of compute cannot land before layer l + d: set it to "
                             "copy time / layer time, rounded up, so such hints leave the link to copies that can",
                             default=1)
    prefetch_when: str = doc("when a prefetch may start: always, or idle (only while no copy is in flight or "
                             "queued, so it never delays a demand copy: for a link slower than the compute)",
                             default="always")
    predictor: str | None = doc("fitted predictor file (predictors' safetensors) for the predicted policy", default=None)
    predictor_learn_every: int = doc("an adaptive predictor (mlp_online) learns from the served routing every this "
                                     "many tokens; 0: never (it stays as fitted)", default=64)
    predictor_learning: str = doc("where that learning runs: background (a worker thread, on a copy of the "
                                  "predictor whose new weights are swapped in after each round) or inline (inside "
                                  "the decode step: a pause of online_steps optimizer steps every "
                                  "predictor_learn_every tokens)", default="background")
    cpu_experts: str = doc("compute cold experts where they lie (CPU) when cheaper: auto, on or off", default="auto")
    cache_per_layer: bool = doc("split the expert slots evenly per layer instead of sharing them", default=False)
    host_memory: str = doc("host copy of the experts: copy (in RAM, pinned on GPU), mmap (read from the "
                           "checkpoint on demand) or auto (copy when RAM allows)", default="auto")
    cache_admission: str = doc("which demand misses take a slot: always, reuse (only experts used in the last "
                               "token; the others stream through a staging buffer: CPU devices only) or auto "
                               "(reuse on CPU, always elsewhere)", default="auto")

    def __post_init__(self):
        # finite: an infinite budget passed `> 0` and failed later, in the slot count, naming no option
        require(self.expert_cache_gb is None or 0 < self.expert_cache_gb < float("inf"), "expert_cache",
                "expert_cache_gb", "a finite number > 0", self.expert_cache_gb)
        require(self.expert_cache_slots is None or self.expert_cache_slots >= 1, "expert_cache", "expert_cache_slots",
                ">= 1", self.expert_cache_slots)
        require(self.expert_cache_gb is None or self.expert_cache_slots is None, "expert_cache", "expert_cache_slots",
                "unset when expert_cache_gb is set (one budget)", self.expert_cache_slots)
        require(self.cache_policy in ("lru", "lfu", "static", "predicted", "predicted-prefetch"), "expert_cache",
                "cache_policy", "one of lru, lfu, static, predicted, predicted-prefetch", self.cache_policy)
        require(self.prefetch_lookahead >= 0, "expert_cache", "prefetch_lookahead", ">= 0", self.prefetch_lookahead)
        require(self.prefetch_from >= 1, "expert_cache", "prefetch_from", ">= 1", self.prefetch_from)
        require(self.prefetch_when in ("always", "idle"), "expert_cache", "prefetch_when", "one of always, idle",
                self.prefetch_when)
        require(self.predictor_learn_every >= 0, "expert_cache", "predictor_learn_every", ">= 0",
                self.predictor_learn_every)
        require(self.predictor_learning in ("background", "inline"), "expert_cache", "predictor_learning",
                "one of background, inline", self.predictor_learning)
        require(self.cpu_experts in ("auto", "on", "off"), "expert_cache", "cpu_experts", "one of auto, on, off",
                self.cpu_experts)
        require(self.host_memory in ("auto", "copy", "mmap"), "expert_cache", "host_memory", "one of auto, copy, mmap",
                self.host_memory)
        require(self.cache_admission in ("auto", "always", "reuse"), "expert_cache", "cache_admission",
                "one of auto, always, reuse", self.cache_admission)

    @property
    def enabled(self) -> bool:
        return self.expert_cache_gb is not None or self.expert_cache_slots is not None


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
