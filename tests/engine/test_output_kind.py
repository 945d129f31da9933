"""SamplingParams.output_kind (vLLM's RequestOutputKind): what a streamed output carries. CUMULATIVE (the
default) the text, token_ids and logprobs so far, DELTA only the new ones, FINAL_ONLY one output per
completion, when it finishes; the tokens are the same whichever kind."""
import asyncio

import pytest

from moe_serve import AsyncEngine, RequestOutputKind, SamplingParams
from moe_serve.config import EngineConfig
from moe_serve.engine import LLMEngine

PROMPT = "The quick brown fox"


def params(kind, n=1):
    return SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1, n=n, output_kind=kind)


def stream(eng, kind, n=1):
    eng.add_request(PROMPT, params(kind, n), kind.name)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    return outs


def test_each_kind_streams_what_it_names(tiny_dir):
    eng = LLMEngine(EngineConfig.from_flat(model=str(tiny_dir)))
    cumulative = stream(eng, RequestOutputKind.CUMULATIVE)
    final = cumulative[-1]
    assert len(cumulative) == 6 and [len(o.token_ids) for o in cumulative] == list(range(1, 7))
    delta = stream(eng, RequestOutputKind.DELTA)
    assert [o.token_ids for o in delta] == [o.delta_token_ids for o in delta] == [[t] for t in final.token_ids]
    assert "".join(o.text for o in delta) == final.text and [o.text for o in delta] == [o.delta_text for o in delta]
    assert [lp for o in delta for lp in o.logprobs] == final.logprobs
    delta[0].outputs[0].token_ids.append(-1)  # the consumer's own list, apart from delta_token_ids
    assert delta[0].delta_token_ids == final.token_ids[:1] and delta[-1].finished
    only = stream(eng, RequestOutputKind.FINAL_ONLY, n=2)
    assert len(only) == 2 and [o.finished for o in only] == [False, True]
    assert sorted(o.outputs[0].index for o in only) == [0, 1]
    assert all(o.token_ids == final.token_ids and o.text == final.text for o in only)


def test_final_only_through_the_async_engine(tiny_dir):
    async def main():
        engine = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir)))
        try:
            return [out async for out in engine.generate(PROMPT, params(RequestOutputKind.FINAL_ONLY), "a")]
        finally:
            engine.shutdown()
    outs = asyncio.run(main())
    assert len(outs) == 1 and outs[0].finished and len(outs[0].token_ids) == 6


@pytest.mark.parametrize("bad", ["delta", 3, True, None])
def test_a_bad_kind_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="SamplingParams.output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind=bad)
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA
