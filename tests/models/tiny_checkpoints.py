"""Tiny random Hugging Face checkpoints, one per family, written with transformers' save_pretrained.

Other areas' tests reuse them: `make_tiny_checkpoint("mixtral", tmp_path)` returns the directory.
Weights use a larger init std than transformers' default so logits are far from ties (greedy
continuations are then a meaningful comparison) and routing is decisive.
"""
from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=None)

FAMILIES: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_key_value_heads=2, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)),
    "mixtral_window": ("MixtralConfig", "MixtralForCausalLM",
                       dict(num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                            sliding_window=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
                       shared_expert_intermediate_size=80, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=False, mlp_only_layers=[1], qkv_bias=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_key_value_heads=2, head_dim=24, intermediate_size=96, moe_intermediate_size=32,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 128})),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_key_value_heads=4, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                   clip_qkv=8.0)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                         num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=32,
                         q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                         topk_method="greedy", routed_scaling_factor=1.0)),
    "deepseek_v2_qlora": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                          dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
                               n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                               first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=12, topk_method="group_limited_greedy", n_group=4,
                               topk_group=2, routed_scaling_factor=16.0,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 128, "mscale": 0.707,
                                                "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1})),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=16,
                         num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32,
                         q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=4,
                         topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                          "original_max_position_embeddings": 64, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})),
}


def hf_config(family: str, **overrides):
    import transformers

    cfg_cls, _, extra = FAMILIES[family]
    return getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})


def build_hf_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random transformers model of `family` (eval mode)."""
    import transformers

    torch.manual_seed(seed)
    _, model_cls, _ = FAMILIES[family]
    model = getattr(transformers, model_cls)(hf_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # exercise the bias: transformers inits it to 0
                buf.copy_(torch.rand_like(buf) * 0.2)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # not all ones: catches a norm applied wrongly
    return model.to(dtype)


def make_tiny_checkpoint(family: str, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                         **overrides) -> Path:
    """Save a random `family` checkpoint with save_pretrained into `path`; returns the directory."""
    path = Path(path)
    build_hf_model(family, seed=seed, dtype=dtype, **overrides).save_pretrained(path)
    return path
