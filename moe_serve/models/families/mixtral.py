"""Mixtral: softmax over all experts, top-k, renormalize; GQA with default rope; optional sliding window."""
from __future__ import annotations

from moe_serve.models.families.common import (Family, decoder_fields, experts_and_top_k, max_positions, need_size,
                                             norm_eps, optional_size, rope_spec)
from moe_serve.models.spec import ModelSpec, RoutingSpec


def parse(cfg: dict) -> ModelSpec:
    w = "Mixtral"
    base = decoder_fields(cfg, w)
    layers, head_dim = base["num_layers"], base["head_dim"]
    num_experts, top_k = experts_and_top_k(cfg, ("num_local_experts", "num_experts"), w)
    window = optional_size(cfg, "sliding_window")
    return ModelSpec(
        **base, family="mixtral", architecture="MixtralForCausalLM",
        num_experts=num_experts, top_k=top_k, moe_layers=tuple(range(layers)),
        moe_intermediate_size=need_size(cfg, "intermediate_size", w), intermediate_size=need_size(cfg, "intermediate_size", w),
        routing=RoutingSpec(top_k=top_k, scoring="softmax", norm_topk_prob=True, weights_fp32=True),
        rope=rope_spec(cfg, head_dim, default_theta=1e6), rms_norm_eps=norm_eps(cfg, 1e-5),
        max_position_embeddings=max_positions(cfg, 4096 * 32),
        sliding_windows=tuple([window] * layers),
    )


FAMILY = Family(
    name="mixtral", model_types=("mixtral",), architectures=("MixtralForCausalLM",), parse=parse,
    moe_module="block_sparse_moe", expert_leaves=("w1", "w3", "w2"), renames=((".mlp.", ".block_sparse_moe."),),
)
