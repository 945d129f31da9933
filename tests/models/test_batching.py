"""The KV cache and mixed batches: chunked prefill == one-shot prefill; decodes of several
sequences in one step (different lengths, with prefill chunks beside them) == each alone."""
from __future__ import annotations

import pytest
import torch

from moe_serve.models import ForwardBatch, load_model

GEN = torch.Generator().manual_seed(3)
PROMPTS = [torch.randint(3, 128, (n,), generator=GEN).tolist() for n in (5, 17, 11)]


@pytest.fixture(scope="module", params=["mixtral_window", "qwen3_moe", "deepseek_v3"])
def model(request, tiny_checkpoint):
    m = load_model(tiny_checkpoint(request.param))
    m.allocate_kv_cache(6, 64)
    return m


def batch(chunks: list[tuple[list[int], int, int]], all_logits=False) -> ForwardBatch:
    """chunks: (tokens, slot, context_len) per sequence, in order."""
    toks = [t for c in chunks for t in c[0]]
    pos = [c[2] + i for c in chunks for i in range(len(c[0]))]
    return ForwardBatch(token_ids=torch.tensor(toks), positions=torch.tensor(pos), slot_ids=[c[1] for c in chunks],
                        query_lens=[len(c[0]) for c in chunks], context_lens=[c[2] for c in chunks],
                        seq_ids=[c[1] for c in chunks], all_logits=all_logits)


def test_chunked_prefill_equals_one_shot(model):
    p = PROMPTS[1]
    whole = model(batch([(p, 0, 0)], all_logits=True))  # [17, V]
    parts = [model(batch([(p[a:b], 1, a)], all_logits=True)) for a, b in ((0, 6), (6, 7), (7, 17))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [(3, 4, 5), (5, 1, 3)], ids=["contiguous", "gathered"])
def test_batched_decode_equals_alone(model, slots):
    alone = []
    for i, p in enumerate(PROMPTS):  # each sequence alone (slot 0): prefill, then 3 decodes
        out = [model(batch([(p, 0, 0)]))]
        for step in range(3):
            tok = int(out[-1][0].argmax())
            out.append(model(batch([([tok], 0, len(p) + step)])))
        alone.append(torch.cat(out))  # [4, V]
    # together: one prefill step of all three, then decode steps of all three (different lengths)
    out = model(batch([(p, slots[i], 0) for i, p in enumerate(PROMPTS)]))  # [3, V]
    together = [out]
    for step in range(3):
        toks = out.argmax(-1).tolist()
        out = model(batch([([t], slots[i], len(PROMPTS[i]) + step) for i, t in enumerate(toks)]))
        together.append(out)
    together = torch.stack(together, dim=1)  # [3 seqs, 4 steps, V]
    for i in range(3):
        torch.testing.assert_close(together[i], alone[i], rtol=1e-5, atol=1e-5)


def test_mixed_prefill_chunks_and_decodes(model):
    a, b, c = PROMPTS
    ref_a = model(batch([(a, 0, 0)]))
    ref_b2 = model(batch([(b, 1, 0)], all_logits=True))
    # slot 0 decodes a's next token while slot 2 prefills b in two chunks and slot 3 prefills c
    tok = int(ref_a[0].argmax())
    alone_dec = model(batch([([tok], 0, len(a))]))
    model(batch([(a, 0, 0)]))  # rewrite slot 0 to the same state
    mixed = model(batch([(b[:9], 2, 0), ([tok], 0, len(a)), (c, 3, 0)], all_logits=True))
    torch.testing.assert_close(mixed[:9], ref_b2[:9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[9], alone_dec[0], rtol=1e-5, atol=1e-5)
    rest = model(batch([(b[9:], 2, 9)]))
    torch.testing.assert_close(rest[0], ref_b2[-1], rtol=1e-5, atol=1e-5)


def test_bad_batches_are_refused(model):
    with pytest.raises(ValueError, match="max_len"):
        model(batch([(PROMPTS[0], 0, 62)]))
    with pytest.raises(ValueError, match="slot id 9"):
        model(batch([(PROMPTS[0], 9, 0)]))
