"""Chat prompts are tokenized without adding special tokens the checkpoint's template already wrote.

A Llama/Mixtral-style tokenizer adds a BOS to every encoded text, and their chat templates begin with
`{{ bos_token }}`: encoding the rendered chat with special tokens gave two BOS (transformers'
`apply_chat_template(tokenize=True)` and vLLM give one). Over HTTP on a tiny checkpoint whose
tokenizer adds `<s>` and whose template writes it; completion prompts still get the tokenizer's BOS.
"""
from __future__ import annotations

import json

import httpx
import pytest
from tokenizers import processors

from moe_serve.engine.tokenizer import load_tokenizer
from moe_serve.server.chat import FALLBACK_TEMPLATE, render_chat, template_writes_special_tokens
from tests.engine.tiny_checkpoint import make_tiny_checkpoint, train_tokenizer
from tests.server.conftest import started_servers

TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    """The tiny Mixtral with a tokenizer whose post-processor prepends <s> (as Llama's does)."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("bos") / "tiny-bos")
    tok = train_tokenizer(384)
    bos = tok.token_to_id("<|endoftext|>")  # a special token of the vocabulary, used as the BOS
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<|endoftext|>"}))
    return path, bos


@pytest.fixture(scope="module")
def bos_server(bos_model, tmp_path_factory):
    path, _ = bos_model
    with started_servers(path, tmp_path_factory, {"bos": ({}, ("--max-num-seqs", "1", "--cpu-threads", "1"))}) as s:
        yield s["bos"]


def test_encode_adds_the_bos_only_when_asked(bos_model):
    path, bos = bos_model
    tok = load_tokenizer(path)
    with_bos, without = tok.encode("fox"), tok.encode("fox", add_special_tokens=False)
    assert with_bos == [bos] + without and bos not in without


def test_only_the_fallback_template_lets_the_tokenizer_add_special_tokens():
    assert template_writes_special_tokens(TEMPLATE)
    assert not template_writes_special_tokens(FALLBACK_TEMPLATE)


def test_chat_prompt_starts_with_one_bos_and_completion_prompts_keep_theirs(bos_model, bos_server):
    path, bos = bos_model
    tok = load_tokenizer(path)
    rendered = render_chat(MESSAGES, TEMPLATE, {"bos_token": "<|endoftext|>"})
    single = tok.encode(rendered, add_special_tokens=False)
    assert single[0] == bos and single[1] != bos  # the template's own BOS, once
    r = httpx.post(bos_server.url + "/v1/chat/completions",
                   json={"messages": MESSAGES, "max_tokens": 1, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(single)  # the old code counted len(single) + 1
    r = httpx.post(bos_server.url + "/v1/completions",
                   json={"prompt": "The quick brown fox", "max_tokens": 1, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("The quick brown fox"))
    assert len(tok.encode("The quick brown fox")) == len(tok.encode("The quick brown fox", add_special_tokens=False)) + 1
