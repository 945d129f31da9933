"""Small points where the server must answer as OpenAI's API (and vLLM's server) do, over real HTTP."""
from __future__ import annotations

import json

import httpx


def test_health_answers_head_as_get(server):
    """Load balancers and uptime checkers probe with HEAD (was: 405 Method Not Allowed)."""
    get = httpx.get(server.url + "/health", timeout=10)
    head = httpx.head(server.url + "/health", timeout=10)
    assert (get.status_code, head.status_code) == (200, 200)
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


def _sse_chunks(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_stream_chunks_are_shaped_as_openai_sends_them(server):
    """A chat delta carries only what it says ({} on the finish chunk, where null fields broke clients that
    read delta.get("content", "")), and `usage` is there only with stream_options.include_usage: null on
    every chunk but the last, which has it and no choices (OpenAI's API reference)."""
    chat = {"model": server.model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4,
            "temperature": 0, "stream": True}
    chunks = _sse_chunks(server, "/v1/chat/completions", chat)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(list(d) == ["content"] and isinstance(d["content"], str) for d in deltas[1:-1])
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)
    completion = {"model": server.model, "prompt": "Once upon", "max_tokens": 3, "temperature": 0, "stream": True}
    chunks = _sse_chunks(server, "/v1/completions", completion)
    assert len(chunks) >= 2 and all("usage" not in c for c in chunks)
    assert all(set(c["choices"][0]) == {"index", "text", "logprobs", "finish_reason"} for c in chunks)
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        chunks = _sse_chunks(server, path, dict(body, stream_options={"include_usage": True}))
        assert all(c["usage"] is None and c["choices"] for c in chunks[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == body["max_tokens"]


def test_every_500_has_openai_type_server_error():
    """500s said internal_server_error in three places (an unhandled exception, an engine error, a request
    the engine ended without output) and server_error in another; OpenAI's type for a 500 is server_error."""
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from moe_serve.server.errors import install_error_handlers
    from moe_serve.server.lifecycle import RequestRunner, RunState
    from moe_serve.server.metrics import ServerMetrics

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("boom")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    runner = RequestRunner(engine=None, metrics=ServerMetrics("m"), max_pending_requests=1, request_timeout_s=1)
    err = runner.failure(SimpleNamespace(finish_reason="error", error="boom"), RunState())
    assert (err.status, err.type) == (500, "server_error")
