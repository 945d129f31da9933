"""Fields users' OpenAI (and vLLM) client code sends, over real HTTP with the `openai` client: logit_bias,
min_tokens, response_format, max_completion_tokens, user; refusals are 400s naming the field, and the
server serves on after them."""
from __future__ import annotations

import httpx
import openai
import pytest

from moe_serve.engine.tokenizer import load_tokenizer
from moe_serve.server.logprobs import TokenTexts

VOCAB = 384  # tests.engine.tiny_checkpoint


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def eos(tiny_model) -> int:
    (eos,) = load_tokenizer(tiny_model).eos_token_ids
    return eos


def chat(client, server, **kw):
    return client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hello"}],
                                          **kw)


def test_logit_bias_forces_and_bans_tokens(server, client, tiny_model):
    prompt = "The quick brown fox"
    plain = client.completions.create(model=server.model, prompt=prompt, max_tokens=5, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True})
    forced = client.completions.create(model=server.model, prompt=prompt, max_tokens=5, temperature=0.8, seed=1,
                                       logprobs=0, logit_bias={"77": 100}, extra_body={"ignore_eos": True})
    texts = TokenTexts(load_tokenizer(tiny_model))
    assert forced.choices[0].logprobs.tokens == [texts(77)] * 5
    first = plain.choices[0].logprobs.tokens[0]
    banned = client.completions.create(model=server.model, prompt=prompt, max_tokens=5, temperature=0, logprobs=0,
                                       logit_bias={str(t): -100 for t in range(VOCAB) if texts(t) == first},
                                       extra_body={"ignore_eos": True})
    assert banned.choices[0].logprobs.tokens[0] != first and banned.usage.completion_tokens == 5
    on_chat = chat(client, server, max_tokens=4, temperature=0, logit_bias={"77": 100}, logprobs=True,
                   extra_body={"ignore_eos": True})
    assert [c.token for c in on_chat.choices[0].logprobs.content] == [texts(77)] * 4


def test_min_tokens_holds_back_the_end(server, client, eos):
    to_eos = {str(eos): 100}  # end-of-sequence is the greedy token at every step
    early = chat(client, server, max_tokens=8, temperature=0, logit_bias=to_eos)
    held = chat(client, server, max_tokens=8, temperature=0, logit_bias=to_eos, extra_body={"min_tokens": 3})
    assert early.usage.completion_tokens == 1 and early.choices[0].finish_reason == "stop"
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, field, words", [
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias", "vocab size 384"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "100"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"-3": 1}}, "logit_bias", "token ids"),
    ({"min_tokens": 9, "max_tokens": 8}, "min_tokens", "max_tokens=8"),
    ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
    ({"response_format": {"type": "json_object"}}, "response_format", "json_object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format",
     "structured"),
    ({"response_format": "text"}, "response_format", "dictionary"),
])
@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_bad_fields_get_a_400_naming_them(server, body, field, words, route):
    base = {"model": server.model, "max_tokens": 2}
    base |= {"prompt": "Hi"} if route == "completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(f"{server.url}/v1/{route}", json=base | body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].split(".")[0] == field and words in err["message"], err
    ok = httpx.post(f"{server.url}/v1/{route}", json=base, timeout=60)  # and it serves on
    assert ok.status_code == 200


def test_text_response_format_user_and_max_completion_tokens_are_taken(server, client):
    out = chat(client, server, max_completion_tokens=3, temperature=0, response_format={"type": "text"},
               user="someone", seed=4, stop=["never-1", "never-2"], extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_null_means_the_default_as_in_openai(server):
    # OpenAI's API takes null for n, stream, echo (bodies built from optional values send it): it was a 400
    chat_body = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                 "n": None, "stream": None, "ignore_eos": None, "min_tokens": None, "add_generation_prompt": None}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat_body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["object"] == "chat.completion"
    r = httpx.post(server.url + "/v1/completions", json={"model": server.model, "prompt": "Hi", "max_tokens": 2,
                                                          "n": None, "echo": None, "stream": None}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and not r.json()["choices"][0]["text"].startswith("Hi")


@pytest.mark.parametrize("field, value, why", [("tools", [{"type": "function", "function": {"name": "f"}}], "tool"),
                                                ("tool_choice", "none", "tool"), ("store", False, "storing"),
                                                ("best_of", 2, "best-of"), ("suffix", "x", "suffix")])
def test_openai_fields_not_implemented_are_refused_as_such(server, field, value, why):
    route = "completions" if field in ("best_of", "suffix") else "chat/completions"
    body = {"model": server.model, "max_tokens": 2}
    body |= {"prompt": "Hi"} if route == "completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(f"{server.url}/v1/{route}", json=body | {field: value}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == field
    assert "not supported by this server" in err["message"] and why in err["message"], err
    r = httpx.post(f"{server.url}/v1/{route}", json=body | {"no_such_field": 1}, timeout=60)
    assert r.status_code == 400 and "not part of the API" in r.json()["error"]["message"]


def test_models_retrieve_answers_for_the_served_model(server, client):
    # GET /v1/models/{id} (the client's models.retrieve) had no route: a 404 for the served model too
    card = client.models.retrieve(server.model)
    assert card.id == server.model and card.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("org/other-model")
    assert err.value.body["param"] == "model" and "org/other-model" in err.value.body["message"]
