"""DeepSeek decodes in the latent space (absorbed MLA) against the expanded form transformers computes.

The default `mla_decode="absorbed"` reorders the attention's arithmetic, so it is checked to
rounding against `mla_decode="expanded"` (itself bit-exact with transformers, test_bf16_exact.py):
every decode step's logits, mixed batches of decodes with different context lengths and a prefill
chunk, and fp32 greedy continuations equal to transformers'."""
from __future__ import annotations

import pytest
import torch

from moe_serve.models import ForwardBatch, load_model
from tests.models.helpers import hf_greedy, our_greedy, rel_err
from tests.models.tiny_checkpoints import make_tiny_checkpoint

MLA_FAMILIES = ["deepseek_v2", "deepseek_v2_qlora", "deepseek_v3"]
PROMPT = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(3)).tolist()


def pair(family, tmp_path, dtype):
    d = make_tiny_checkpoint(family, tmp_path, dtype=dtype)
    models = [load_model(d, dtype="float32" if dtype == torch.float32 else "bfloat16", mla_decode=m)
              for m in ("absorbed", "expanded")]
    for m in models:
        m.allocate_kv_cache(4, 96)
    return d, models


def forced_decode_logits(model, tokens: list[int]) -> list[torch.Tensor]:
    model(ForwardBatch.single(PROMPT, slot=0))
    return [model(ForwardBatch.single([t], slot=0, context_len=len(PROMPT) + i)).float()
            for i, t in enumerate(tokens)]  # the same forced tokens into every model: each step compared


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_absorbed_decode_steps_match_expanded_fp32(family, tmp_path):
    _, (absorbed, expanded) = pair(family, tmp_path, torch.float32)
    toks = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    for i, (a, e) in enumerate(zip(forced_decode_logits(absorbed, toks), forced_decode_logits(expanded, toks))):
        assert rel_err(a, e) < 1e-5, f"step {i}"


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_absorbed_bf16_is_as_accurate_as_expanded_bf16(family, tmp_path):
    """In bf16 both forms round differently; against the fp32 model, absorbed must be no worse."""
    d, (absorbed, expanded) = pair(family, tmp_path, torch.bfloat16)
    reference = load_model(d, dtype="float32", mla_decode="expanded")
    reference.allocate_kv_cache(4, 96)
    toks = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = forced_decode_logits(reference, toks)
    err_a = max(rel_err(a, r) for a, r in zip(forced_decode_logits(absorbed, toks), ref))
    err_e = max(rel_err(e, r) for e, r in zip(forced_decode_logits(expanded, toks), ref))
    assert err_a <= 1.5 * err_e + 1e-3, (err_a, err_e)


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_absorbed_mixed_batch_masks_each_sequence(family, tmp_path):
    """Three decodes of different lengths (masked per sequence) beside a prefill chunk in one step."""
    _, (absorbed, expanded) = pair(family, tmp_path, torch.float32)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 17, 30)]
    for m in (absorbed, expanded):
        for slot, p in enumerate(prompts):
            m(ForwardBatch.single(p, slot=slot))
    chunk = torch.randint(3, 128, (6,), generator=g).tolist()
    batch = ForwardBatch(token_ids=torch.tensor([9, 10, 11, *chunk]),
               positions=torch.tensor([5, 17, 30, *range(6)]), slot_ids=[0, 1, 2, 3],
               query_lens=[1, 1, 1, 6], context_lens=[5, 17, 30, 0], seq_ids=[0, 1, 2, 3])
    a, e = absorbed(batch), expanded(batch)
    assert a.shape == (4, absorbed.spec.vocab_size)
    assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_absorbed_greedy_equals_transformers_fp32(family, tmp_path):
    from transformers import AutoModelForCausalLM

    d, (absorbed, _) = pair(family, tmp_path, torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert our_greedy(absorbed, PROMPT, 32) == hf_greedy(hf, PROMPT, 32)


def test_unknown_mla_decode_mode_is_refused(tmp_path):
    d = make_tiny_checkpoint("deepseek_v3", tmp_path, dtype=torch.float32)
    with pytest.raises(ValueError, match="mla_decode must be one of absorbed, expanded"):
        load_model(d, mla_decode="latent")
