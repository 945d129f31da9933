"""A client that hangs up right after sending its request, before the request reaches the engine:
the request must never run for nobody (no tokens computed, no success counted, a 499 counted once),
and the server goes on serving."""
from __future__ import annotations

import json
import socket
import time

import httpx

from tests.server.test_robustness import gauge, successes, wait_for

PROMPT = "Once upon a time there was a small model that served requests. " * 20  # ~250 tokens to tokenize


def send_and_hang_up(url: str, path: str, body: dict) -> None:
    """A real HTTP/1.1 client that writes the whole request and closes the socket without reading.

    TCP_CORK holds the request in the kernel until close(), which sends it with the FIN: the client is
    gone before the server reads a byte. (Sent uncorked, a client descheduled between send and close
    on a loaded machine hung up only after the server had submitted the request: a flaky test.)"""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        sock.sendall(head + data)


def disconnects(server) -> float:
    return server.metrics().get('moe_serve:request_errors_total{model_name="%s",status="499"}' % server.model, 0.0)


def test_a_client_gone_before_its_request_runs_costs_nothing(server):
    long = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    cases = [("/v1/completions", dict(long, prompt=PROMPT)),
             ("/v1/completions", dict(long, prompt=PROMPT, stream=True)),
             ("/v1/chat/completions", dict(long, messages=[{"role": "user", "content": PROMPT}])),
             ("/v1/chat/completions", dict(long, messages=[{"role": "user", "content": PROMPT}], stream=True))]
    before, gone_before = successes(server), disconnects(server)
    assert httpx.post(server.url + "/v1/traces/start", timeout=30).status_code == 200
    try:
        for path, body in cases * 3:
            send_and_hang_up(server.url, path, body)
            assert wait_for(lambda: gauge(server, "num_requests_in_flight") == 0
                            and gauge(server, "num_requests_running") == 0, timeout=5.0)
        status = httpx.get(server.url + "/v1/traces", timeout=30).json()
    finally:
        httpx.post(server.url + "/v1/traces/stop", timeout=30)
    assert status["tokens"] == 0, status  # not one prompt token reached the model
    assert wait_for(lambda: disconnects(server) - gone_before == 3 * len(cases), timeout=5.0), disconnects(server)
    time.sleep(0.5)
    assert successes(server) == before
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text


def errors(server, status: int) -> float:
    return server.metrics().get('moe_serve:request_errors_total{model_name="%s",status="%d"}' % (server.model, status),
                                0.0)


def test_a_client_gone_in_the_middle_of_its_body_is_a_499_not_a_400(server):
    """Headers with a Content-Length, half the body, then the socket closes: the client closed its
    request (499); the server did not receive a bad one (400)."""
    host, port = server.url.removeprefix("http://").split(":")
    data = json.dumps({"prompt": PROMPT, "max_tokens": 4}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    bad_before, gone_before = errors(server, 400), errors(server, 499)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/traces/dump"):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head.replace(b"/v1/completions", path.encode()) + data[:len(data) // 2])
            time.sleep(0.2)  # the server reads the headers and the first half, and waits for the rest
    counted = lambda: (errors(server, 499) - gone_before, errors(server, 400) - bad_before)  # noqa: E731
    assert wait_for(lambda: counted() == (3, 0), timeout=5.0), counted()  # it was (0, 3)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
