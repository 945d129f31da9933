"""The public API: LLM (prompt forms, context manager, identical to transformers) and AsyncEngine streaming."""
import asyncio

import pytest
import torch

from moe_serve import LLM, AsyncEngine, SamplingParams
from moe_serve.config import EngineConfig
from moe_serve.engine import EngineDeadError
from tests.engine.helpers import collect, hold_tokenizing

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def test_llm_prompt_forms_and_context_manager(tiny_dir):
    with LLM(model=str(tiny_dir), max_num_seqs=2) as llm:
        ids = llm.tokenizer.encode("The quick brown fox")
        by_text = llm.generate("The quick brown fox", GREEDY)
        by_ids = llm.generate(ids, GREEDY)
        many = llm.generate(["The quick brown fox", "Once upon", ids], GREEDY)  # more prompts than slots
        assert len(by_text) == len(by_ids) == 1 and len(many) == 3
        assert by_text[0].token_ids == by_ids[0].token_ids == many[0].token_ids == many[2].token_ids
        out = many[1]
        assert out.prompt == "Once upon" and out.text == llm.tokenizer.decode(out.token_ids)
        m = out.metrics
        assert m.num_prompt_tokens == len(out.prompt_token_ids) and m.num_output_tokens == 10
        assert m.time_to_first_token > 0 and m.time_per_output_token > 0
        with pytest.raises(ValueError, match=r"prompts\[1\]: prompt must contain at least one token"):
            llm.generate(["ok", ""], GREEDY)
    assert llm.engine.model is None
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate("x", GREEDY)


def test_an_interrupted_generate_leaves_nothing_behind(tiny_dir):
    """Ctrl-C inside generate: its requests are aborted, so the next call neither runs them nor takes
    their outputs for its own (it counted them and failed with a KeyError), and the slots come back."""
    with LLM(model=str(tiny_dir), max_num_seqs=2) as llm:
        want = llm.generate("Once upon a time", GREEDY)[0].token_ids
        step, calls = llm.engine.step, 0

        def interrupted_step():
            nonlocal calls
            calls += 1
            if calls == 5:
                raise KeyboardInterrupt
            return step()

        llm.engine.step = interrupted_step
        with pytest.raises(KeyboardInterrupt):
            llm.generate(["The quick brown fox"] * 4, GREEDY)  # two run, two wait in the queue
        llm.engine.step = step
        assert llm.generate("Once upon a time", GREEDY)[0].token_ids == want
        assert not llm.engine.has_unfinished() and sorted(llm.engine.scheduler.free_slots) == [0, 1]


def test_token_ids_from_numpy_and_torch(tiny_dir):
    """Token ids as numpy or torch integers (what a tokenizer or a dataset hands over) are prompts like
    a list of ints: one 1-D array is one prompt, a 2-D one a prompt per row; float ids are refused."""
    import numpy as np

    with LLM(model=str(tiny_dir), max_num_seqs=2) as llm:
        ids = llm.tokenizer.encode("The quick brown fox")
        want = llm.generate(ids, GREEDY)[0].token_ids
        forms = [np.array(ids), torch.tensor(ids), [np.int64(t) for t in ids], torch.tensor(ids, dtype=torch.int32)]
        assert [o.token_ids for o in llm.generate(forms, GREEDY)] == [want] * 4
        assert [o.token_ids for o in llm.generate(np.array([ids, ids]), GREEDY)] == [want] * 2
        assert llm.generate(torch.tensor(ids), GREEDY)[0].token_ids == want
        with pytest.raises(ValueError, match=r"prompts\[0\]: prompt must be a string or token ids.*got ndarray"):
            llm.generate([np.array(ids, dtype=np.float32)], GREEDY)
        with pytest.raises(ValueError, match=r"prompts\[0\]: prompt must be a string or token ids.*got list"):
            llm.generate([[True, False]], GREEDY)  # bools are not token ids


def test_greedy_matches_transformers(tiny_qwen_dir):
    from transformers import AutoModelForCausalLM

    with LLM(model=str(tiny_qwen_dir)) as llm:
        ids = llm.tokenizer.encode("Mixture-of-experts models route every")
        ours = llm.generate(ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # EOS is an ordinary token, as with ignore_eos=True
    hf.generation_config.pad_token_id = 0
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):]
    assert ours == ref.tolist()


def test_async_streams_concatenate_to_the_final_text(tiny_dir):
    eng = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir)))
    try:
        async def main():
            stop = SamplingParams(temperature=0, max_tokens=16, stop=["zzz-never"], ignore_eos=True)
            return await asyncio.gather(collect(eng, "The quick brown fox", GREEDY, "a"),
                                        collect(eng, "Once upon a time", stop, "b"))
        (da, a), (db, b) = asyncio.run(main())
        for deltas, out in ((da, a), (db, b)):
            assert out.finished and "".join(deltas) == out.text
            assert len(deltas) > 3  # really streamed
    finally:
        eng.shutdown()
    with LLM(model=str(tiny_dir)) as llm:
        assert llm.generate("The quick brown fox", GREEDY)[0].token_ids == a.token_ids


def test_async_stream_with_a_matching_stop_string(tiny_dir):
    with LLM(model=str(tiny_dir)) as llm:
        full = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    eng = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir)))
    try:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
        deltas, out = asyncio.run(collect(eng, "Once upon a time", params, "s"))
    finally:
        eng.shutdown()
    assert out.finish_reason == "stop"
    assert "".join(deltas) == out.text == full[: full.index(stop)]


def test_async_generate_tokenizes_off_the_event_loop(tiny_dir):
    """A text prompt of megabytes takes seconds to tokenize (then it is refused: over the context);
    meanwhile other coroutines on the loop keep running."""
    eng = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir)))
    try:
        async def main():
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.02)
                    ticks += 1

            tick = asyncio.create_task(ticker())
            await asyncio.sleep(0.1)
            before = ticks
            with pytest.raises(ValueError, match="max_model_len"):
                async for _ in eng.generate("The quick brown fox jumps over the lazy dog. " * 60_000, GREEDY):
                    pass
            during = ticks - before
            tick.cancel()
            return during
        assert asyncio.run(main()) >= 10  # a blocked loop ticks at most once
    finally:
        eng.shutdown()


def test_async_bad_request_fails_alone_and_abort_frees(tiny_dir):
    eng = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir), max_num_seqs=2))
    try:
        async def main():
            with pytest.raises(ValueError, match="max_tokens"):
                SamplingParams(max_tokens=-1)
            with pytest.raises(ValueError, match="vocab_size"):
                async for _ in eng.generate([10**6], GREEDY):
                    pass
            long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
            n = 0
            async for out in eng.generate("Once upon", long, "dropped"):
                n += 1
                if n == 3:
                    break  # the consumer walks away: the request is aborted
            for _ in range(200):  # the engine thread frees it at its next step (poll: the CPU may be busy)
                if eng.engine.num_running == 0:
                    break
                await asyncio.sleep(0.05)
            assert eng.engine.num_running == 0
            return await collect(eng, "The quick", GREEDY, "after")
        deltas, out = asyncio.run(main())
        assert out.finish_reason == "length" and len(out.token_ids) == 10
    finally:
        eng.shutdown()

    async def after_shutdown():
        async for _ in eng.generate("x", GREEDY):
            pass
    with pytest.raises(EngineDeadError):
        asyncio.run(after_shutdown())


def test_async_generate_tokenizing_through_a_shutdown_ends(tiny_dir):
    """A text prompt still being tokenized (off the loop) when the engine shuts down: its generate
    raises EngineDeadError instead of waiting forever on a step loop that is gone."""
    eng = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir)))
    tokenizing, release = hold_tokenizing(eng.engine, "make_sequence")  # a long text: tokenizing takes a while

    async def main():
        async def consume():
            async for _ in eng.generate("The quick brown fox", GREEDY, "late"):
                pass

        task = asyncio.create_task(consume())
        await asyncio.to_thread(tokenizing.wait, 10)
        eng.shutdown()
        release.set()
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(task, 5)
    try:
        asyncio.run(main())
    finally:
        release.set()
        eng.shutdown()
