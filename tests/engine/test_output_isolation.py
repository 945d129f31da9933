"""What a streamed RequestOutput hands out is the consumer's own: changing its lists must not change
the request the engine is still decoding (AsyncEngine delivers outputs to another thread while the
engine keeps stepping the same request)."""
from moe_serve.config import EngineConfig
from moe_serve.engine import LLMEngine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3)
PROMPT = "The quick brown fox"


def _stream(eng, rid: str, meddle) -> list[int]:
    """Step `rid` to the end, calling meddle(out) on every streamed output; its final token ids."""
    eng.add_request(PROMPT, GREEDY, rid)
    while eng.has_unfinished():
        for out in eng.step():
            ids = list(out.outputs[0].token_ids)
            meddle(out)
            if out.finished:
                return ids


def _scribble(out) -> None:
    out.prompt_token_ids.append(0)  # e.g. a consumer building the next prompt in place
    out.prompt_token_ids[0] = 1
    out.outputs[0].token_ids.clear()
    out.outputs[0].delta_token_ids.append(0)


def test_a_consumer_changing_an_output_leaves_the_request_alone(tiny_dir):
    eng = LLMEngine(EngineConfig.from_flat(model=str(tiny_dir)))
    want = _stream(eng, "clean", lambda out: None)
    assert len(want) == 10
    assert _stream(eng, "scribbled", _scribble) == want
    # n = 2: completion 0's output scribbled on; both completions still decode the real prompt
    eng.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, n=2,
                                           repetition_penalty=1.3), "n2")
    final = {}
    while eng.has_unfinished():
        for out in eng.step():
            final[out.outputs[0].index] = list(out.outputs[0].token_ids)
            if out.outputs[0].index == 0:
                _scribble(out)
    assert final == {0: want, 1: want}


def test_outputs_show_the_prompt_they_were_given(tiny_dir):
    eng = LLMEngine(EngineConfig.from_flat(model=str(tiny_dir)))
    prompt = eng.tokenizer.encode(PROMPT)
    eng.add_request(list(prompt), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, n=2), "r")
    outs = [out for _ in range(8) for out in eng.step()]
    assert len(outs) == 6 and all(out.prompt_token_ids == prompt for out in outs)
    assert len({id(out.prompt_token_ids) for out in outs}) == 1  # one copy per request, not one per step


def test_an_outputs_metrics_are_a_snapshot_of_its_own(tiny_dir):
    # RequestOutput.metrics (and each completion's) was the engine's live RequestMetrics: an early output's
    # timings kept changing as the request went on, and a consumer writing to them changed the engine's
    eng = LLMEngine(EngineConfig.from_flat(model=str(tiny_dir)))
    eng.add_request(PROMPT, GREEDY, "m")
    outs, arrivals = [], []
    while eng.has_unfinished():
        for out in eng.step():
            arrivals.append(out.metrics.arrival_time)  # the engine's value, before this consumer's scribble
            outs.append((out, out.metrics.num_output_tokens, out.outputs[0].metrics.num_output_tokens))
            out.metrics.arrival_time = out.outputs[0].metrics.arrival_time = -1e9
    assert [n for _, n, _ in outs] == [n for _, _, n in outs] == list(range(1, 11))
    assert [o.metrics.num_output_tokens for o, _, _ in outs] == list(range(1, 11))  # not all 10 by now
    assert [o.outputs[0].metrics.num_output_tokens for o, _, _ in outs] == list(range(1, 11))
    assert len(set(arrivals)) == 1 and arrivals[0] > 0  # the scribbles never reached the engine
    assert outs[-1][0].metrics.time_to_first_token > 0


def test_cumulative_lists_are_each_outputs_own_and_read_as_they_were(tiny_dir):
    # outputs copy token_ids / logprobs when first read (not every step): an output read only after the
    # request ended shows the tokens of its own step, and a consumer's changes, also to a TokenLogprob
    # (shared by every output of the stream), reach no other output
    import dataclasses

    import pytest

    eng = LLMEngine(EngineConfig.from_flat(model=str(tiny_dir)))
    eng.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2), "lp")
    outs = [out for _ in range(10) for out in eng.step()]
    assert len(outs) == 6 and outs[-1].finished
    final_ids, final_lps = list(outs[-1].token_ids), list(outs[-1].logprobs)
    for k, out in enumerate(outs):  # read now, after the request finished
        assert out.token_ids == final_ids[:k + 1] and out.logprobs == final_lps[:k + 1]
        assert out.delta_token_ids == final_ids[k:k + 1] and out.delta_logprobs == final_lps[k:k + 1]
    first = outs[0].outputs[0]
    first.token_ids.append(7)
    first.logprobs.clear()
    with pytest.raises(dataclasses.FrozenInstanceError):
        outs[1].logprobs[0].logprob = 0.0
    assert outs[1].token_ids == final_ids[:2] and outs[1].logprobs == final_lps[:2]
    assert all(lp.logprob < 0 for lp in outs[-1].logprobs)
    assert outs[-1].outputs[0].cumulative_logprob == pytest.approx(sum(lp.logprob for lp in final_lps))


def test_outputs_are_dataclasses_as_in_vllm(tiny_dir):
    # 7ab8f02 made CompletionOutput a plain class (for its copied-on-read lists): dataclasses.asdict of a
    # RequestOutput then left the completions as objects, and json.dumps of it failed
    import dataclasses
    import json

    eng = LLMEngine(EngineConfig.from_flat(model=str(tiny_dir)))
    eng.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=1), "d")
    outs = [out for _ in range(6) for out in eng.step()]
    as_dict = dataclasses.asdict(outs[1])
    assert as_dict["outputs"][0]["token_ids"] == outs[-1].token_ids[:2]
    assert as_dict["outputs"][0]["logprobs"][1]["token_id"] == outs[-1].token_ids[1]
    assert json.loads(json.dumps(as_dict))["outputs"][0]["delta_token_ids"] == outs[-1].token_ids[1:2]
    assert [f.name for f in dataclasses.fields(outs[0].outputs[0])][:5] == [
        "index", "text", "token_ids", "logprobs", "finish_reason"]
    again = dataclasses.replace(outs[0].outputs[0], text="x")
    assert again.token_ids == outs[0].token_ids and again == dataclasses.replace(again)
