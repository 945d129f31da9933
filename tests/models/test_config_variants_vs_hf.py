"""Config variants real checkpoints use, beyond the one config per family of test_families_vs_hf.py,
each against transformers on a tiny random checkpoint written by save_pretrained: prefill logits
within 1e-4 relative (fp32), identical expert choices per MoE layer, identical greedy continuation.
A variant moe-serve cannot follow is refused at load with an error naming the field."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moe_serve.models import ForwardBatch, load_model
from moe_serve.models.spec import UnsupportedModelError
from tests.models.helpers import assert_matches_transformers, hf_and_ours, hf_greedy, rel_err
from tests.models.tiny_checkpoints import make_tiny_checkpoint

PROMPT = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(7)).tolist()
WINDOW = 8  # shorter than PROMPT and the continuations: decodes run past it
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
VARIANTS = {  # name: (family in tiny_checkpoints, config changes)
    # Moonlight / Kimi style: one expert group, no renormalization, no scaling
    "v3_one_group_unnormalized": ("deepseek_v3", dict(n_group=1, topk_group=1, norm_topk_prob=False,
                                                      routed_scaling_factor=1.0)),
    # V2-Lite style attention on V3: no q LoRA, two dense layers first, plain rope, tied embeddings
    "v3_no_q_lora_two_dense": ("deepseek_v3", dict(q_lora_rank=None, first_k_dense_replace=2, num_hidden_layers=4,
                                                   rope_parameters=DEFAULT_ROPE, tie_word_embeddings=True)),
    "v3_halves_rope_bias_eps": ("deepseek_v3", dict(rope_interleave=False, attention_bias=True, rms_norm_eps=0.1,
                                                    n_group=8, topk_group=3)),
    # transformers' V2 ignores scoring_func and norm_topk_prob (softmax, never renormalized)
    "v2_greedy_all_moe": ("deepseek_v2", dict(first_k_dense_replace=0, routed_scaling_factor=2.0,
                                              scoring_func="sigmoid", norm_topk_prob=True, attention_bias=True)),
    "qwen2_sparse_step_normalized": ("qwen2_moe", dict(decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=4,
                                                       norm_topk_prob=True, tie_word_embeddings=True)),
    "qwen2_window": ("qwen2_moe", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                                       qkv_bias=False, shared_expert_intermediate_size=0)),
    "qwen3_unnormalized_sparse": ("qwen3_moe", dict(norm_topk_prob=False, decoder_sparse_step=2, num_hidden_layers=6,
                                                    mlp_only_layers=[3], attention_bias=True)),  # MoE: 1, 5
    "qwen3_window": ("qwen3_moe", dict(use_sliding_window=True, sliding_window=WINDOW, rope_parameters=DEFAULT_ROPE,
                                       tie_word_embeddings=True)),
    "olmoe_normalized_clipped": ("olmoe", dict(norm_topk_prob=True, clip_qkv=0.3, attention_bias=True,
                                               num_key_value_heads=2, rms_norm_eps=0.1)),
    # training-only jitter (inference ignores it), head_dim != hidden / heads, one expert a token
    "mixtral_jitter_head_dim": ("mixtral", dict(router_jitter_noise=0.1, head_dim=8, num_experts_per_tok=1,
                                                rms_norm_eps=0.5)),
}


def edit_config(src, dst, drop=(), **changes):
    """A copy of checkpoint dir `src` at `dst` whose config.json lacks the fields `drop` and has `changes`."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for name in drop:
        cfg.pop(name, None)
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_transformers(name, tmp_path):
    family, overrides = VARIANTS[name]
    assert_matches_transformers(*hf_and_ours(family, tmp_path, **overrides), PROMPT, name)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_moe_layer_freq_above_one_is_refused_naming_the_field(family, tmp_path):
    """transformers ignores moe_layer_freq (every layer from first_k_dense_replace on is MoE) while
    DeepSeek's reference code keeps only every freq-th one: the two read such a config differently,
    and moe-serve followed the reference, then failed on a tensor name when given transformers' layout."""
    d = make_tiny_checkpoint(family, tmp_path, num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2)
    with pytest.raises(UnsupportedModelError, match=r"'moe_layer_freq' \(2\)"):
        load_model(d)
    load_model(make_tiny_checkpoint(family, tmp_path / "one", moe_layer_freq=1))  # the published value loads


@pytest.mark.parametrize("family,overrides", [("mixtral_window", {}),
                                              ("qwen3_moe", dict(use_sliding_window=True, sliding_window=WINDOW))])
def test_bf16_sliding_window_decode_is_bit_exact(family, overrides, tmp_path):
    """Past the window, transformers' decode attends over exactly the last `window` keys (its sliding
    cache keeps no more); each decode's logits must equal its bits, the next token fed to both alike.
    (Attending over the whole context with the older keys masked out is the same sum in another order:
    a few bf16 ulps off from the first steps past the window, then another greedy token.)
    On some CPUs (AMD EPYC) a bf16 kernel rounds a step's residual one ulp apart from transformers' for
    equal inputs: such a step may differ by one ulp, but the greedy token never, and most steps (3 in 4)
    stay bit-exact; attending with the older keys masked fails this within the first steps past the
    window (checked by swapping it in: step 2 for mixtral, 5 for qwen3)."""
    d = make_tiny_checkpoint(family, tmp_path, dtype=torch.bfloat16, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    ours = load_model(d)
    ours.allocate_kv_cache(1, 64)
    prompt, ctx = PROMPT[:16], 16
    with torch.no_grad():
        ref = hf(torch.tensor([prompt]), use_cache=True)
        got = ours(ForwardBatch.single(prompt, slot=0))
        exact = 0
        for n in range(24):
            want = ref.logits[0, -1].float()
            ulp = 2.0 ** (torch.floor(torch.log2(want.abs().max())) - 7)  # bf16: 8 significant bits
            assert int(got[0].argmax()) == int(want.argmax()), f"decode step {n} (context {ctx})"
            assert (got[0] - want).abs().max() <= ulp, f"decode step {n} (context {ctx})"
            exact += torch.equal(got[0], want)
            tok = int(ref.logits[0, -1].argmax())
            ref = hf(torch.tensor([[tok]]), past_key_values=ref.past_key_values, use_cache=True)
            got = ours(ForwardBatch.single([tok], slot=0, context_len=ctx))
            ctx += 1
        assert exact >= 18, f"bit-exact at {exact} of 24 decode steps"


def step(tokens: list[list[int]], context: list[int]) -> ForwardBatch:
    """One padding-free step of sequence i (slot i): tokens[i] at positions context[i].. onward."""
    return ForwardBatch(token_ids=torch.tensor([t for ts in tokens for t in ts]),
                        positions=torch.tensor([c + j for ts, c in zip(tokens, context) for j in range(len(ts))]),
                        slot_ids=list(range(len(tokens))), query_lens=[len(ts) for ts in tokens],
                        context_lens=list(context), seq_ids=list(range(len(tokens))))


@pytest.mark.parametrize("name", ["mixtral_window", "qwen2_window", "olmoe", "deepseek_v3"])
def test_two_lengths_in_one_batch_match_each_alone_in_transformers(name, tmp_path):
    """Two prompts of different lengths (one shorter, one longer than the window) prefilled in one
    padding-free step, then decoded together: each sequence's logits and greedy tokens are those of
    transformers run on it alone."""
    family, overrides = VARIANTS.get(name, (name, {}))
    hf, ours = hf_and_ours(family, tmp_path, **overrides)
    prompts = [PROMPT[:5], PROMPT[9:36]]
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    with torch.no_grad():
        ref_last = [hf(torch.tensor([p])).logits[0, -1] for p in prompts]  # [V] each
    context, got = [0, 0], [[], []]
    logits = ours(step(prompts, context))  # [2, V]: each sequence's last token
    for i in range(2):
        assert rel_err(logits[i], ref_last[i]) < 1e-4, f"{name}: prefill of sequence {i}"
    context = [len(p) for p in prompts]
    for _ in range(12):
        toks = logits.argmax(-1).tolist()
        for i in range(2):
            got[i].append(toks[i])
        logits = ours(step([[t] for t in toks], context))
        context = [c + 1 for c in context]
    assert got == expected


ABSENT = [  # (family, values equal to transformers' config defaults, fields then left out of config.json)
    ("deepseek_v3", dict(n_shared_experts=1, n_group=8, topk_group=4, first_k_dense_replace=3, num_hidden_layers=4,
                         q_lora_rank=1536), ("n_shared_experts", "n_group", "topk_group", "first_k_dense_replace",
                                             "q_lora_rank")),
    ("deepseek_v2", dict(n_shared_experts=2, q_lora_rank=1536), ("n_shared_experts", "q_lora_rank")),
    ("qwen2_moe", dict(shared_expert_intermediate_size=5632), ("shared_expert_intermediate_size",)),
]


@pytest.mark.parametrize("family,values,absent", ABSENT, ids=[a[0] for a in ABSENT])
def test_absent_fields_mean_transformers_defaults(family, values, absent, tmp_path):
    """A config.json without these fields is read by transformers with its config class's defaults.
    Before, moe-serve read 0 shared experts (the checkpoint's shared-expert tensors went unused: the
    logits were off by ~50%), one expert group for V3 (other experts chosen) and no q LoRA."""
    hf, _ = hf_and_ours(family, tmp_path / "full", **values)
    d = edit_config(tmp_path / "full", tmp_path / "absent", drop=absent)
    reread = AutoModelForCausalLM.from_pretrained(d).eval()  # transformers itself, on the edited config
    ours = load_model(d)
    ours.allocate_kv_cache(1, 64)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
        assert torch.equal(reread(torch.tensor([PROMPT])).logits[0], ref)
    assert rel_err(ours(ForwardBatch.single(PROMPT, slot=0, all_logits=True)), ref) < 1e-4


def test_qwen_sliding_window_absent_means_4096(tmp_path):
    for family in ("qwen2_moe", "qwen3_moe"):
        d = edit_config(make_tiny_checkpoint(family, tmp_path / family), tmp_path / f"{family}-edited",
                        use_sliding_window=True, max_window_layers=28, drop=("sliding_window", "layer_types"))
        assert AutoModelForCausalLM.from_pretrained(d).config.sliding_window == 4096
        assert load_model(d).spec.window(0) == 4096, family


def test_tied_config_with_a_different_saved_lm_head_uses_it(tmp_path):
    """tie_word_embeddings true, yet the checkpoint holds an lm_head.weight of other values: transformers
    (5) then does not tie and uses the saved head (it warns); moe-serve used the embeddings (~100% off)."""
    d = make_tiny_checkpoint("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    tensors = load_file(d / "model.safetensors")
    assert "lm_head.weight" not in tensors  # save_pretrained writes a tied head once
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    ours = load_model(d)
    ours.allocate_kv_cache(1, 64)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    assert rel_err(ours(ForwardBatch.single(PROMPT, slot=0, all_logits=True)), ref) < 1e-4


def test_deepseek_v2_mlp_bias_is_refused_naming_the_field(tmp_path):
    """transformers' V2 gives its dense MLPs and shared experts biases when mlp_bias is true; moe-serve
    has none and loaded such a checkpoint without its biases (no published V2 sets it)."""
    d = make_tiny_checkpoint("deepseek_v2", tmp_path, mlp_bias=True)
    with pytest.raises(UnsupportedModelError, match="'mlp_bias'"):
        load_model(d)


@pytest.mark.parametrize("family,groups", [("deepseek_v2_qlora", dict(n_group=4, topk_group=1, num_experts_per_tok=3)),
                                           ("deepseek_v3", dict(n_group=8, topk_group=1, num_experts_per_tok=4))])
def test_more_experts_a_token_than_its_groups_hold_is_refused(family, groups, tmp_path):
    """top-k over topk_group groups of E / n_group experts, with k larger than that: a token takes experts
    of groups routing excluded (score masked to 0 or -inf), which ones decided by ties. moe-serve gave
    V2's the unmasked score as weight where transformers gives 0 (logits ~70% off)."""
    d = make_tiny_checkpoint(family, tmp_path, **groups)
    with pytest.raises(ValueError, match=r"'num_experts_per_tok' \(\d\) must be <= topk_group"):
        load_model(d)


def test_v2_greedy_routing_ignores_expert_groups(tmp_path):
    """transformers' V2 reads n_group/topk_group only for group_limited_greedy; moe-serve refused a greedy
    config whose groups did not divide the experts (or topk_group > n_group), which transformers runs."""
    assert_matches_transformers(*hf_and_ours("deepseek_v2", tmp_path, n_group=3, topk_group=5), PROMPT, "v2_greedy")


@pytest.mark.parametrize("groups,message", [
    (dict(n_group=3), r"config.json field 'n_routed_experts' \(8\) must be a multiple of 'n_group' \(3\)"),
    (dict(n_group=2, topk_group=3), r"config.json field 'topk_group' \(3\) must be in 1..n_group \(2\)")])
def test_bad_expert_groups_are_refused_naming_the_fields(groups, message, tmp_path):
    d = make_tiny_checkpoint("deepseek_v2_qlora", tmp_path, **groups)
    with pytest.raises(ValueError, match=message):
        load_model(d)
