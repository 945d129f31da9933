"""Rotary variants real checkpoints use, on every family, against transformers past the original context:
tiny random checkpoints (save_pretrained) whose `original_max_position_embeddings` (16) is shorter
than the prompt (40 tokens) and the greedy continuations, so positions beyond it are scaled as the rule
says. Same checks as test_config_variants_vs_hf.py: logits within 1e-4 relative (fp32), identical
expert choices per MoE layer, identical greedy continuation. test_rope.py checks the frequencies
alone, on Llama's config; these check each family's use of them (DeepSeek's pairs and complex
rotation, its mscale folded into the softmax scale, old-style config.json spellings)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_serve.models import load_model
from tests.models.helpers import assert_matches_transformers, hf_and_ours, model_logits, rel_err
from tests.models.tiny_checkpoints import make_tiny_checkpoint

PROMPT = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(11)).tolist()
OLD_MAX = 16  # original_max_position_embeddings: the prompt and continuations run past it


def yarn(factor: float, **extra) -> dict:
    # max_position_embeddings = factor x original, as published configs have it (else transformers warns)
    return dict(max_position_embeddings=int(factor * OLD_MAX), rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "original_max_position_embeddings": OLD_MAX,
        **extra})


def rope(kind: str, theta: float, **extra) -> dict:
    return dict(rope_parameters={"rope_type": kind, "rope_theta": theta, **extra})


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=OLD_MAX)
VARIANTS = {  # name: (family in tiny_checkpoints, config changes)
    "mixtral_linear": ("mixtral", rope("linear", 1e6, factor=4.0)),
    "mixtral_llama3": ("mixtral", rope("llama3", 5e5, **LLAMA3)),
    "mixtral_theta_1e8": ("mixtral", rope("default", 1e8)),  # near-constant low frequencies
    "mixtral_theta_3": ("mixtral", rope("default", 3.0)),  # every pair turning fast
    "qwen2_yarn_attention_factor_betas": ("qwen2_moe", yarn(4.0, attention_factor=0.8, beta_fast=16, beta_slow=2)),
    "qwen3_yarn_untruncated": ("qwen3_moe", yarn(4.0, truncate=False)),
    "qwen3_linear_theta_1e6": ("qwen3_moe", rope("linear", 1e6, factor=2.0)),
    "olmoe_yarn": ("olmoe", yarn(8.0)),
    "olmoe_llama3_tied": ("olmoe", dict(rope("llama3", 5e5, **LLAMA3), tie_word_embeddings=True)),
    # DeepSeek: mscale scales cos/sin, mscale_all_dim the softmax (squared); published configs set both
    # equal (they cancel in cos/sin), these do not
    "v3_yarn_mscale_differs": ("deepseek_v3", yarn(40.0, mscale=1.0, mscale_all_dim=0.8)),
    "v3_yarn_mscale_only": ("deepseek_v3", yarn(40.0, mscale=0.707)),
    "v3_llama3_three_dense_no_q_lora": ("deepseek_v3", dict(rope("llama3", 5e5, **LLAMA3), first_k_dense_replace=3,
                                                             num_hidden_layers=5, q_lora_rank=None)),
    "v2_yarn_mscale_differs": ("deepseek_v2", yarn(40.0, mscale=0.707, mscale_all_dim=1.0)),
    "v2_linear_theta_1e7": ("deepseek_v2", rope("linear", 1e7, factor=4.0)),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rope_variant_matches_transformers_past_the_original_context(name, tmp_path):
    family, overrides = VARIANTS[name]
    assert_matches_transformers(*hf_and_ours(family, tmp_path, **overrides), PROMPT, name)


OLD_STYLE = {  # config.json as older transformers wrote it: rope_scaling (with "type") and a top-level rope_theta
    "qwen3_moe": dict(rope_theta=1e6, rope_scaling=None),
    "qwen2_moe": dict(rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": OLD_MAX}),
    "deepseek_v3": dict(rope_theta=10000.0, rope_scaling={  # DeepSeek-V3's own, but for the context lengths
        "type": "yarn", "factor": 40.0, "original_max_position_embeddings": OLD_MAX, "mscale": 1.0,
        "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}),
    "mixtral": dict(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}),
}


@pytest.mark.parametrize("family", sorted(OLD_STYLE))
def test_old_style_rope_fields_read_as_transformers_reads_them(family, tmp_path):
    """A config.json without rope_parameters (Hub checkpoints saved before transformers 5): both read
    the edited file; transformers' logits must change with it (the edit is not ignored by both)."""
    d = make_tiny_checkpoint(family, tmp_path)
    before = AutoModelForCausalLM.from_pretrained(d).eval()
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(OLD_STYLE[family], max_position_embeddings=640)
    (d / "config.json").write_text(json.dumps(cfg))
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    ours = load_model(d)
    ours.allocate_kv_cache(1, 64)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
        assert rel_err(before(torch.tensor([PROMPT])).logits[0], ref) > 1e-3
    assert rel_err(model_logits(ours, PROMPT, slot=0), ref) < 1e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_rope_scaling_added_to_a_config_with_rope_parameters_is_used(family, tmp_path):
    """Qwen's model cards say to enable YaRN by adding a rope_scaling object to config.json; a checkpoint saved
    by transformers 5 already has rope_parameters. transformers then uses rope_scaling (its theta, else the
    top-level rope_theta, else the family's default: not rope_parameters' theta); moe-serve kept
    rope_parameters and computed the unscaled model (logits ~50% off past the original context)."""
    d = make_tiny_checkpoint(family, tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(max_position_embeddings=4 * OLD_MAX, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": OLD_MAX})
    (d / "config.json").write_text(json.dumps(cfg))
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.config.rope_parameters["rope_theta"] == 1e4
    ours = load_model(d)
    ours.allocate_kv_cache(1, 64)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    assert rel_err(model_logits(ours, PROMPT, slot=0), ref) < 1e-4


def test_yarn_context_is_original_times_factor(tmp_path):
    """Qwen3's cards enable YaRN by adding rope_scaling (factor 4, original 32768) and keep
    max_position_embeddings 40960: the engine refused max_model_len past 40960, so the extended context
    could not be served (vLLM derives original x factor). A prompt past max_position_embeddings now runs
    and continues as transformers does."""
    from moe_serve.config import EngineConfig
    from moe_serve.engine import LLMEngine, SamplingParams
    from tests.engine.helpers import run
    from tests.models.helpers import hf_greedy

    d = make_tiny_checkpoint("qwen3_moe", tmp_path, max_position_embeddings=20, **{k: v for k, v in yarn(4.0).items()
                                                                                  if k == "rope_parameters"})
    engine = LLMEngine(EngineConfig.from_flat(model=str(d), max_model_len=4 * OLD_MAX, dtype="float32"))
    prompt = (PROMPT * 2)[:50]  # past max_position_embeddings (20)
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), "long")
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    assert run(engine)["long"].token_ids == hf_greedy(hf, prompt, 8)
    assert engine.max_model_len == load_model(d).spec.context_length == 4 * OLD_MAX
