"""logit_bias (OpenAI's) and min_tokens (vLLM's) in SamplingParams: validated naming the field, applied to
what is sampled (not to the reported logprobs), greedy and seeded, on the tiny fp32 checkpoint."""
import numpy as np
import pytest

from moe_serve import LLM, SamplingParams

PROMPT = "The quick brown fox"


def greedy(**kw):
    return SamplingParams(temperature=0, max_tokens=kw.pop("max_tokens", 6), **kw)


@pytest.mark.parametrize("bad, field", [
    (dict(logit_bias={5: 100.5}), "logit_bias"), (dict(logit_bias={5: float("nan")}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(logit_bias={True: 1.0}), "logit_bias"), (dict(logit_bias=[5]), "logit_bias"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=1.5), "min_tokens"),
    (dict(min_tokens=17, max_tokens=16), "min_tokens")])
def test_bad_values_are_refused_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**bad)


def test_numpy_keys_and_values_are_taken():
    p = SamplingParams(logit_bias={np.int64(3): np.float32(-2.5)}, min_tokens=np.int64(2))
    assert p.logit_bias == {3: -2.5} and type(next(iter(p.logit_bias))) is int and p.min_tokens == 2
    assert p.extra_work and not SamplingParams().extra_work and SamplingParams(logit_bias={}).logit_bias is None


@pytest.fixture(scope="module")
def llm(tiny_dir):
    with LLM(model=str(tiny_dir), max_num_seqs=4) as llm:
        yield llm


def test_logit_bias_moves_the_sampled_tokens_not_the_logprobs(llm):
    plain = llm.generate(PROMPT, greedy(ignore_eos=True, logprobs=1))[0]
    first = plain.token_ids[0]
    forced = [t for t in range(5, 300) if t not in plain.token_ids][0]
    outs = llm.generate([PROMPT] * 3, [greedy(ignore_eos=True, logit_bias={forced: 100}),
                                        SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True,
                                                       logit_bias={forced: 100.0}),
                                        greedy(ignore_eos=True, logprobs=1, logit_bias={first: -100})])
    assert outs[0].token_ids == [forced] * 6 and outs[1].token_ids == [forced] * 6
    banned = outs[2]
    assert banned.token_ids[0] != first
    # raw logprobs (vLLM's): the bias is not in them, so the top token is still the unbiased greedy one
    assert banned.logprobs[0].top[0][0] == first and banned.logprobs[0].rank > 1


def test_an_out_of_vocabulary_bias_is_refused(llm):
    with pytest.raises(ValueError, match=r"logit_bias keys must be < vocab size 384"):
        llm.generate(PROMPT, greedy(logit_bias={384: 1.0}))


def test_min_tokens_holds_back_eos_stop_tokens_and_stop_strings(llm):
    (eos,) = llm.engine.eos_token_ids
    to_eos = {eos: 100.0}  # end-of-sequence is the greedy token at every step
    early, held = llm.generate([PROMPT] * 2, [greedy(logit_bias=to_eos), greedy(logit_bias=to_eos, min_tokens=4)])
    assert early.token_ids == [eos] and early.finish_reason == "stop"
    assert len(held.token_ids) == 5 and eos not in held.token_ids[:4] and held.token_ids[4] == eos
    assert held.finish_reason == "stop"
    plain = llm.generate(PROMPT, greedy(ignore_eos=True, max_tokens=8))[0]
    stop_tok = plain.token_ids[0]
    by_token = llm.generate(PROMPT, greedy(ignore_eos=True, max_tokens=8, stop_token_ids=[stop_tok], min_tokens=3))[0]
    assert stop_tok not in by_token.token_ids[:3] and len(by_token.token_ids) >= 3
    stop_text = plain.text[:2].strip() or plain.text[:3]
    no_min, with_min = llm.generate([PROMPT] * 2, [greedy(ignore_eos=True, max_tokens=8, stop=[stop_text]),
                                                   greedy(ignore_eos=True, max_tokens=8, stop=[stop_text], min_tokens=3)])
    assert len(no_min.token_ids) < 3 and no_min.finish_reason == "stop"
    assert len(with_min.token_ids) >= 3 and with_min.token_ids[:len(no_min.token_ids)] == no_min.token_ids
