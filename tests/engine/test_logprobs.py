"""SamplingParams.logprobs: the raw log_softmax of the model's logits at every output step, checked
against a separate forward pass of transformers' own model over the same prefix."""
import pytest
import torch

from moe_serve import LLM, SamplingParams


def reference_logits(model_dir, prompt_ids, output_ids) -> torch.Tensor:
    """[T, V] transformers' next-token logits after prompt + output[:t], for each t (one forward pass)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt_ids) + list(output_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # [P + T, V]; row i predicts token i + 1
    P = len(prompt_ids)
    return logits[P - 1:P - 1 + len(output_ids)]


def reference_logprobs(model_dir, prompt_ids, output_ids) -> torch.Tensor:
    """[T, V] log_softmax of `reference_logits`."""
    return reference_logits(model_dir, prompt_ids, output_ids).log_softmax(-1)


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_logprobs_equal_log_softmax_of_the_models_logits(tiny_dir, temperature):
    k = 5
    params = SamplingParams(temperature=temperature, top_k=40, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True,
                            logprobs=k)
    with LLM(model=str(tiny_dir), max_num_seqs=2) as llm:
        outs = llm.generate(["The quick brown fox", "Once upon a time"], [params, SamplingParams(max_tokens=8)])
    out = outs[0]
    assert outs[1].logprobs is None  # a request that did not ask gets none, also beside one that did
    assert len(out.logprobs) == len(out.token_ids) == 8
    ref = reference_logprobs(tiny_dir, out.prompt_token_ids, out.token_ids)
    for t, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(ref[t, tok].item(), abs=1e-4)  # the sampled token's, raw
        assert lp.rank == int((ref[t] > ref[t, tok] + 1e-4).sum()) + 1
        top_v, top_i = ref[t].topk(k)
        assert [i for i, _ in lp.top] == top_i.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-4)
        if temperature == 0:
            assert lp.rank == 1 and lp.top[0][0] == tok


def test_logprobs_zero_gives_the_sampled_token_only_and_limits_are_named(tiny_dir):
    with LLM(model=str(tiny_dir), max_num_seqs=1) as llm:
        out = llm.generate("Once upon", SamplingParams(temperature=0, max_tokens=3, logprobs=0, ignore_eos=True))[0]
    assert [lp.top for lp in out.logprobs] == [(), (), ()]
    assert all(lp.logprob <= 0 and lp.rank == 1 for lp in out.logprobs)
    for bad in (-1, 21, 2.0, True):
        with pytest.raises(ValueError, match=r"SamplingParams.logprobs must be an integer in \[0, 20\]"):
            SamplingParams(logprobs=bad)
