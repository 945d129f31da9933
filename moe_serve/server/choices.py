"""A request's `n` choices: one engine request each, run side by side, their outputs merged as they come.

Choice i is the engine request `<id>-<i>` (n = 1: the id itself) with its own SamplingParams; all of
them share the HTTP request's RunState, so a disconnect or a timeout aborts every one. With a seed,
choice 0 keeps it and choice i > 0 gets one derived from (seed, i): the same request gives the same
n texts again, and n = 1 the same text as before. Greedy choices are identical, as in vLLM.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

from moe_serve.engine.sampling_params import SamplingParams
from moe_serve.server.lifecycle import RequestRunner, RunState

_GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, i) over the seed space


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The SamplingParams of each of n choices (seeds as the module docstring says)."""
    if n == 1:
        return [params]
    return [params if params.seed is None or i == 0 else
            dataclasses.replace(params, seed=(params.seed + i * _GOLDEN) % 2**63) for i in range(n)]


def choice_id(rid: str, i: int, n: int) -> str:
    return rid if n == 1 else f"{rid}-{i}"


async def run_choices(runner: RequestRunner, request, rid: str, ids: list[int], params: list[SamplingParams],
                      state: RunState) -> AsyncIterator[tuple[int, object]]:
    """(choice index, RequestOutput) as the engine produces them, until every choice has finished.
    An APIError of one choice (refused, failed) ends the whole iteration; closing it aborts the rest."""
    n = len(params)
    if n == 1:
        run = runner.run(request, rid, ids, params[0], state)
        try:
            async for out in run:
                yield 0, out
        finally:
            await run.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        run = runner.run(request, choice_id(rid, i, n), ids, params[i], state)
        try:
            async for out in run:
                queue.put_nowait((i, out))
        except Exception as exc:  # noqa: BLE001 - an APIError, re-raised to the consumer below
            queue.put_nowait((i, exc))
        finally:
            await run.aclose()
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(n)]
    try:
        live = n
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
