"""Mixtral: softmax over all experts, top-k, renormalize; GQA with default rope; optional sliding window."""
from __future__ import annotations

from moe_serve.models.families.common import Family, check_act, eos_ids, need, need_any, positive, rope_spec, torch_dtype
from moe_serve.models.spec import ModelSpec, RoutingSpec


def parse(cfg: dict) -> ModelSpec:
    w = "Mixtral"
    hidden, heads, layers = need(cfg, "hidden_size", w), need(cfg, "num_attention_heads", w), need(cfg, "num_hidden_layers", w)
    head_dim = cfg.get("head_dim") or hidden // heads
    num_experts = positive(need_any(cfg, ("num_local_experts", "num_experts"), w), "num_local_experts")
    top_k = positive(need(cfg, "num_experts_per_tok", w), "num_experts_per_tok")
    window = cfg.get("sliding_window")
    return ModelSpec(
        family="mixtral", architecture="MixtralForCausalLM", num_layers=layers, hidden_size=hidden,
        vocab_size=need(cfg, "vocab_size", w), num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim, v_head_dim=head_dim,
        num_experts=num_experts, top_k=top_k, moe_layers=tuple(range(layers)),
        moe_intermediate_size=need(cfg, "intermediate_size", w), intermediate_size=need(cfg, "intermediate_size", w),
        routing=RoutingSpec(top_k=top_k, scoring="softmax", norm_topk_prob=True, weights_fp32=True),
        rope=rope_spec(cfg, head_dim, default_theta=1e6), rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096 * 32),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg), torch_dtype=torch_dtype(cfg), hidden_act=check_act(cfg),
        sliding_windows=tuple([window] * layers), attn_scale=head_dim ** -0.5,
    )


FAMILY = Family(
    name="mixtral", model_types=("mixtral",), architectures=("MixtralForCausalLM",), parse=parse,
    moe_module="block_sparse_moe", expert_leaves=("w1", "w3", "w2"), renames=((".mlp.", ".block_sparse_moe."),),
)
