"""OLMoE: Qwen-style routing (softmax, top-k, optional renormalization), q/k RMSNorm over the whole
projection (not per head), optional clip_qkv."""
from __future__ import annotations

from moe_serve.models.families.common import (Family, decoder_fields, experts_and_top_k, max_positions, need_size,
                                             norm_eps, rope_spec)
from moe_serve.models.families.fields import flag, number
from moe_serve.models.spec import ModelSpec, RoutingSpec


def parse(cfg: dict) -> ModelSpec:
    w = "OLMoE"
    base = decoder_fields(cfg, w)
    layers, head_dim = base["num_layers"], base["head_dim"]
    num_experts, top_k = experts_and_top_k(cfg, ("num_experts", "num_local_experts"), w)
    return ModelSpec(
        **base, family="olmoe", architecture="OlmoeForCausalLM",
        num_experts=num_experts, top_k=top_k, moe_layers=tuple(range(layers)),
        moe_intermediate_size=need_size(cfg, "intermediate_size", w), intermediate_size=need_size(cfg, "intermediate_size", w),
        routing=RoutingSpec(top_k=top_k, scoring="softmax", norm_topk_prob=flag(cfg, "norm_topk_prob", False),
                            weights_fp32=False),
        rope=rope_spec(cfg, head_dim, default_theta=10000.0), rms_norm_eps=norm_eps(cfg, 1e-5),
        max_position_embeddings=max_positions(cfg, 4096),
        qkv_bias=flag(cfg, "attention_bias", False), o_bias=flag(cfg, "attention_bias", False),
        qk_norm="full", clip_qkv=number(cfg.get("clip_qkv"), "clip_qkv"), sliding_windows=tuple([None] * layers),
    )


FAMILY = Family(name="olmoe", model_types=("olmoe",), architectures=("OlmoeForCausalLM",), parse=parse)
