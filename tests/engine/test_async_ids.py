"""AsyncEngine streams and request ids: aborts that come while a request is on its way to the engine,
ids reused after a refusal or an abandoned stream."""
import asyncio
import time

import pytest

from moe_serve import AsyncEngine, SamplingParams
from moe_serve.config import EngineConfig
from moe_serve.engine import QueueFullError
from tests.engine.helpers import collect, hold_tokenizing

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def test_async_abort_while_the_prompt_is_tokenized_is_kept(tiny_dir):
    """The server aborts a request as soon as its client goes away, also while its long text prompt is
    still being tokenized (off the loop); that abort named an id the engine did not know yet, was
    ignored, and the request then ran to the end, holding a KV slot. It now ends with finish_reason
    "abort" and no token, and frees everything."""
    eng = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir), max_num_seqs=2))
    tokenizing, release = hold_tokenizing(eng.engine, "make_request")  # a long text: tokenizing takes a while
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        outs = []

        async def consume():
            async for out in eng.generate("The quick brown fox", long, "gone"):
                outs.append(out)

        task = asyncio.create_task(consume())
        await asyncio.to_thread(tokenizing.wait, 10)
        eng.abort("gone")  # the client went away meanwhile
        release.set()
        await asyncio.wait_for(task, 30)
        del eng.engine.make_request  # the engine's own method again
        after = await collect(eng, "Once upon", GREEDY, "after")
        return outs, after
    try:
        outs, (_, after) = asyncio.run(main())
    finally:
        release.set()
        eng.shutdown()
    assert [(o.finished, o.finish_reason, o.token_ids) for o in outs] == [(True, "abort", [])]
    assert after.finish_reason == "length" and len(after.token_ids) == 10
    assert sorted(eng.engine.scheduler.free_slots) == [0, 1]


def test_async_a_refused_request_spares_a_retry_of_its_id_on_its_way(tiny_dir):
    """A request refused (queue full) aborts its id as it ends; a retry with that id still on its way to
    the engine (its prompt being tokenized) is another request and must run to its end."""
    eng = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir), max_num_seqs=1, max_queue=1))
    # the retry's text prompt takes a while
    tokenizing, release = hold_tokenizing(eng.engine, "make_request", text_only=True)
    long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def main():
        running = asyncio.create_task(collect(eng, [5, 6, 7], long, "running"))
        while eng.engine.num_running == 0:
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(collect(eng, [5, 6], GREEDY, "waiting"))  # fills the queue
        while eng.engine.num_waiting == 0:
            await asyncio.sleep(0.01)
        retry = asyncio.create_task(collect(eng, "Once upon", GREEDY, "x"))
        await asyncio.to_thread(tokenizing.wait, 10)
        with pytest.raises(QueueFullError):
            await collect(eng, [1, 2], GREEDY, "x")  # refused: its cleanup aborts "x"
        eng.abort("running")  # room again
        await running
        release.set()
        return await asyncio.wait_for(retry, 30), await waiting
    try:
        (_, retried), (_, waited) = asyncio.run(main())
    finally:
        release.set()
        eng.shutdown()
    assert retried.finish_reason == "length" and len(retried.token_ids) == 10
    assert waited.finish_reason == "length"


def test_async_reusing_the_id_of_an_abandoned_stream(tiny_dir):
    """A consumer stops reading (break) and reuses the request id at once: the new request used to be
    refused as 'already in use' until the old one had left the engine, and one accepted in the step
    that aborted the old one got the old one's abort output (it ended at once with finish_reason
    "abort", no token) while its own request ran on for nobody. Now the id is taken as soon as the old
    request is gone, and the new stream carries only the new request's outputs."""
    eng = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir), max_num_seqs=4))
    forward = eng.engine.model.forward

    def slow_forward(batch):  # a big model's step: the event loop runs meanwhile (the GIL is free)
        time.sleep(0.05)
        return forward(batch)

    eng.engine.model.forward = slow_forward
    long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def main():
        background = asyncio.create_task(collect(eng, [9, 8, 7], long, "background"))  # steps keep running
        results, refused = [], []
        for trial in range(3):
            n = 0
            stream = eng.generate([5, 6, 7], long, "chat")
            async for _ in stream:
                n += 1
                if n == 2:
                    break
            if trial == 0:
                await stream.aclose()
            else:  # left to the event loop, which closes a generator nobody holds at its next round
                del stream
            while True:  # retry until accepted (the old code refused it while the old request was live)
                try:
                    results.append(await asyncio.wait_for(collect(eng, [5, 6, 7], GREEDY, "chat"), 30))
                    break
                except ValueError:
                    refused.append(trial)
                    await asyncio.sleep(0.001)
        eng.abort("background")
        await background
        return results, refused
    try:
        results, refused = asyncio.run(main())
    finally:
        eng.shutdown()
    assert refused == []
    for deltas, out in results:
        assert (out.finish_reason, len(out.token_ids)) == ("length", 10)
    assert eng.engine.num_running == 0 and sorted(eng.engine.scheduler.free_slots) == [0, 1, 2, 3]


def test_async_many_streams_reusing_ids_breaking_and_cancelled_leave_nothing_behind(tiny_dir):
    """Twenty concurrent generates over four ids: some read to the end, some break after two outputs,
    some are cancelled. Each one read to the end gets exactly its own request's tokens (or was refused:
    its id held by a live stream), and afterwards no stream, live request or KV slot is left."""
    from moe_serve import LLM

    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=6 + i, ignore_eos=True) for i in range(4)]
    prompts = ["The quick brown fox", "Once upon a time", [5, 6, 7, 8], "def add(a, b):"]
    with LLM(model=str(tiny_dir)) as llm:
        want = [out.token_ids for out in llm.generate(prompts, params)]
    eng = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_dir), max_num_seqs=2, prefill_chunk=4,
                                                         max_num_batched_tokens=8))

    async def one(k):
        i, mode = k % 4, ("full", "break", "cancel")[k % 3]
        await asyncio.sleep(0.01 * k)

        async def read():
            n, last = 0, None
            async for last in eng.generate(prompts[i], params[i], f"id{k % 4}"):
                n += 1
                if mode == "break" and n == 2:
                    return None
            return last
        task = asyncio.create_task(read())
        if mode == "cancel":
            await asyncio.sleep(0.02)
            task.cancel()
        try:
            out = await task
        except (asyncio.CancelledError, ValueError):  # cancelled, or its id held by a live stream
            return None
        return (i, out) if mode == "full" else None

    async def main():
        done = [r for r in await asyncio.gather(*(one(k) for k in range(20))) if r is not None]
        for _ in range(200):  # the last aborts are taken at the engine's next step
            if not (eng._streams or eng.engine.live_sequences()):
                break
            await asyncio.sleep(0.02)
        left = (dict(eng._streams), dict(eng._unsubmitted), eng.engine.live_sequences())
        return done, left, sorted(eng.engine.scheduler.free_slots)
    try:
        done, left, free = asyncio.run(main())
    finally:
        eng.shutdown()  # (it aborts what is live: look before)
    assert done and all(out.finish_reason == "length" and out.token_ids == want[i] for i, out in done)
    assert left == ({}, {}, []) and free == [0, 1]
