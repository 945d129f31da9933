"""The shipped default model: transformers loads it, it is small, and it has learned the corpus.

Held-out text is rebuilt from `../shared/corpus` with the split rule of training/data.py (the last 2%
of every file from the first line break after the cut); training never saw it.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "moe_serve" / "default_model"
HELDOUT_FRACTION = 0.02  # must match training/data.py
FILES = ("python311_docs.txt", "c4_sample.txt", "wikipedia_sample.txt")
SEQ, WINDOWS_PER_FILE = 256, 3


@pytest.fixture(scope="module")
def model_and_tok():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    # fp32 compute: this CPU has no native bf16 matmul; the weights are the shipped bf16 values upcast.
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    return model, tok


def heldout_text(corpus: Path, name: str) -> str:
    text = (corpus / name).read_text(encoding="utf-8")
    nl = text.find("\n", int(len(text) * (1.0 - HELDOUT_FRACTION)))
    return text[nl + 1 :]


def test_checkpoint_files_and_size():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert cfg.get("num_experts", cfg.get("num_local_experts")) == 8 and cfg["num_experts_per_tok"] == 2
    assert cfg["eos_token_id"] is not None and cfg["bos_token_id"] is not None
    assert cfg["max_position_embeddings"] >= 1024
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (MODEL_DIR / f).is_file(), f
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert size <= 25 * 2**20, f"default model directory is {size / 2**20:.1f} MiB, limit 25 MiB"
    from safetensors import safe_open

    with safe_open(MODEL_DIR / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}


def test_tokenizer_round_trip_and_chat_template(model_and_tok):
    _, tok = model_and_tok
    text = "def main():\n    print('Grüße, 世界')  # ünïcode\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nHi\n<|assistant|>\n"


@pytest.fixture(scope="module")
def heldout_forward(model_and_tok, shared_dir):
    """x: (files * WINDOWS_PER_FILE, SEQ + 1) held-out token windows; out: the model's forward on them."""
    model, tok = model_and_tok
    windows = []
    for name in FILES:
        ids = tok.encode(heldout_text(shared_dir / "corpus", name)[:60_000], add_special_tokens=False)
        step = (len(ids) - SEQ - 1) // WINDOWS_PER_FILE
        windows += [ids[i * step : i * step + SEQ + 1] for i in range(WINDOWS_PER_FILE)]
    x = torch.tensor(windows)
    with torch.no_grad():
        out = model(input_ids=x[:, :-1], output_router_logits=True)
    return x, out


def test_heldout_perplexity_beats_baselines(model_and_tok, heldout_forward):
    """Next-token loss on unseen text must be far below the uniform-vocab baseline (ln V) and below
    the held-out text's own unigram entropy (a baseline that even sees the test distribution)."""
    model, _ = model_and_tok
    x, out = heldout_forward
    logits = out.logits  # (n, SEQ, vocab)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()
    counts = Counter(x[:, 1:].reshape(-1).tolist())
    n = sum(counts.values())
    unigram = -sum(c / n * math.log(c / n) for c in counts.values())
    uniform = math.log(model.config.vocab_size)
    print(f"held-out loss {loss:.3f} (ppl {math.exp(loss):.1f}); unigram {unigram:.3f}; uniform {uniform:.3f}")
    # Shipped model: ~5.3 nats (ppl ~200, vocab 4096); an untrained one scores >= ln V = 8.3.
    assert loss < uniform - 2.5, (loss, uniform)
    assert loss < unigram - 0.4, (loss, unigram)


def test_routing_uses_every_expert(model_and_tok, heldout_forward):
    """Routing is specialized but not collapsed: on mixed held-out text every expert of every layer
    gets >= 0.5% of the top-k picks and none gets more than half (the mean share is 1/experts)."""
    model, _ = model_and_tok
    k, e = model.config.num_experts_per_tok, model.config.num_experts
    for layer, rl in enumerate(heldout_forward[1].router_logits):  # rl: (tokens, experts)
        share = torch.bincount(rl.topk(k, dim=-1).indices.reshape(-1), minlength=e).float() / (rl.shape[0] * k)
        print(f"layer {layer} expert shares {[round(v, 3) for v in share.tolist()]}")
        assert share.min() >= 0.005 and share.max() <= 0.5, f"layer {layer} expert shares {share.tolist()}"


def test_generation_is_not_degenerate(model_and_tok, shared_dir):
    """Sampled text is varied (no loops) and made of real words: most of its words occur in the corpus,
    which random-token output (an untrained model) fails."""
    model, tok = model_and_tok
    prompt = "The Python standard library provides"
    x = tok(prompt, return_tensors="pt").input_ids
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=48, do_sample=True, temperature=0.7, top_k=40,
                             pad_token_id=tok.pad_token_id)
    new = out[0, x.shape[1] :].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    print(repr(prompt + text))
    assert len(new) >= 16
    top_share = Counter(new).most_common(1)[0][1] / len(new)
    assert top_share < 0.3, f"one token is {top_share:.0%} of the output: {text!r}"
    assert len(set(new)) >= 0.4 * len(new), text
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    assert letters >= 0.6 * len(text), text
    corpus_head = (shared_dir / "corpus" / FILES[0]).read_text(encoding="utf-8")[:3_000_000]
    known = set(re.findall(r"[a-z]+", corpus_head.lower()))
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 8, text
    real = sum(w in known for w in words) / len(words)
    assert real >= 0.8, f"only {real:.0%} of generated words occur in the corpus: {text!r}"
