"""presence/frequency (OpenAI) and repetition (vLLM) penalties: the batched implementation against the
formulas written out per token in plain PyTorch, and greedy decoding under penalties against
transformers' logits with those formulas applied step by step."""
import math

import pytest
import torch

from moe_serve import LLM, SamplingParams
from moe_serve.engine.penalties import apply_penalties
from tests.engine.test_logprobs import reference_logits


def reference_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    """One row [V], token by token, as vLLM (and OpenAI's docs) write the formulas."""
    x = logits.clone().float()
    for t in range(x.shape[0]):
        c = output.count(t)
        if t in prompt or c > 0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * c
        x[t] -= p.presence_penalty * (1.0 if c > 0 else 0.0)
    return x


class Seq:  # the three fields apply_penalties reads, as an engine Sequence has them
    def __init__(self, prompt_ids, output_ids, params):
        self.prompt_ids, self.output_ids, self.params = prompt_ids, output_ids, params


def test_batched_penalties_match_the_formulas():
    g = torch.Generator().manual_seed(0)
    V = 40
    logits = torch.randn(4, V, generator=g) * 3
    cases = [SamplingParams(presence_penalty=1.5), SamplingParams(frequency_penalty=-0.7, repetition_penalty=1.8),
             SamplingParams(repetition_penalty=0.6, presence_penalty=-2.0, frequency_penalty=2.0)]
    seqs = [Seq([1, 2, 3, 3], [3, 5, 5, 5, 39], cases[0]), Seq([7, 8], [8, 8, 0], cases[1]),
            Seq([10, 11, 12], [], cases[2])]
    rows = [0, 2, 3]  # row 1 asks for nothing and must come back unchanged
    out = apply_penalties(logits, rows, seqs)
    assert torch.equal(out[1], logits[1])
    for r, s in zip(rows, seqs):
        assert torch.allclose(out[r], reference_penalties(logits[r], s.prompt_ids, s.output_ids, s.params), atol=1e-6)
    assert not torch.equal(out, logits)  # the input is left alone
    bf16 = apply_penalties(logits.bfloat16(), rows, seqs)
    assert bf16.dtype == torch.float32


@pytest.mark.parametrize("kw", [dict(presence_penalty=1.0, frequency_penalty=0.5), dict(repetition_penalty=1.5),
                                dict(frequency_penalty=2.0, presence_penalty=-0.5)])
def test_greedy_under_penalties_follows_the_formulas_on_the_models_logits(tiny_dir, kw):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, **kw)
    with LLM(model=str(tiny_dir), max_num_seqs=2) as llm:
        plain, out = llm.generate(["Once upon a time"] * 2, [SamplingParams(temperature=0, max_tokens=8,
                                                                             ignore_eos=True), params])
    assert out.token_ids != plain.token_ids  # the penalty changed something (else this test proves nothing)
    prompt, ids = list(out.prompt_token_ids), []
    for _ in range(8):
        raw = reference_logits(tiny_dir, prompt, ids + [0])[-1]
        ids.append(int(reference_penalties(raw, prompt, ids, params).argmax()))
    assert out.token_ids == ids


@pytest.mark.parametrize("kw, field", [(dict(presence_penalty=2.5), "presence_penalty"),
                                       (dict(frequency_penalty=-2.01), "frequency_penalty"),
                                       (dict(frequency_penalty=math.nan), "frequency_penalty"),
                                       (dict(repetition_penalty=0.0), "repetition_penalty"),
                                       (dict(repetition_penalty=math.inf), "repetition_penalty"),
                                       (dict(presence_penalty="1"), "presence_penalty")])
def test_penalty_limits_are_named(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**kw)
