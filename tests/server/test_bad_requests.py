"""Every kind of invalid request gets a 400 in OpenAI's error shape naming the field; the server goes on."""
from __future__ import annotations

import json

import httpx
import pytest

OK_COMPLETION = {"prompt": "hello", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 1000  # far over the 4096-token context

# (endpoint, body, the field the error must name)
CASES = [
    ("completions", {"max_tokens": 2}, "prompt"),  # missing field
    ("completions", {"prompt": 123, "max_tokens": 2}, "prompt"),  # wrong type
    ("completions", {"prompt": "", "max_tokens": 2}, "prompt"),
    ("completions", {"prompt": ["a", "b"], "max_tokens": 2}, "prompt"),  # batches are not supported
    ("completions", {"prompt": [1, -3], "max_tokens": 2}, "prompt.1"),
    ("completions", {"prompt": [1, 10**6], "max_tokens": 2}, "prompt"),  # token id outside the vocabulary
    ("completions", {"prompt": LONG_PROMPT, "max_tokens": 2}, "prompt"),  # over the context
    ("completions", {"prompt": "hello", "max_tokens": 4096}, "max_tokens"),  # prompt + output over the context
    ("completions", {"prompt": "hello", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "hello", "max_tokens": "ten"}, "max_tokens"),
    ("completions", {"prompt": "hello", "max_tokens": 2.5}, "max_tokens"),
    ("completions", {"prompt": "hello", "temperature": -0.1}, "temperature"),
    ("completions", {"prompt": "hello", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "hello", "temperature": "0.5"}, "temperature"),  # numbers are not strings
    ("completions", {"prompt": "hello", "top_p": True}, "top_p"),  # nor booleans
    ("chat/completions", dict(OK_CHAT, frequency_penalty="0"), "frequency_penalty"),
    ("completions", {"prompt": "hello", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "hello", "top_p": 1.5}, "top_p"),
    ("completions", {"prompt": "hello", "top_k": -2}, "top_k"),
    ("completions", {"prompt": "hello", "n": 17}, "n"),  # at most 16 choices
    ("completions", {"prompt": "hello", "n": 0}, "n"),
    ("completions", {"prompt": "hello", "seed": -1}, "seed"),
    ("completions", {"prompt": "hello", "stop": 5}, "stop"),
    ("completions", {"prompt": "hello", "stop_token_ids": [-1]}, "stop_token_ids.0"),
    ("completions", {"prompt": "hello", "stop_token_ids": [10**6]}, "stop_token_ids"),  # engine-side check
    ("completions", {"prompt": "hello", "stop": ["", "a"]}, "stop"),  # engine-side check
    ("completions", {"prompt": "hello", "stream": "yes"}, "stream"),
    ("completions", {"prompt": "hello", "stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"prompt": "hello", "logprobs": 21}, "logprobs"),  # vLLM's max_logprobs is 20
    ("completions", {"prompt": "hello", "logprobs": -1}, "logprobs"),
    ("completions", {"prompt": "hello", "logprobs": 2, "echo": True}, "logprobs"),  # prompt logprobs: not computed
    ("completions", {"prompt": "hello", "best_of_everything": 1}, "best_of_everything"),  # unknown field
    ("chat/completions", {"max_tokens": 2}, "messages"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, "messages.0.mood"),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, "messages"),
    ("chat/completions", dict(OK_CHAT, max_completion_tokens=0), "max_completion_tokens"),
    ("chat/completions", dict(OK_CHAT, max_completion_tokens=5000), "max_completion_tokens"),
    ("chat/completions", dict(OK_CHAT, temperature=3), "temperature"),
    ("chat/completions", dict(OK_CHAT, logprobs=1), "logprobs"),  # a boolean
    ("chat/completions", dict(OK_CHAT, top_logprobs=2), "top_logprobs"),  # without logprobs: true
    ("chat/completions", dict(OK_CHAT, logprobs=True, top_logprobs=21), "top_logprobs"),
    ("chat/completions", dict(OK_CHAT, presence_penalty=2.5), "presence_penalty"),  # OpenAI's [-2, 2]
    ("completions", {"prompt": "hello", "frequency_penalty": -3}, "frequency_penalty"),
    ("completions", {"prompt": "hello", "repetition_penalty": 0}, "repetition_penalty"),  # vLLM's: > 0
    ("completions", {"prompt": "hello", "repetition_penalty": "1.1"}, "repetition_penalty"),
    ("chat/completions", dict(OK_CHAT, functions=[]), "functions"),
]


def check_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" or status != 400
    assert err["param"] == param, err
    if param is not None:
        assert param.split(".")[0] in err["message"], err  # the message names the field too
    return err


@pytest.mark.parametrize("endpoint,body,param", CASES, ids=[f"{e}:{p}:{i}" for i, (e, _, p) in enumerate(CASES)])
def test_invalid_request_names_the_field(server, endpoint, body, param):
    r = httpx.post(f"{server.url}/v1/{endpoint}", json=body, timeout=30)
    check_error(r, 400, param)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_malformed_body_is_400(server, raw):
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_sent_as_another_content_type_says_so(server, content_type):
    """`curl -d '{...}'` sends form data's Content-Type: the server reads no JSON then, and answered that
    the body 'must be a JSON object' though it was one. The error now names the header and its value."""
    r = httpx.post(f"{server.url}/v1/completions", content=json.dumps(OK_COMPLETION).encode(),
                   headers={"content-type": content_type}, timeout=30)
    err = check_error(r, 400, None)
    assert err["code"] == "invalid_content_type" and content_type in err["message"], err
    assert "application/json" in err["message"], err


def test_a_body_that_is_not_utf8_says_so(server):
    """Was 'There was an error parsing the body', code null (FastAPI's words for a UnicodeDecodeError)."""
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "\xff\xfe"}',
                   headers={"content-type": "application/json"}, timeout=30)
    err = check_error(r, 400, None)
    assert err["code"] == "json_invalid" and "UTF-8" in err["message"] and "0xff" in err["message"], err


def test_a_body_nested_too_deeply_says_so(server):
    """JSON nested past the parser's recursion limit was also 'There was an error parsing the body'."""
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(f"{server.url}/v1/completions", content=deep, headers={"content-type": "application/json"},
                   timeout=30)
    err = check_error(r, 400, None)
    assert err["code"] == "json_invalid" and "nested too deeply" in err["message"], err
    assert httpx.post(f"{server.url}/v1/completions", json=OK_COMPLETION, timeout=60).status_code == 200


def test_unknown_model_is_404_naming_model(server):
    r = httpx.post(f"{server.url}/v1/completions", json=dict(OK_COMPLETION, model="gpt-17"), timeout=30)
    check_error(r, 404, "model")


@pytest.mark.parametrize("body, param, says", [
    ({"prompt": []}, "prompt", "at least 1 item"),  # not "Input should be a valid string"
    ({"prompt": ["a", "b"]}, "prompt", "at most 1 item"),
    ({"prompt": [1.5]}, "prompt.0", "valid integer"),
    ({"prompt": [[]]}, "prompt.0", "at least 1 item"),
])
def test_a_union_field_error_names_the_limit_the_input_broke(server, body, param, says):
    """`prompt` is a string or token ids (or a list of one of either): of the errors pydantic gives,
    one per form, the message is the one about the form the input has."""
    err = check_error(httpx.post(f"{server.url}/v1/completions", json=body, timeout=30), 400, param)
    assert says in err["message"], err


def test_server_keeps_serving_after_bad_requests(server):
    key = 'moe_serve:request_errors_total{model_name="%s",status="400"}' % server.model
    before = server.metrics().get(key, 0.0)
    for endpoint, body, _ in CASES[:10]:
        assert httpx.post(f"{server.url}/v1/{endpoint}", json=body, timeout=30).status_code == 400
    for endpoint, body in (("completions", OK_COMPLETION), ("chat/completions", OK_CHAT)):
        r = httpx.post(f"{server.url}/v1/{endpoint}", json=body, timeout=60)
        assert r.status_code == 200, r.text
    # every error answered is counted once, whether the schema, the handler or the engine refused it
    assert server.metrics().get(key, 0.0) - before == 10


@pytest.mark.parametrize("endpoint, raw, param", [
    ("chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud83d"}], "max_tokens": 2}', "messages"),
    ("chat/completions", '{"messages": [{"role": "system", "content": [{"type": "text", "text": "\\udc00"}]}, '
                         '{"role": "user", "content": "hi"}], "max_tokens": 2}', "messages"),
])
def test_a_lone_surrogate_in_a_message_is_a_400(server, endpoint, raw, param):
    # JSON's \\ud83d without its pair reached the tokenizer, whose TypeError was a 500 "internal error"
    r = httpx.post(f"{server.url}/v1/{endpoint}", content=raw, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "lone surrogate" in err["message"]
    assert httpx.post(f"{server.url}/v1/{endpoint}", json=OK_CHAT, timeout=60).status_code == 200


def test_a_lone_surrogate_in_a_python_prompt_names_it(tiny_dir):
    from moe_serve import LLM, SamplingParams

    with LLM(model=str(tiny_dir)) as llm:
        with pytest.raises(ValueError, match=r"prompts\[1\]: text is not valid Unicode: a lone surrogate"):
            llm.generate(["fine", "bad \ud800"], SamplingParams(max_tokens=2))
        assert llm.generate("fine", SamplingParams(max_tokens=2))[0].finish_reason in ("length", "stop")
