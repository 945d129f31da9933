"""Qwen2-MoE (shared expert with a sigmoid gate, qkv bias) and Qwen3-MoE (per-head q/k RMSNorm).

Both: softmax over all experts, top-k, renormalize only if `norm_topk_prob`; the chosen weights are
cast to the hidden dtype. Dense layers: `mlp_only_layers` or those failing `(i + 1) % decoder_sparse_step`.
"""
from __future__ import annotations

from moe_serve.models.families.common import (Family, decoder_fields, experts_and_top_k, max_positions, need_size,
                                             norm_eps, optional_size, rope_spec)
from moe_serve.models.families.fields import count, flag, layer_ids
from moe_serve.models.spec import ModelSpec, RoutingSpec


def _parse(cfg: dict, family: str) -> ModelSpec:
    w = "Qwen2-MoE" if family == "qwen2_moe" else "Qwen3-MoE"
    base = decoder_fields(cfg, w)
    layers, head_dim = base["num_layers"], base["head_dim"]
    num_experts, top_k = experts_and_top_k(cfg, ("num_experts", "num_local_experts"), w)
    step = optional_size(cfg, "decoder_sparse_step") or 1
    dense_only = layer_ids(cfg, "mlp_only_layers", layers)
    moe_layers = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    if flag(cfg, "use_sliding_window", False):
        # absent: transformers' default 4096; null: no window (as transformers' Qwen3-MoE; its Qwen2-MoE fails)
        window = 4096 if "sliding_window" not in cfg else optional_size(cfg, "sliding_window")
        if family == "qwen2_moe":
            types = cfg.get("layer_types") or [
                "sliding_attention" if (i + 1) % 2 and i < count(cfg, "max_window_layers", 28) else "full_attention"
                for i in range(layers)]
            windows = tuple(window if t == "sliding_attention" else None for t in types)
        else:
            windows = tuple([window] * layers)
    else:
        windows = tuple([None] * layers)
    # absent: transformers' default (its shared expert is always there; 0 makes it add nothing)
    shared = count(cfg, "shared_expert_intermediate_size", 5632) if family == "qwen2_moe" else 0
    return ModelSpec(
        **base, family=family,
        architecture="Qwen2MoeForCausalLM" if family == "qwen2_moe" else "Qwen3MoeForCausalLM",
        num_experts=num_experts, top_k=top_k, moe_layers=moe_layers,
        moe_intermediate_size=need_size(cfg, "moe_intermediate_size", w), intermediate_size=need_size(cfg, "intermediate_size", w),
        routing=RoutingSpec(top_k=top_k, scoring="softmax", norm_topk_prob=flag(cfg, "norm_topk_prob", False),
                            weights_fp32=False),
        rope=rope_spec(cfg, head_dim, default_theta=10000.0), rms_norm_eps=norm_eps(cfg, 1e-6),
        max_position_embeddings=max_positions(cfg, 32768),
        qkv_bias=flag(cfg, "qkv_bias", True) if family == "qwen2_moe" else flag(cfg, "attention_bias", False),
        o_bias=False if family == "qwen2_moe" else flag(cfg, "attention_bias", False),
        qk_norm="none" if family == "qwen2_moe" else "head", sliding_windows=windows,
        shared_expert_intermediate_size=shared,
        shared_expert_gate=bool(shared),
    )


QWEN2_MOE = Family(name="qwen2_moe", model_types=("qwen2_moe",), architectures=("Qwen2MoeForCausalLM",),
                   parse=lambda cfg: _parse(cfg, "qwen2_moe"))
QWEN3_MOE = Family(name="qwen3_moe", model_types=("qwen3_moe",), architectures=("Qwen3MoeForCausalLM",),
                   parse=lambda cfg: _parse(cfg, "qwen3_moe"))
