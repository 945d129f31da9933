"""`ExpertCacheConfig` -> the `expert_store_factory` that `load_model` calls (None: all resident)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.experts.policies import make_policy
from moe_serve.experts.staging import staging_buffers

log = logging.getLogger(__name__)


def _available_host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def slots_for(cfg: ExpertCacheConfig, expert_bytes: int, total_experts: int, num_layers: int = 1,
              staging: int = 0) -> int:
    """The budget in slots (at most every expert); refused, naming the budget's field and the
    minimum, when it holds no expert or, with cache_per_layer, fewer than one per MoE layer.
    expert_cache_gb also pays for the store's `staging` buffers (one expert each: the device memory
    used stays within what the user set), so they leave fewer slots, unless it holds every expert (the
    store then needs no staging buffer); expert_cache_slots counts cache slots only, as cache-sim's
    capacity does (the buffers come on top)."""
    min_slots = num_layers if cfg.cache_per_layer else 1  # every layer's pool needs a slot of its own
    if cfg.expert_cache_slots is not None:
        slots = cfg.expert_cache_slots
        budget = f"expert_cache.expert_cache_slots={slots}"
    else:
        held = int(cfg.expert_cache_gb * 2**30 // expert_bytes)
        budget = (f"expert_cache.expert_cache_gb={cfg.expert_cache_gb} holds {held} experts "
                  f"(one takes {expert_bytes / 2**30:.4g} GiB)")
        if held < 1:
            raise ValueError(f"expert_cache.expert_cache_gb={cfg.expert_cache_gb} holds no expert "
                             f"(one takes {expert_bytes / 2**30:.4g} GiB)")  # 4 decimals printed 0.0000 for small ones
        if held >= total_experts:  # every expert gets a slot: nothing streams, the store allocates no staging buffer
            return total_experts
        if staging and held < staging + min_slots:
            per_layer = " (expert_cache.cache_per_layer: one per MoE layer)" if cfg.cache_per_layer else ""
            need = staging + min_slots
            raise ValueError(f"{budget}: {staging} staging buffers (cache_admission={cfg.cache_admission}) and "
                             f">= {min_slots} slot{'s' if min_slots > 1 else ''}{per_layer} need >= {need} experts "
                             f"({need * expert_bytes / 2**30:.4g} GiB)")
        slots = held - staging
    if slots < min_slots:
        raise ValueError(f"{budget}: expert_cache.cache_per_layer needs a slot per MoE layer, >= {num_layers} "
                         f"slots ({num_layers * expert_bytes / 2**30:.4g} GiB)")
    return min(slots, total_experts)


def fit_reuse_weights(cfg: ExpertCacheConfig, num_layers: int, num_experts: int):
    """The learned reuse forecast's weights float [NF, 8], fitted on expert_cache.reuse_trace; refused,
    naming the field, for an unreadable or too short trace or one of another model's shape."""
    from moe_serve.experts.policies.reuse import fit_reuse
    from predictors.traces import load_trace

    try:
        trace = load_trace(cfg.reuse_trace, keys=())
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"expert_cache.reuse_trace: {exc}") from exc
    if (trace.num_layers, trace.num_experts) != (num_layers, num_experts):
        raise ValueError(f"expert_cache.reuse_trace: {cfg.reuse_trace} has (MoE layers, experts) = "
                         f"{(trace.num_layers, trace.num_experts)}, the model has {(num_layers, num_experts)}")
    try:
        return fit_reuse(trace.experts.astype("int64"), num_experts)
    except ValueError as exc:  # too short to fit on
        raise ValueError(f"expert_cache.reuse_trace: {cfg.reuse_trace}: {exc}") from exc


def expert_store_factory(cfg: ExpertCacheConfig):
    if not cfg.enabled:
        return None

    def factory(spec, source, dtype: torch.dtype, device) -> OffloadExpertStore:
        gu, dn = source.get(0, 0)
        expert_bytes = (gu.numel() + dn.numel()) * torch.finfo(dtype).bits // 8
        L, E = source.num_moe_layers, source.num_experts
        capacity = slots_for(cfg, expert_bytes, L * E, L, staging_buffers(device, cfg.cpu_experts, cfg.cache_admission))
        predictor = None
        if cfg.predictor is not None:
            from predictors.registry import load_predictor

            try:
                predictor = load_predictor(cfg.predictor)
            except (OSError, ValueError) as exc:
                raise ValueError(f"expert_cache.predictor: {exc}") from exc
            if (predictor.num_layers, predictor.num_experts) != (L, E):
                raise ValueError(f"expert_cache.predictor: fitted for {predictor.num_layers} layers x "
                                 f"{predictor.num_experts} experts, the model has {L} x {E}")
            if predictor.top_k != spec.top_k:  # predicted-prefetch fetches, and the forecast is scaled to, its top_k
                raise ValueError(f"expert_cache.predictor: {cfg.predictor} was fitted for top_k={predictor.top_k}, "
                                 f"the model routes top_k={spec.top_k}")
            if predictor.needs_hidden:  # the cache's RoutingState carries routing only: every step would fail
                raise ValueError(f"expert_cache.predictor: {cfg.predictor} ({predictor.name}) predicts from hidden "
                                 "states, which the expert cache does not pass it (routing only); use one fitted on "
                                 "routing (mlp: --param use_hidden=false; or transition, logreg, ...)")
        load = None
        if cfg.cache_policy == "static":
            if predictor is None or not hasattr(predictor, "freq"):
                raise ValueError("expert_cache.cache_policy=static needs expert_cache.predictor "
                                 "(its fitted expert popularity is the profiled load)")
            load = predictor.freq.numpy()
        if cfg.cache_policy == "predicted-prefetch" and predictor is None:  # else plain predicted, silently
            raise ValueError("expert_cache.cache_policy=predicted-prefetch needs expert_cache.predictor "
                             "(the forecast it prefetches)")
        lookahead = min(cfg.prefetch_lookahead, predictor.lookahead) if predictor is not None else 0
        predicted = cfg.cache_policy in ("predicted", "predicted-prefetch")  # the policies that use the forecast
        if predictor is not None and lookahead < cfg.prefetch_lookahead and predicted:
            # served (as vLLM does with a capped setting) but not silently: the user asked for more
            log.warning("expert_cache.prefetch_lookahead=%d exceeds the lookahead %d that expert_cache.predictor %s "
                        "was fitted for; %s", cfg.prefetch_lookahead, predictor.lookahead, cfg.predictor,
                        f"prefetching {lookahead} MoE layer(s) ahead" if lookahead else
                        "it predicts the next token at the same layer, no later layer: nothing is prefetched")
        auto_from = cfg.prefetch_from == "auto"  # measured by the store while serving (prefetch_auto.py); 1 until then
        prefetch_from = 1 if auto_from else cfg.prefetch_from
        if lookahead and prefetch_from > lookahead and predicted:
            # every predicted layer is nearer than the first one prefetched for: the forecast only steers eviction
            log.warning("expert_cache.prefetch_from=%d is beyond the %d MoE layer(s) predicted ahead: no predicted "
                        "layer is prefetched for (the forecast still steers eviction)", cfg.prefetch_from, lookahead)
        reuse_weights = fit_reuse_weights(cfg, L, E) if cfg.reuse_trace is not None else None
        policy = make_policy(cfg.cache_policy, load=load, predictor=predictor if lookahead else None,
                             lookahead=lookahead, prefetch_from=prefetch_from, reuse_weights=reuse_weights)
        host = cfg.host_memory
        if host == "auto":
            avail = _available_host_bytes()
            host = "copy" if avail is None or avail > 1.25 * expert_bytes * L * E else "mmap"
        return OffloadExpertStore(source, dtype, device, capacity, policy, top_k=spec.top_k,
                                  per_layer=cfg.cache_per_layer, host=host, cpu_experts=cfg.cpu_experts,
                                  learn_every=cfg.predictor_learn_every, learning=cfg.predictor_learning,
                                  admit=cfg.cache_admission, prefetch_when=cfg.prefetch_when,
                                  prefetch_from_auto=auto_from and predicted)

    return factory
