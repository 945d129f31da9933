"""The `openai` Python client against a real server: completions, chat, streaming, usage, models."""
from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]


def test_completion_greedy_is_deterministic_and_has_usage(server, client):
    a = client.completions.create(model=server.model, prompt="The quick brown fox", max_tokens=12,
                                  temperature=0, extra_body={"ignore_eos": True})
    b = client.completions.create(model=server.model, prompt="The quick brown fox", max_tokens=12,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 12
    assert a.usage.prompt_tokens > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + 12


def test_completion_from_token_ids_and_echo(server, client):
    out = client.completions.create(model=server.model, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 3
    echoed = client.completions.create(model=server.model, prompt="Once upon", max_tokens=2, echo=True,
                                       temperature=0)
    assert echoed.choices[0].text.startswith("Once upon")


def test_streaming_completion_matches_non_streaming(server, client):
    kw = dict(model=server.model, prompt="Mixture-of-experts models", max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_and_streaming_chat(server, client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    out = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0,
                                         seed=3)
    assert out.choices[0].message.role == "assistant"
    assert 1 <= out.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0,
                                            seed=3, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_raw_sse_ends_with_done(server):
    body = {"model": server.model, "prompt": "def add(a, b):", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert len(lines) >= 2


def test_seeded_sampling_is_reproducible(server, client):
    kw = dict(model=server.model, prompt="Continuous batching", max_tokens=10, temperature=1.0, top_p=0.9,
              seed=1234, extra_body={"ignore_eos": True, "top_k": 20})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_client_sees_bad_request_error(server, client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=server.model, prompt="x", max_tokens=4, temperature=-1)
    assert err.value.body["param"] == "temperature"
