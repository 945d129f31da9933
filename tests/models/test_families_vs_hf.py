"""Every family against transformers on a tiny random checkpoint written by save_pretrained:
prefill logits within 1e-4 relative (fp32), identical expert choices per MoE layer, identical greedy
32-token continuation."""
from __future__ import annotations

import pytest
import torch

from moe_serve.models import ForwardBatch
from tests.models.helpers import RecordRoutes, hf_and_ours, hf_greedy, hf_router_ids, our_greedy, rel_err
from tests.models.tiny_checkpoints import FAMILIES

PROMPT = torch.randint(3, 128, (24,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    return request.param, *hf_and_ours(request.param, tmp_path_factory.mktemp(request.param))


def test_prefill_logits_match(pair):
    family, hf, ours = pair
    with torch.no_grad():
        ref = hf(PROMPT[None]).logits[0]  # [N, V]
    got = ours(ForwardBatch.single(PROMPT.tolist(), slot=1, all_logits=True))
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-4, family
    last = ours(ForwardBatch.single(PROMPT.tolist(), slot=2))  # [1, V]: last token only
    assert rel_err(last[0], ref[-1]) < 1e-4


def test_expert_choices_match(pair):
    family, hf, ours = pair
    ref = hf_router_ids(hf, PROMPT)
    rec = RecordRoutes()
    ours.hooks = rec
    try:
        ours(ForwardBatch.single(PROMPT.tolist(), slot=3))
    finally:
        ours.hooks = RecordRoutes.__mro__[1]()  # back to a no-op
    assert len(ref) == ours.spec.num_moe_layers == len(rec.ids) > 0
    for layer, ids in enumerate(ref):
        assert torch.equal(rec.ids[layer][0], ids), f"{family}: MoE layer {layer} chose other experts"


def test_greedy_continuation_matches(pair):
    family, hf, ours = pair
    prompt = PROMPT[:16].tolist()
    expected = hf_greedy(hf, prompt, 32)
    assert our_greedy(ours, prompt, 32, slot=0) == expected, family
    assert len(set(expected)) > 1  # a constant continuation would prove little



@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if not f.startswith("deepseek")))  # GQA families
def test_fused_qkv_follows_replaced_weights(family, tmp_path):
    """The fused q|k|v matmul is a cache over the projections: replacing one (as TP sharding does)
    must be seen by the next forward, here by scaling layer 0's k and v in both models alike."""
    hf, ours = hf_and_ours(family, tmp_path)
    attn, hf_attn = ours.layers[0].self_attn, hf.model.layers[0].self_attn
    for proj in (attn.k_proj, attn.v_proj, hf_attn.k_proj, hf_attn.v_proj):
        proj.weight = torch.nn.Parameter(proj.weight * 1.5, requires_grad=False)
    with torch.no_grad():
        ref = hf(PROMPT[None]).logits[0]
    got = ours(ForwardBatch.single(PROMPT.tolist(), slot=1, all_logits=True))
    assert rel_err(got, ref) < 1e-4, family
