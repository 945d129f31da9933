"""The `expert_cache` section of the config tree: the offloading expert store's device budget, policy,
predictor and copies (`moe_serve/experts/`, docs/expert_cache.md)."""
from __future__ import annotations

from dataclasses import dataclass

from moe_serve.config_fields import doc, require


@dataclass
class ExpertCacheConfig:
    expert_cache_gb: float | None = doc("GiB of device memory for experts (the rest stay on the host): cache "
                                        "slots plus, below every expert, the 2 staging buffers of cache_admission "
                                        "reuse; default: every expert resident", default=None)
    expert_cache_slots: int | None = doc("cache slots on the compute device, as cache-sim's capacity counts them "
                                         "(instead of --expert-cache-gb); below every expert, cache_admission "
                                         "reuse adds 2 staging buffers: N + 2 experts of memory", default=None)
    cache_policy: str = doc("expert cache policy: lru, lfu, static, predicted (evict by predicted next use) or "
                            "predicted-prefetch (also fetch the predictor's top-k of the next layers)",
                            default="predicted")
    prefetch_lookahead: int = doc("MoE layers ahead the predictor prefetches experts for (0: none)", default=1)
    prefetch_from: str | int = doc("the nearest MoE layer ahead whose predicted experts are prefetched (1: the "
                                   "next). A copy slower than d layers of compute cannot land before layer l + d: "
                                   "set it to copy time / layer time, rounded up, so such hints leave the link to "
                                   "copies that can; auto: that, from the start-up copy time and the first 32 layer "
                                   "steps served with their experts in place (1 until then), as cache-sim's auto",
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
    reuse_trace: str | None = doc("routing trace (.npz) of this model, another domain than the one served, to fit "
                                  "the learned reuse forecast on at start-up (about 40 s for an 8,000-token "
                                  "DeepSeek-V2-Lite trace on 2 CPU cores); the predicted policies then also evict by "
                                  "it, as cache-sim --reuse", default=None)
    cpu_experts: str = doc("compute cold experts where they lie (CPU) when cheaper: auto, on or off", default="auto")
    cache_per_layer: bool = doc("split the expert slots evenly per layer instead of sharing them", default=False)
    host_memory: str = doc("host copy of the experts: copy (in RAM, pinned on GPU), mmap (read from the "
                           "checkpoint on demand) or auto (copy when RAM allows)", default="auto")
    cache_admission: str = doc("which demand misses take a slot: always, reuse (a free slot, or else only "
                               "experts used in the last token; the others stream through a staging buffer: "
                               "CPU devices only) or auto "
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
        if isinstance(self.prefetch_from, str) and self.prefetch_from.isdigit():  # the CLI's flag is a string
            self.prefetch_from = int(self.prefetch_from)
        require(self.prefetch_from == "auto" or (isinstance(self.prefetch_from, int) and not isinstance(
            self.prefetch_from, bool) and self.prefetch_from >= 1), "expert_cache", "prefetch_from",
            "an integer >= 1 or auto", self.prefetch_from)
        require(self.prefetch_when in ("always", "idle"), "expert_cache", "prefetch_when", "one of always, idle",
                self.prefetch_when)
        require(self.predictor_learn_every >= 0, "expert_cache", "predictor_learn_every", ">= 0",
                self.predictor_learn_every)
        require(self.predictor_learning in ("background", "inline"), "expert_cache", "predictor_learning",
                "one of background, inline", self.predictor_learning)
        # fitted, then ignored by the other policies: refused rather than silently unused
        require(self.reuse_trace is None or self.cache_policy in ("predicted", "predicted-prefetch"), "expert_cache",
                "reuse_trace", "unset unless cache_policy is predicted or predicted-prefetch (the policies that use "
                "it)", self.reuse_trace)
        require(self.cpu_experts in ("auto", "on", "off"), "expert_cache", "cpu_experts", "one of auto, on, off",
                self.cpu_experts)
        require(self.host_memory in ("auto", "copy", "mmap"), "expert_cache", "host_memory", "one of auto, copy, mmap",
                self.host_memory)
        require(self.cache_admission in ("auto", "always", "reuse"), "expert_cache", "cache_admission",
                "one of auto, always, reuse", self.cache_admission)

    @property
    def enabled(self) -> bool:
        return self.expert_cache_gb is not None or self.expert_cache_slots is not None
