"""n choices are one engine request: queued together or refused together. Served in process (httpx's
ASGI transport) on an engine whose queue holds 2 requests."""
from __future__ import annotations

import asyncio

import httpx

from moe_serve import AsyncEngine
from moe_serve.config import EngineConfig, ServerConfig
from moe_serve.server.app import create_app


def test_n_over_the_queue_is_refused_naming_n_and_n_that_fits_runs(tiny_model, tmp_path):
    engine = AsyncEngine.from_config(EngineConfig.from_flat(model=str(tiny_model), max_num_seqs=1, max_queue=2,
                                                            cpu_threads=1))
    app = create_app(engine, ServerConfig(trace_dir=str(tmp_path)), str(tiny_model))
    body = {"prompt": "Once upon a time", "max_tokens": 3, "ignore_eos": True, "seed": 1}

    async def ask(n: int) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post("/v1/completions", json=dict(body, n=n), timeout=60)

    try:
        over, fits = asyncio.run(ask(3)), asyncio.run(ask(2))
    finally:
        engine.shutdown()
    # was: choices 0 and 1 queued and started, choice 2 refused: a 429 'queue full' for a request that
    # could never be served whole
    assert over.status_code == 400, over.text
    err = over.json()["error"]
    assert err["param"] == "n" and "max_queue=2" in err["message"], err
    assert fits.status_code == 200 and [c["index"] for c in fits.json()["choices"]] == [0, 1]
    assert not engine.engine.has_unfinished()
