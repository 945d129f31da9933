"""The checkpoint's generation_config.json over HTTP: its temperature and max_new_tokens fill what a
request leaves unset (vLLM's `--generation-config auto`), `--generation-config none` ignores them, and
a bad file stops the server at start-up with one line naming the file and the field.

Two servers on a tiny checkpoint whose generation_config.json asks for greedy decoding and 6 new tokens:
`auto` (the default) and `none`. Seeded sampling at temperature 1 diverges from greedy on this model
within a few tokens, so "greedy" and "temperature 1" outputs tell the two apart.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest

from moe_serve.server.serving import ModelInfo, check_prompt
from tests.engine.tiny_checkpoint import make_tiny_checkpoint
from tests.server.conftest import REPO, Server, started_servers

MAX_NEW_TOKENS = 6
PROMPT = "Once upon a time"


def set_generation_config(model_dir, **fields) -> None:
    path = model_dir / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.fixture(scope="module")
def greedy_default_model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("gen_cfg") / "tiny-greedy-default")
    set_generation_config(path, do_sample=False, temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    return path


@pytest.fixture(scope="module")
def gen_servers(greedy_default_model, tmp_path_factory):
    """{"auto": server, "none": server}: --generation-config auto and none."""
    specs = {mode: ({}, ("--max-num-seqs", "2", "--cpu-threads", "1", "--generation-config", mode))
             for mode in ("auto", "none")}
    with started_servers(greedy_default_model, tmp_path_factory, specs) as started:
        yield started


def complete(server: Server, **body) -> dict:
    r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def chat(server: Server, **body) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": PROMPT}], **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_no_temperature_takes_the_checkpoints_greedy_and_an_explicit_one_wins(gen_servers):
    s = gen_servers["auto"]
    kw = dict(max_tokens=12, ignore_eos=True, seed=7)
    greedy = complete(s, temperature=0, **kw)["choices"][0]["text"]
    assert complete(s, **kw)["choices"][0]["text"] == greedy  # the file's temperature 0
    assert complete(s, temperature=1.0, **kw)["choices"][0]["text"] != greedy  # the request's 1.0


def test_generation_config_none_restores_temperature_1(gen_servers):
    s = gen_servers["none"]
    kw = dict(max_tokens=12, ignore_eos=True, seed=7)
    sampled = complete(s, temperature=1.0, **kw)["choices"][0]["text"]
    assert complete(s, **kw)["choices"][0]["text"] == sampled
    assert complete(s, temperature=0, **kw)["choices"][0]["text"] != sampled


def test_max_new_tokens_caps_a_chat_request_without_max_tokens(gen_servers):
    s = gen_servers["auto"]
    out = chat(s, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == MAX_NEW_TOKENS and out["choices"][0]["finish_reason"] == "length"
    assert chat(s, ignore_eos=True, max_tokens=9)["usage"]["completion_tokens"] == 9
    assert chat(s, ignore_eos=True, max_completion_tokens=8)["usage"]["completion_tokens"] == 8
    # completions keep OpenAI's (and vLLM's) explicit default of 16; an explicit null takes the file's
    assert complete(s, ignore_eos=True)["usage"]["completion_tokens"] == 16
    assert complete(s, ignore_eos=True, max_tokens=None)["usage"]["completion_tokens"] == MAX_NEW_TOKENS
    # without the file's default a chat request may fill the context
    assert chat(gen_servers["none"], ignore_eos=True)["usage"]["completion_tokens"] > MAX_NEW_TOKENS


def test_the_default_max_tokens_is_cut_to_what_fits_the_context():
    info = ModelInfo(name="m", tokenizer=None, max_model_len=256, vocab_size=384, chat_template="",
                     template_vars={}, sampling_defaults={"max_tokens": 128})
    assert check_prompt([1] * 250, None, info, "prompt") == 6
    assert check_prompt([1] * 10, None, info, "prompt") == 128


@pytest.mark.parametrize("text, says", [
    ("{\"temperature\": 0.7,", "not valid JSON"),
    ('{"temperature": -1}', "temperature must be a number in [0, 100], got -1"),
])
def test_a_bad_generation_config_stops_the_server_at_start(greedy_default_model, tmp_path, text, says):
    bad = tmp_path / "bad-model"
    shutil.copytree(greedy_default_model, bad)
    (bad / "generation_config.json").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "moe_serve.server", "--model", str(bad), "--port", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: {bad / 'generation_config.json'}: {says}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_repetition_penalty_defaults_from_the_checkpoint_and_the_request_wins():
    """vLLM takes repetition_penalty from generation_config.json for a request that leaves it unset;
    presence/frequency penalties have no checkpoint default (OpenAI's 0)."""
    from moe_serve.server import protocol as P
    from moe_serve.server.serving import sampling_params

    defaults = {"repetition_penalty": 1.05, "temperature": 0.7}
    unset = sampling_params(P.CompletionRequest(prompt="hi"), 4, defaults)
    assert (unset.repetition_penalty, unset.presence_penalty, unset.frequency_penalty) == (1.05, 0.0, 0.0)
    given = sampling_params(P.CompletionRequest(prompt="hi", repetition_penalty=1.0, presence_penalty=0.5), 4, defaults)
    assert (given.repetition_penalty, given.presence_penalty, given.temperature) == (1.0, 0.5, 0.7)
