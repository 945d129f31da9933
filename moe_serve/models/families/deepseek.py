"""DeepSeek-V2 and -V3: multi-head latent attention, shared experts, first dense layers, group routing.

V2 (as transformers implements it): softmax scores; `greedy` top-k or `group_limited_greedy` (keep the
`topk_group` groups with the highest max score); weights times `routed_scaling_factor`.
transformers ignores V2's `norm_topk_prob` (every published V2 has it false); so do we.
V3: sigmoid scores; the choice uses scores + `e_score_correction_bias`, keeping the `topk_group`
groups whose top-2 sum is highest (`noaux_tc`); weights are the unbiased scores, renormalized if
`norm_topk_prob`, times `routed_scaling_factor`. Rope on a `qk_rope_head_dim` slice, adjacent pairs
(interleaved); YaRN folds mscale(factor, mscale_all_dim)^2 into the softmax scale.
MoE layers: every layer from `first_k_dense_replace` on; `moe_layer_freq` other than 1 is refused.
Fields a config.json leaves out take transformers' defaults (`DEFAULTS`).
"""
from __future__ import annotations

import math

from moe_serve.models.families.common import (Family, check_act, eos_ids, experts_and_top_k, max_positions, need_size,
                                             norm_eps, optional_size, rope_spec, torch_dtype)
from moe_serve.models.families.fields import count, flag, number, token_id
from moe_serve.models.spec import MLASpec, ModelSpec, RoutingSpec, UnsupportedModelError


def _mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# transformers' config class defaults, for the fields a config.json leaves out (the checkpoint's tensors
# must then fit them: a shape that differs is a load error naming the tensor). V2 has no group default
# (transformers' V2 then routes greedy only), so no groups.
DEFAULTS = {
    "deepseek_v2": dict(n_shared_experts=2, q_lora_rank=1536, first_k_dense_replace=0, n_group=None,
                        topk_group=None, max_position_embeddings=2048),
    "deepseek_v3": dict(n_shared_experts=1, q_lora_rank=1536, first_k_dense_replace=3, n_group=8, topk_group=4,
                        max_position_embeddings=4096),
}


def _parse(cfg: dict, family: str) -> ModelSpec:
    w = "DeepSeek-V2" if family == "deepseek_v2" else "DeepSeek-V3"
    default = DEFAULTS[family]
    hidden, heads = need_size(cfg, "hidden_size", w), need_size(cfg, "num_attention_heads", w)
    layers = need_size(cfg, "num_hidden_layers", w)
    num_experts, top_k = experts_and_top_k(cfg, ("n_routed_experts", "num_local_experts", "num_experts"), w)
    # absent: transformers' default; null: no q LoRA (V2-Lite's config says so)
    q_lora_rank = default["q_lora_rank"] if "q_lora_rank" not in cfg else optional_size(cfg, "q_lora_rank")
    mla = MLASpec(q_lora_rank=q_lora_rank, kv_lora_rank=need_size(cfg, "kv_lora_rank", w),
                  qk_nope_head_dim=need_size(cfg, "qk_nope_head_dim", w),
                  qk_rope_head_dim=need_size(cfg, "qk_rope_head_dim", w), v_head_dim=need_size(cfg, "v_head_dim", w))
    first_dense = count(cfg, "first_k_dense_replace", default["first_k_dense_replace"])
    # transformers ignores moe_layer_freq (every layer from first_k_dense_replace on is MoE); DeepSeek's
    # reference code keeps only layers i % freq == 0. Every published checkpoint has 1, where both agree.
    freq = optional_size(cfg, "moe_layer_freq") or 1
    if freq != 1:
        raise UnsupportedModelError(
            f"config.json field 'moe_layer_freq' ({freq}) must be 1: transformers ignores it (every layer from "
            "first_k_dense_replace on is an MoE layer) while DeepSeek's reference code keeps only the layers "
            "whose index is a multiple of it, so the checkpoint's layout is ambiguous")
    moe_layers = tuple(range(first_dense, layers))
    n_group = optional_size(cfg, "n_group") or default["n_group"] or 1
    topk_group = optional_size(cfg, "topk_group") or default["topk_group"] or n_group
    scaling = cfg.get("routed_scaling_factor")
    if family == "deepseek_v2":
        if flag(cfg, "mlp_bias", False):  # transformers' V2 then biases its dense MLPs and shared experts
            raise UnsupportedModelError("config.json field 'mlp_bias' must be false: DeepSeek-V2 MLPs with biases "
                                        "are not supported (no published DeepSeek-V2 has them)")
        method = cfg.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(f"DeepSeek-V2 topk_method '{method}' is not supported "
                                        "(supported: greedy, group_limited_greedy)")
        routing = RoutingSpec(top_k=top_k, scoring="softmax", topk_method=method, norm_topk_prob=False,
                              routed_scaling_factor=number(scaling, "routed_scaling_factor", 1.0),
                              n_group=n_group, topk_group=topk_group, logits_fp32=True, weights_fp32=True)
        interleaved = True
    else:
        routing = RoutingSpec(top_k=top_k, scoring="sigmoid", topk_method="noaux_tc",
                              norm_topk_prob=flag(cfg, "norm_topk_prob", True),
                              routed_scaling_factor=number(scaling, "routed_scaling_factor", 2.5),
                              n_group=n_group, topk_group=topk_group, has_bias=True, logits_fp32=True,
                              weights_fp32=True)
        interleaved = flag(cfg, "rope_interleave", True)
    if routing.topk_method != "greedy":  # V2's greedy routing never reads the groups (nor does transformers)
        check_groups(routing, num_experts, top_k)
    rope = rope_spec(cfg, mla.qk_rope_head_dim, default_theta=10000.0, interleaved=interleaved,
                     complex_fp32=family == "deepseek_v2")
    scale = mla.qk_head_dim ** -0.5
    if rope.kind != "default" and rope.mscale_all_dim:
        scale *= _mscale(rope.factor, rope.mscale_all_dim) ** 2
    return ModelSpec(
        family=family, architecture="DeepseekV2ForCausalLM" if family == "deepseek_v2" else "DeepseekV3ForCausalLM",
        num_layers=layers, hidden_size=hidden, vocab_size=need_size(cfg, "vocab_size", w), num_heads=heads,
        num_kv_heads=heads, head_dim=mla.qk_head_dim, v_head_dim=mla.v_head_dim, num_experts=num_experts,
        top_k=top_k, moe_layers=moe_layers, moe_intermediate_size=need_size(cfg, "moe_intermediate_size", w),
        intermediate_size=need_size(cfg, "intermediate_size", w), routing=routing, rope=rope,
        rms_norm_eps=norm_eps(cfg, 1e-6),
        max_position_embeddings=max_positions(cfg, default["max_position_embeddings"]),
        tie_word_embeddings=flag(cfg, "tie_word_embeddings", False), bos_token_id=token_id(cfg, "bos_token_id"),
        eos_token_ids=eos_ids(cfg), torch_dtype=torch_dtype(cfg), hidden_act=check_act(cfg), attention="mla",
        mla=mla, qkv_bias=flag(cfg, "attention_bias", False), o_bias=flag(cfg, "attention_bias", False),
        sliding_windows=tuple([None] * layers), attn_scale=scale,
        shared_expert_intermediate_size=count(cfg, "n_shared_experts", default["n_shared_experts"])
        * cfg["moe_intermediate_size"],
        extra={"norm_topk_prob": cfg.get("norm_topk_prob"), "topk_method": cfg.get("topk_method"),
               "scoring_func": cfg.get("scoring_func"),
               # multi-token-prediction layers after the last: held by V3/R1 checkpoints, unused here
               "num_nextn_predict_layers": count(cfg, "num_nextn_predict_layers", 0)},
    )


def check_groups(routing: RoutingSpec, num_experts: int, top_k: int) -> None:
    """Group-limited routing's fields: groups that split the experts evenly, topk_group of them kept,
    and top-k within the experts those hold."""
    if num_experts % routing.n_group:
        raise ValueError(f"config.json field 'n_routed_experts' ({num_experts}) must be a multiple of 'n_group' "
                         f"({routing.n_group})")
    if routing.topk_method == "noaux_tc" and num_experts // routing.n_group < 2:
        raise ValueError(f"config.json field 'n_group' ({routing.n_group}) must leave at least 2 experts a group "
                         f"(n_routed_experts {num_experts}): V3 scores a group by its top-2 sum")
    if not 1 <= routing.topk_group <= routing.n_group:
        raise ValueError(f"config.json field 'topk_group' ({routing.topk_group}) must be in 1..n_group "
                         f"({routing.n_group})")
    candidates = routing.topk_group * (num_experts // routing.n_group)
    if top_k > candidates:  # it would take experts its groups exclude
        raise ValueError(f"config.json field 'num_experts_per_tok' ({top_k}) must be <= topk_group x experts per "
                         f"group ({routing.topk_group} x {num_experts // routing.n_group} = {candidates}): routing "
                         "keeps only the topk_group best groups")


_RENAMES = ((".shared_expert.", ".shared_experts."),)
DEEPSEEK_V2 = Family(name="deepseek_v2", model_types=("deepseek_v2",), architectures=("DeepseekV2ForCausalLM",),
                     parse=lambda cfg: _parse(cfg, "deepseek_v2"), renames=_RENAMES)
DEEPSEEK_V3 = Family(name="deepseek_v3", model_types=("deepseek_v3",), architectures=("DeepseekV3ForCausalLM",),
                     parse=lambda cfg: _parse(cfg, "deepseek_v3"), renames=_RENAMES)
