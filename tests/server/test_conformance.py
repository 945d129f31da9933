"""Small points where the server must answer as OpenAI's API (and vLLM's server) do, over real HTTP."""
from __future__ import annotations

import httpx


def test_health_answers_head_as_get(server):
    """Load balancers and uptime checkers probe with HEAD (was: 405 Method Not Allowed)."""
    get = httpx.get(server.url + "/health", timeout=10)
    head = httpx.head(server.url + "/health", timeout=10)
    assert (get.status_code, head.status_code) == (200, 200)
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
