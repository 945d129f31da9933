"""bf16 (and fp16) checkpoints: the same numbers as transformers (loaded with from_pretrained), bit for bit.

The engine benchmark requires identical greedy outputs in bf16, so the model mirrors transformers'
op order where rounding depends on it (router dtype, grouped-mm combine, fp32 complex rope of V2).
DeepSeek (MLA) decodes are bit-exact with `mla_decode="expanded"` (transformers' order); the default
absorbed form computes the same attention in another order (tests/models/test_mla_absorbed.py)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_serve.models import ForwardBatch, load_model
from tests.models.helpers import hf_greedy, our_greedy
from tests.models.tiny_checkpoints import FAMILIES, make_tiny_checkpoint

PROMPT = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_half_precision_prefill_and_greedy_are_bit_exact(family, dtype, tmp_path):
    """A bf16 or fp16 checkpoint, loaded in its own dtype (dtype auto) by both."""
    d = make_tiny_checkpoint(family, tmp_path, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    ours = load_model(d, mla_decode="expanded")
    assert hf.dtype == ours.dtype == dtype
    ours.allocate_kv_cache(2, 64)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0].float()
    assert torch.equal(ours(ForwardBatch.single(PROMPT, slot=1, all_logits=True)), ref)
    assert our_greedy(ours, PROMPT, 32) == hf_greedy(hf, PROMPT, 32)
