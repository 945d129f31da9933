"""n > 1: n independent choices per request, each with its own index, streamed chunks carrying it;
seeded choices are reproducible; greedy choices are identical (as vLLM)."""
from __future__ import annotations

import httpx

from moe_serve.engine.sampling_params import completion_seed

from tests.server.test_logprobs import stream_events

SAMPLED = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 5, "ignore_eos": True}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 1.0, "seed": 9,
        "ignore_eos": True}


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_n_seeded_choices_are_independent_and_reproducible(server):
    a = post(server, "/v1/completions", dict(SAMPLED, n=3))
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in a["choices"]]
    assert len(set(texts)) > 1  # independent draws (fixed by the seed, so this cannot flicker)
    assert a["usage"]["completion_tokens"] == 3 * 8 and a["usage"]["prompt_tokens"] > 0
    b = post(server, "/v1/completions", dict(SAMPLED, n=3))
    assert [c["text"] for c in b["choices"]] == texts  # choice i is reproducible
    one = post(server, "/v1/completions", dict(SAMPLED, n=1))
    assert one["choices"][0]["text"] == texts[0]  # choice 0 keeps the request's seed
    last = post(server, "/v1/completions", dict(SAMPLED, n=1, seed=completion_seed(5, 2)))
    assert last["choices"][0]["text"] == texts[2]  # choice i: the seed the Python API documents


def test_n_greedy_choices_are_identical(server):
    body = {"prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "n": 2,
            "logprobs": 1}
    out = post(server, "/v1/completions", body)
    a, b = out["choices"]
    assert a["text"] == b["text"] and a["logprobs"] == b["logprobs"]


def test_n_streamed_chunks_carry_their_index(server):
    whole = post(server, "/v1/completions", dict(SAMPLED, n=3))
    events = stream_events(server, "/v1/completions", dict(SAMPLED, n=3, stream_options={"include_usage": True}))
    texts, finished = {}, {}
    for e in events[:-1]:
        (c,) = e["choices"]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        if c["finish_reason"] is not None:
            finished[c["index"]] = c["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_n_chat_streamed_and_whole(server):
    whole = post(server, "/v1/chat/completions", dict(CHAT, n=2))
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    events = stream_events(server, "/v1/chat/completions", dict(CHAT, n=2))
    roles, texts = {}, {}
    for e in events:
        (c,) = e["choices"]
        if c["delta"].get("role"):
            roles[c["index"]] = roles.get(c["index"], 0) + 1
        texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
    assert roles == {0: 1, 1: 1}  # one role chunk per choice, first
    assert texts == {c["index"]: c["message"]["content"] for c in whole["choices"]}


def test_n_over_the_limit_is_named(server):
    r = httpx.post(server.url + "/v1/completions", json=dict(SAMPLED, n=17), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "16" in r.json()["error"]["message"]


def test_a_disconnect_aborts_every_choice(server):
    """n=3 on a server of 2 KV slots: two choices run, one waits; hanging up frees all three."""
    from tests.server.test_robustness import gauge, wait_for

    body = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "n": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(line for line in lines if line.startswith("data: "))
        assert wait_for(lambda: gauge(server, "num_requests_running") == 2 and gauge(server, "num_requests_waiting") == 1), \
            (gauge(server, "num_requests_running"), gauge(server, "num_requests_waiting"))
        assert gauge(server, "num_requests_in_flight") == 1  # one HTTP request, admitted once
    assert wait_for(lambda: gauge(server, "num_requests_running") == 0 and gauge(server, "num_requests_waiting") == 0
                    and gauge(server, "num_requests_in_flight") == 0, timeout=5.0)
    assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})["choices"][0]["finish_reason"]
