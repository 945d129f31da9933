"""SamplingParams.n in the Python API: `out.outputs` holds n completions in vLLM's shape, in LLM.generate
and in AsyncEngine's streams; seeded completions are reproducible and distinct; aborting the request
aborts every completion; the flat fields (`out.text`, ...) stay those of the first completion."""
import asyncio

import pytest

from moe_serve import LLM, AsyncEngine, SamplingParams
from moe_serve.config import EngineConfig
from moe_serve import CompletionOutput
from moe_serve.engine.sampling_params import completion_seed

SAMPLED = dict(temperature=1.0, max_tokens=8, ignore_eos=True)


def test_generate_returns_n_seeded_completions(tiny_dir):
    with LLM(model=str(tiny_dir), max_num_seqs=2) as llm:
        (out,) = llm.generate("Once upon a time", SamplingParams(n=3, seed=5, **SAMPLED))
        assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
        assert all(isinstance(c, CompletionOutput) for c in out.outputs)
        texts = [c.text for c in out.outputs]
        assert len(set(texts)) == 3  # distinct draws (fixed by the seed: cannot flicker)
        assert all(len(c.token_ids) == 8 and c.finish_reason == "length" and c.finished() for c in out.outputs)
        assert all(c.text == llm.tokenizer.decode(c.token_ids) for c in out.outputs)
        # the flat fields are the first completion's, so code written for n = 1 keeps working
        assert (out.text, out.token_ids, out.finish_reason) == (texts[0], out.outputs[0].token_ids, "length")
        assert out.metrics.num_output_tokens == 24 and out.metrics.num_prompt_tokens == len(out.prompt_token_ids)
        # reproducible, and completion i is exactly an n = 1 request seeded completion_seed(seed, i)
        again = llm.generate("Once upon a time", SamplingParams(n=3, seed=5, **SAMPLED))[0]
        assert [c.text for c in again.outputs] == texts
        alone = llm.generate(["Once upon a time"] * 3,
                             [SamplingParams(seed=completion_seed(5, i), **SAMPLED) for i in range(3)])
        assert [o.text for o in alone] == texts and completion_seed(5, 0) == 5
        assert [len(o.outputs) for o in alone] == [1, 1, 1] and alone[0].outputs[0].index == 0


def test_generate_mixes_n_and_greedy_and_logprobs(tiny_dir):
    with LLM(model=str(tiny_dir), max_num_seqs=3) as llm:
        greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2, logprobs=1)
        outs = llm.generate(["The quick brown fox", "Once upon"], [greedy, SamplingParams(n=4, **SAMPLED)])
        a, b = outs[0].outputs
        assert a.token_ids == b.token_ids  # greedy: the same tokens, as vLLM; logprobs up to the rounding a
        # row's place in the decode batch may change (equal on some CPUs, ~1e-6 apart on AMD EPYC)
        assert [(lp.token_id, lp.rank) for lp in a.logprobs] == [(lp.token_id, lp.rank) for lp in b.logprobs]
        assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs], abs=1e-4)
        assert a.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in a.logprobs))
        assert len(outs[1].outputs) == 4 and outs[1].outputs[1].logprobs is None  # unseeded: still n of them


def test_n_larger_than_the_queue_is_refused_by_name(tiny_dir):
    with LLM(model=str(tiny_dir), max_num_seqs=2, max_queue=3) as llm:
        with pytest.raises(ValueError, match=r"prompts\[0\]: SamplingParams.n=4 .*scheduler.max_queue=3"):
            llm.generate("hi", SamplingParams(n=4))
        assert len(llm.generate("hi", SamplingParams(n=3, max_tokens=2))[0].outputs) == 3
    with pytest.raises(ValueError, match="SamplingParams.n must be an integer >= 1"):
        SamplingParams(n=0)


def test_async_streams_n_completions_and_abort_ends_them_all(tiny_dir):
    eng = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir), max_num_seqs=2))
    try:
        async def stream(params, rid):
            deltas, last, finished_before_end = {}, {}, 0
            async for out in eng.generate("Once upon a time", params, rid):
                finished_before_end += out.finished
                for c in out.outputs:
                    deltas[c.index] = deltas.get(c.index, "") + c.delta_text
                    last[c.index] = c
                    assert out.text == c.text  # flat fields: the completion this output carries
            assert finished_before_end == 1 and out.finished  # finished only once every completion is
            return deltas, last

        async def abort_midway():
            long = SamplingParams(n=3, temperature=1.0, max_tokens=500, ignore_eos=True)
            seen, reasons = 0, {}
            async for out in eng.generate("Once upon", long, "long"):
                seen += 1
                if seen == 4:
                    eng.abort("long")  # one id: all three completions (two running, one waiting)
                for c in out.outputs:
                    if c.finished():
                        reasons[c.index] = c.finish_reason
            return reasons

        async def main():
            streamed = await stream(SamplingParams(n=3, seed=7, **SAMPLED), "s")
            reasons = await abort_midway()
            return streamed, reasons

        (deltas, last), reasons = asyncio.run(main())
        assert reasons == {0: "abort", 1: "abort", 2: "abort"}
        assert eng.engine.num_running == 0 and eng.engine.num_waiting == 0
        assert {i: c.text for i, c in last.items()} == deltas and all(c.finish_reason == "length" for c in last.values())
    finally:
        eng.shutdown()
    with LLM(model=str(tiny_dir)) as llm:
        whole = llm.generate("Once upon a time", SamplingParams(n=3, seed=7, **SAMPLED))[0]
    assert [c.text for c in whole.outputs] == [deltas[i] for i in range(3)]


def test_async_consumer_walking_away_frees_every_completion(tiny_dir):
    eng = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir), max_num_seqs=2))
    try:
        async def main():
            long = SamplingParams(n=3, temperature=1.0, max_tokens=500, ignore_eos=True)
            n = 0
            async for _ in eng.generate("Once upon", long, "dropped"):
                n += 1
                if n == 3:
                    break
            for _ in range(200):
                if eng.engine.num_running == 0 and eng.engine.num_waiting == 0:
                    break
                await asyncio.sleep(0.05)
            return eng.engine.num_running, eng.engine.num_waiting, eng.engine.has_unfinished()
        assert asyncio.run(main()) == (0, 0, False)
    finally:
        eng.shutdown()
