"""logprobs over HTTP: completions' `logprobs: N` and chat's `logprobs` + `top_logprobs`, streamed and
not, in OpenAI's shapes; the values are the log_softmax of the model's logits (transformers' forward
pass over the same prefix, computed here)."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.engine.test_logprobs import reference_logprobs

PROMPT_IDS = [5, 17, 42, 99, 7]


def stream_events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=dict(body, stream=True), timeout=30) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completion_logprobs_are_the_models_log_softmax(server, tiny_model):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    body = {"prompt": PROMPT_IDS, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 3}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    # greedy: the reference continuation is its own argmax, which the server's tokens must be
    ids, ref = list(PROMPT_IDS), []
    for _ in range(6):
        step = reference_logprobs(tiny_model, ids, [0])[0]
        ref.append(step)
        ids.append(int(step.argmax()))
    out_ids = ids[len(PROMPT_IDS):]
    assert lp["tokens"] == [tok.decode([i], skip_special_tokens=False) for i in out_ids]
    full = reference_logprobs(tiny_model, PROMPT_IDS, out_ids)  # one pass over the whole prefix
    assert torch.allclose(full, torch.stack(ref), atol=1e-4)
    for t, i in enumerate(out_ids):
        assert lp["token_logprobs"][t] == pytest.approx(full[t, i].item(), abs=1e-4)
        top_v, top_i = full[t].topk(3)
        texts = [tok.decode([j], skip_special_tokens=False) for j in top_i.tolist()]
        for text, v in zip(texts, top_v.tolist()):
            if texts.count(text) == 1:  # two ids may decode to the same text (a partial UTF-8 byte)
                assert lp["top_logprobs"][t][text] == pytest.approx(v, abs=1e-4)
        assert lp["tokens"][t] in lp["top_logprobs"][t]  # the sampled token is always there
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(s) for a, b, s in zip(offsets, offsets[1:], lp["tokens"]))


def test_completion_logprobs_streamed_match_the_whole_answer(server):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 3, "ignore_eos": True,
            "logprobs": 0}
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["logprobs"]
    assert all(len(d) == 1 for d in whole["top_logprobs"])  # logprobs 0: the sampled token only
    events = stream_events(server, "/v1/completions", body)
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        lp = e["choices"][0]["logprobs"]
        if lp is not None:
            for k in merged:
                merged[k] += lp[k]
    assert merged == whole


def test_chat_logprobs_and_top_logprobs(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 1.0, "seed": 11,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 4}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] == 5
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True) and entry["logprob"] <= tops[0] + 1e-6
        assert sum(2.718281828459045 ** v for v in tops) <= 1.0 + 1e-5
    events = stream_events(server, "/v1/chat/completions", body)
    streamed = [c for e in events for ch in e["choices"] if ch.get("logprobs") for c in ch["logprobs"]["content"]]
    assert streamed == content
    plain = httpx.post(server.url + "/v1/chat/completions", json=dict(body, logprobs=False, top_logprobs=None),
                       timeout=30).json()
    assert plain["choices"][0]["logprobs"] is None
    only = httpx.post(server.url + "/v1/chat/completions", json=dict(body, top_logprobs=None), timeout=30).json()
    assert [e["top_logprobs"] for e in only["choices"][0]["logprobs"]["content"]] == [[]] * 5


def test_logprobs_limit_is_named(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "logprobs": 21}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    assert "20" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 50})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs" and "20" in r.json()["error"]["message"]


def test_chat_logprob_bytes_are_the_tokens_own_even_inside_a_character(server, tiny_model):
    """A token holding part of a multi-byte character shows as U+FFFD in `token`; its `bytes` are its
    real UTF-8 bytes (the vocabulary's byte-level spelling), so the content's bytes rebuild the text."""
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    spelled = {piece: list(bytes(byte_of[c] for c in piece)) for piece in tok.get_vocab()
               if all(c in byte_of for c in piece)}
    body = {"messages": [{"role": "user", "content": "日本語 ✓ café"}], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 20}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    entries = content + [t for e in content for t in e["top_logprobs"]]
    partial = [e for e in entries if e["token"] == "\ufffd"]
    assert partial, "no token inside a character among 12 x 20 candidates: pick another prompt"
    spellings_of: dict[str, list] = {}  # token text -> the bytes of every token that shows as it
    for piece, i in tok.get_vocab().items():
        spellings_of.setdefault(tok.decode([i], skip_special_tokens=False), []).append(spelled.get(piece))
    for e in entries:
        assert e["bytes"] in spellings_of[e["token"]], e
    for e in partial:
        assert e["bytes"] != list("\ufffd".encode()) and len(e["bytes"]) < 4  # not the replacement's bytes
    rebuilt = b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", errors="replace")
    assert rebuilt == choice["message"]["content"]


def test_token_texts_keep_the_space_a_sentencepiece_token_carries(tmp_path):
    """Decoded alone, a Llama/Mixtral-style token loses its leading space (the decoder's Strip), so
    completions' `tokens` read 'hi', 'wo' and `text_offset` drifted one character per word from the
    text ' hi wo'; chat's `token` likewise. A token's text is now its bytes' (as it reads in a text)."""
    from moe_serve.engine.logprobs import TokenLogprob
    from moe_serve.engine.tokenizer import load_tokenizer
    from moe_serve.server.logprobs import TokenTexts, chat_logprobs, completion_logprobs
    from tests.engine.test_token_bytes import sentencepiece_style_dir

    tok = load_tokenizer(sentencepiece_style_dir(tmp_path))
    ids = tok.encode("hi wo")
    lps = [TokenLogprob(token_id=t, logprob=-1.0, rank=1, top=[(t, -1.0)]) for t in ids]
    legacy = completion_logprobs(lps, TokenTexts(tok), 0)
    assert legacy.tokens == [" hi", " wo"] and legacy.text_offset == [0, 3]
    assert [e.token for e in chat_logprobs(lps, TokenTexts(tok)).content] == [" hi", " wo"]
