"""Config variants real checkpoints use, beyond the one config per family of test_families_vs_hf.py,
each against transformers on a tiny random checkpoint written by save_pretrained: prefill logits
within 1e-4 relative (fp32), identical expert choices per MoE layer, identical greedy continuation.
A variant moe-serve cannot follow is refused at load with an error naming the field."""
from __future__ import annotations

import pytest
import torch

from transformers import AutoModelForCausalLM

from moe_serve.models import ForwardBatch, load_model
from moe_serve.models.spec import UnsupportedModelError
from tests.models.tiny_checkpoints import make_tiny_checkpoint

PROMPT = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(7)).tolist()
WINDOW = 8


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
    a few bf16 ulps off from the first steps past the window, then another greedy token.)"""
    d = make_tiny_checkpoint(family, tmp_path, dtype=torch.bfloat16, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    ours = load_model(d)
    ours.allocate_kv_cache(1, 64)
    prompt, ctx = PROMPT[:16], 16
    with torch.no_grad():
        ref = hf(torch.tensor([prompt]), use_cache=True)
        got = ours(ForwardBatch.single(prompt, slot=0))
        for step in range(24):
            assert torch.equal(got[0], ref.logits[0, -1].float()), f"decode step {step} (context {ctx})"
            tok = int(ref.logits[0, -1].argmax())
            ref = hf(torch.tensor([[tok]]), past_key_values=ref.past_key_values, use_cache=True)
            got = ours(ForwardBatch.single([tok], slot=0, context_len=ctx))
            ctx += 1
