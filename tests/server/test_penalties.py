"""presence/frequency/repetition penalties over HTTP: greedy decoding follows transformers' logits with
the formulas applied (tests/engine/test_penalties.py's reference), and bad values name field and range."""
from __future__ import annotations

import httpx
from tokenizers import Tokenizer

from tests.engine.test_logprobs import reference_logits
from tests.engine.test_penalties import reference_penalties
from moe_serve import SamplingParams

PROMPT_IDS = [308, 315, 359, 259, 364, 69]  # "Once upon a time": plain greedy repeats a token


def test_greedy_with_penalties_follows_the_formulas(server, tiny_model):
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    kw = {"presence_penalty": 0.8, "frequency_penalty": 1.2, "repetition_penalty": 1.3}
    assert tok.encode("Once upon a time").ids == PROMPT_IDS
    body = {"prompt": PROMPT_IDS, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    r = httpx.post(server.url + "/v1/completions", json=dict(body, **kw), timeout=30)
    plain = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]
    assert got["logprobs"]["tokens"] != plain["logprobs"]["tokens"]  # the penalties changed the answer
    params, ids = SamplingParams(**kw), []
    for _ in range(8):
        raw = reference_logits(tiny_model, PROMPT_IDS, ids + [0])[-1]
        ids.append(int(reference_penalties(raw, PROMPT_IDS, ids, params).argmax()))
    assert got["logprobs"]["tokens"] == [tok.decode([i], skip_special_tokens=False) for i in ids]
    # logprobs stay raw (before the penalties): the first token's is the model's own log_softmax
    first = reference_logits(tiny_model, PROMPT_IDS, ids[:1])[0].log_softmax(-1)[ids[0]].item()
    assert abs(got["logprobs"]["token_logprobs"][0] - first) < 1e-4


def test_penalty_ranges_are_named(server):
    for field, value, limit in [("presence_penalty", 2.5, "2"), ("frequency_penalty", -2.5, "-2"),
                                ("repetition_penalty", 0.0, "0")]:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], field: value})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == field and limit in err["message"], err
    ok = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "presence_penalty": -2.0,
        "frequency_penalty": 2.0, "repetition_penalty": 0.5})
    assert ok.status_code == 200, ok.text
