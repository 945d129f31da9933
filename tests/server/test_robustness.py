"""Disconnects, a full server, timeouts and auth, over real sockets."""
from __future__ import annotations

import asyncio
import time

import httpx

LONG = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}


def wait_for(cond, timeout: float = 10.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


def gauge(server, name: str) -> float:
    return server.metrics().get(f"moe_serve:{name}", -1.0)


def successes(server) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("moe_serve:request_success_total"))


def test_disconnect_mid_stream_aborts_and_frees_the_slot(server):
    before = successes(server)
    gen_before = server.metrics()[f'moe_serve:generation_tokens_total{{model_name="{server.model}"}}']
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/completions", json=dict(LONG, stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # generation has started
            assert gauge(server, "num_requests_running") == 1
        # leaving the block closes the connection long before 4000 tokens are out
    assert wait_for(lambda: gauge(server, "num_requests_running") == 0 and gauge(server, "num_requests_in_flight") == 0)
    time.sleep(1.0)
    assert successes(server) == before  # it never finished: aborted, not run to max_tokens
    gen_after = server.metrics()[f'moe_serve:generation_tokens_total{{model_name="{server.model}"}}']
    assert gen_after == gen_before
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200


def disconnects(server) -> float:
    return server.metrics().get('moe_serve:request_errors_total{model_name="%s",status="499"}' % server.model, 0.0)


def test_every_disconnect_is_counted_once(server):
    """Three streaming clients and two waiting for a whole answer hang up mid-generation: five 499s in
    the error metric, whichever of the server's watcher and Starlette notices first."""
    before = disconnects(server)
    with httpx.Client(timeout=30) as c:
        for _ in range(3):
            with c.stream("POST", server.url + "/v1/completions", json=dict(LONG, stream=True)) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
            assert wait_for(lambda: gauge(server, "num_requests_in_flight") == 0)
    for _ in range(2):
        with httpx.Client(timeout=0.3) as c:
            try:
                c.post(server.url + "/v1/completions", json=LONG)
            except httpx.TimeoutException:
                pass
        assert wait_for(lambda: gauge(server, "num_requests_in_flight") == 0)
    assert wait_for(lambda: disconnects(server) - before == 5, timeout=5.0), disconnects(server) - before


def test_a_huge_prompt_does_not_stall_the_server(server):
    """A 4 MB prompt takes seconds to tokenize (and is then refused: far over the context). The server
    tokenizes it off the event loop, so a request sent meanwhile is answered first."""
    import threading

    huge = "The quick brown fox jumps over the lazy dog. " * 90_000
    order = []

    def send_huge():
        r = httpx.post(server.url + "/v1/completions", json={"prompt": huge, "max_tokens": 2}, timeout=120)
        order.append(("huge", r.status_code))

    sender = threading.Thread(target=send_huge)
    sender.start()
    time.sleep(0.5)  # the body is in (milliseconds over loopback) and its tokenization under way
    order.append(("health", httpx.get(server.url + "/health", timeout=120).status_code))
    sender.join()
    assert order == [("health", 200), ("huge", 400)]


def test_disconnect_of_non_streaming_request_aborts_it(server):
    before = successes(server)
    with httpx.Client(timeout=0.3) as c:  # gives up (closes the socket) long before 4000 tokens
        try:
            c.post(server.url + "/v1/completions", json=LONG)
        except httpx.TimeoutException:
            pass
    assert wait_for(lambda: gauge(server, "num_requests_in_flight") == 0 and gauge(server, "num_requests_running") == 0)
    time.sleep(1.0)
    assert successes(server) == before


def test_full_server_answers_429_and_recovers(server):
    """3 long streams fill the server (2 in KV slots, 1 waiting); the 4th request is refused at once."""

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as c:
            statuses = []

            async def hold():
                async with c.stream("POST", server.url + "/v1/completions", json=dict(LONG, stream=True)) as r:
                    statuses.append(r.status_code)
                    async for _ in r.aiter_lines():
                        pass

            holders = [asyncio.create_task(hold()) for _ in range(3)]
            try:
                for _ in range(500):
                    if (await c.get(server.url + "/metrics")).text.count("moe_serve:num_requests_in_flight 3.0"):
                        break
                    await asyncio.sleep(0.02)
                r = await c.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
                for _ in range(500):  # the two running streams have sent their headers
                    if len(statuses) >= 2:
                        break
                    await asyncio.sleep(0.02)
                return r, statuses
            finally:
                for t in holders:
                    t.cancel()  # hang up: all three are aborted
                await asyncio.gather(*holders, return_exceptions=True)

    r, statuses = asyncio.run(scenario())
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and "max_pending_requests=3" in err["message"]
    assert statuses[:2] == [200, 200]
    assert wait_for(lambda: gauge(server, "num_requests_in_flight") == 0 and gauge(server, "num_requests_running") == 0)
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_timeout_aborts_the_request_and_frees_its_slot(strict_server):
    s = strict_server
    t0 = time.monotonic()
    r = httpx.post(s.url + "/v1/chat/completions", headers=s.headers, timeout=30,
                   json={"messages": [{"role": "user", "content": "tell a long story"}], "max_tokens": 4000,
                         "ignore_eos": True})
    assert r.status_code == 504 and "request_timeout_s=0.3" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5
    assert wait_for(lambda: gauge(s, "num_requests_running") == 0)
    with httpx.stream("POST", s.url + "/v1/completions", headers=s.headers, timeout=30,
                      json={"prompt": "hi", "max_tokens": 4000, "ignore_eos": True, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200
    assert '"timeout_error"' in lines[-2] and lines[-1] == "data: [DONE]"  # the error arrives as an event


def test_a_failed_request_is_counted_once_however_often_it_is_asked():
    """The handlers ask `failure` about a request's first output (to choose streaming) and again about
    its final one: a request aborted before its first token (e.g. timed out in the queue) was counted
    twice. Also a stream closed early after `failure` counted it adds nothing."""
    from types import SimpleNamespace

    from moe_serve.server.lifecycle import RequestRunner, RunState
    from moe_serve.server.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    runner = RequestRunner(engine=None, metrics=metrics, max_pending_requests=4, request_timeout_s=0.3)

    def count(status):
        return metrics.registry.get_sample_value("moe_serve:request_errors_total", {"model_name": "m", "status": status})

    aborted, done = SimpleNamespace(finish_reason="abort", error=None), SimpleNamespace(finish_reason="length")
    timed_out = RunState(timed_out=True)
    assert [runner.failure(aborted, timed_out).status for _ in range(3)] == [504] * 3
    runner.stream_closed_early(timed_out)
    assert count("504") == 1 and count("499") is None
    assert runner.failure(done, RunState()) is None
    gone = RunState()
    runner.stream_closed_early(gone)  # Starlette closed the body first
    gone.disconnected = True
    assert runner.failure(aborted, gone).status == 499 and count("499") == 1


def test_api_key_is_required_when_set(strict_server):
    s = strict_server
    body = {"prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(s.url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(s.url + "/v1/models", headers=s.headers, timeout=30).status_code == 200
    assert httpx.get(s.url + "/health", timeout=30).status_code == 200  # probes need no key


def test_disconnect_while_queued_leaves_the_queue(server):
    """With both KV slots busy, a queued request whose client hangs up is dropped at once."""

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as c:
            async def hold():
                async with c.stream("POST", server.url + "/v1/completions", json=dict(LONG, stream=True)) as r:
                    async for _ in r.aiter_lines():
                        pass

            holders = [asyncio.create_task(hold()) for _ in range(2)]
            try:
                while "moe_serve:num_requests_running 2.0" not in (await c.get(server.url + "/metrics")).text:
                    await asyncio.sleep(0.02)
                queued = asyncio.create_task(c.post(server.url + "/v1/completions", json=LONG))
                while "moe_serve:num_requests_waiting 1.0" not in (await c.get(server.url + "/metrics")).text:
                    await asyncio.sleep(0.02)
                queued.cancel()  # the client gives up while its request waits for a slot
                await asyncio.gather(queued, return_exceptions=True)
                for _ in range(250):
                    text = (await c.get(server.url + "/metrics")).text
                    if "moe_serve:num_requests_waiting 0.0" in text and "moe_serve:num_requests_in_flight 2.0" in text:
                        return True
                    await asyncio.sleep(0.02)
                return False
            finally:
                for t in holders:
                    t.cancel()
                await asyncio.gather(*holders, return_exceptions=True)

    assert asyncio.run(asyncio.wait_for(scenario(), 60))
    assert wait_for(lambda: gauge(server, "num_requests_in_flight") == 0 and gauge(server, "num_requests_running") == 0)


def test_top_k_past_int64_is_served_and_the_engine_lives(server):
    """top_k has no upper bound in the API (vLLM's meaning: over the vocabulary = no cut); 2**63 once
    overflowed the sampler inside the engine's step, which stopped the engine: 503 for everyone."""
    body = {"prompt": "hi", "max_tokens": 2, "top_k": 2**63, "seed": 1}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text


def test_non_ascii_api_key_is_accepted(tiny_model, tmp_path):
    """A key with non-ASCII characters arrives as its UTF-8 bytes (what curl sends), which Starlette
    decodes as latin-1; compared as that text, the right key was refused with 401 for every client."""
    from tests.server.conftest import Server, launch, stop_server, wait_healthy

    key = "sëcret-ключ"
    proc, url = launch(tiny_model, tmp_path, "--api-key", key, "--max-num-seqs", "1", "--cpu-threads", "1")
    server = Server(url, proc, tiny_model.name, tmp_path, {})
    try:
        wait_healthy(proc, url, tmp_path / "server.log")
        right = {"Authorization": b"Bearer " + key.encode()}
        assert httpx.get(url + "/v1/models", headers=right, timeout=30).status_code == 200
        wrong = {"Authorization": b"Bearer " + "sëcret-ключ!".encode()}
        assert httpx.get(url + "/v1/models", headers=wrong, timeout=30).status_code == 401
    finally:
        stop_server(server)
