"""Train moe-serve's default model: a small Qwen3-MoE LM with its own byte-level BPE tokenizer.

One command rebuilds `moe_serve/default_model/` from `../shared/corpus` on a CPU (see README.md).
Deterministic for a given seed and thread count, unless the `--minutes` wall-clock guard stops
training before `--steps` (the report then says so).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.data import (CORPUS_FILES, SOURCE_WEIGHTS, HELDOUT_FRACTION, SPECIAL_TOKENS, WindowSampler,
                           corpus_fingerprint, encode_stream, heldout_windows, read_corpus, train_tokenizer,
                           write_json)
from training.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    # every flag says its default (the formatter adds it); those defaults made the shipped checkpoint
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", type=Path, default=REPO / ".." / "shared" / "corpus",
                   help=f"directory holding the corpus files ({', '.join(CORPUS_FILES)})")
    p.add_argument("--out", type=Path, default=REPO / "moe_serve" / "default_model",
                   help="checkpoint directory to write: new, empty, or one this command wrote before")
    p.add_argument("--work", type=Path, default=Path("/tmp/moe_default_work"), help="tokenized data cache + checkpoints")
    p.add_argument("--seed", type=int, default=1234, help="seed of model init, window sampling and file choice")
    p.add_argument("--threads", type=int, default=1, help="1 beats 2 on a shared 2-core box (measured 5x)")
    p.add_argument("--minutes", type=float, default=24.0, help="wall-clock guard for the training loop")
    p.add_argument("--steps", type=int, default=520, help="optimizer steps (cosine schedule length)")
    p.add_argument("--calibrate", type=int, default=0, help="run this many steps, print tokens/s, save nothing")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32", help="autocast dtype for the forward")
    # model
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary (>= 256 bytes + 5 special tokens)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (every one MoE)")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA; divides --heads)")
    p.add_argument("--head-dim", type=int, default=32, help="dimension of each attention head")
    p.add_argument("--experts", type=int, default=8, help="routed experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="experts each token is routed to")
    p.add_argument("--moe-inter", type=int, default=256, help="intermediate size of each expert")
    p.add_argument("--max-pos", type=int, default=2048, help="max_position_embeddings (> --seq-len)")
    # optimization
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training row (windows of seq-len + 1)")
    p.add_argument("--batch", type=int, default=8, help="rows per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine's final lr, as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (weight matrices, not embeddings)")
    p.add_argument("--aux-coef", type=float, default=0.1, help="weight of the load-balancing loss")
    p.add_argument("--tok-sample-chars", type=int, default=3_000_000, help="chars per file to train the BPE on")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between ckpt.pt saves in --work")
    return p


def parse_args(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    for message in bad_args(a):
        p.error(message)  # exit code 2, before the corpus is read or anything is written
    return a


# (flag, lowest value); --min-lr-ratio also has a highest (1)
AT_LEAST = (("--steps", 1), ("--batch", 1), ("--seq-len", 1), ("--hidden", 1), ("--layers", 1), ("--heads", 1),
            ("--kv-heads", 1), ("--head-dim", 1), ("--experts", 1), ("--top-k", 1), ("--moe-inter", 1),
            ("--max-pos", 2), ("--log-every", 1), ("--ckpt-every", 1), ("--threads", 1), ("--tok-sample-chars", 1),
            ("--calibrate", 0), ("--warmup", 0), ("--lr", 0), ("--weight-decay", 0), ("--aux-coef", 0),
            ("--min-lr-ratio", 0))


def bad_args(a) -> list[str]:
    """What is wrong with the options, each naming its flag and the limit (a 0 or negative count used to
    fail deep in torch or after the tokenizer was built: --steps 0 ended in an UnboundLocalError)."""
    bad = []
    for flag, low in AT_LEAST:
        value = getattr(a, flag[2:].replace("-", "_"))
        if not value >= low:
            bad.append(f"{flag} must be >= {low}, got {value}")
    if not a.minutes > 0:
        bad.append(f"--minutes must be > 0, got {a.minutes}")
    if a.min_lr_ratio > 1:
        bad.append(f"--min-lr-ratio must lie in [0, 1], got {a.min_lr_ratio}")
    if a.top_k > a.experts:
        bad.append(f"--top-k {a.top_k} exceeds --experts {a.experts}")
    if a.heads % max(a.kv_heads, 1):
        bad.append(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    if a.seq_len + 1 > a.max_pos:
        bad.append(f"--seq-len {a.seq_len} needs --max-pos >= {a.seq_len + 1}, got {a.max_pos}")
    alphabet = 256 + len(SPECIAL_TOKENS)  # byte-level BPE: every byte, and the special tokens, has an id
    if a.vocab_size < alphabet:
        bad.append(f"--vocab-size must be >= {alphabet} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {a.vocab_size}")
    missing = [n for n in CORPUS_FILES if not (a.corpus / n).is_file()]
    if missing:
        bad.append(f"--corpus {a.corpus} lacks {', '.join(missing)} (it needs all of {', '.join(CORPUS_FILES)})")
    if a.work.exists() and not a.work.is_dir():  # was: an OSError from mkdir once the tokenizer was trained
        bad.append(f"--work {a.work} is a file, not a directory")
    if a.out.exists() and (not a.out.is_dir() or (any(a.out.iterdir()) and not (a.out / "training_info.json").is_file())):
        # export() empties --out first: only a directory this command wrote before (or an empty one) may be
        bad.append(f"--out {a.out} is not empty and holds no training_info.json (no model this command wrote): "
                   "its files would be deleted; give a new or empty directory")
    return bad


def build_config(a, tok):
    from transformers import Qwen3MoeConfig

    eos = tok.convert_tokens_to_ids(tok.eos_token)
    return Qwen3MoeConfig(
        vocab_size=a.vocab_size, hidden_size=a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
        intermediate_size=4 * a.hidden, moe_intermediate_size=a.moe_inter, num_experts=a.experts,
        num_experts_per_tok=a.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=a.max_pos, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, router_aux_loss_coef=a.aux_coef, output_router_logits=False,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=tok.pad_token_id, use_cache=True,
        architectures=["Qwen3MoeForCausalLM"],
    )


def prepare(a):
    """Tokenizer + uint16 token streams per file (cached in --work, keyed by vocab size, sample and corpus)."""
    from transformers import PreTrainedTokenizerFast

    t0 = time.time()
    corpus = read_corpus(a.corpus)
    # keyed by the corpus's content too: another --corpus with the same --work reused the first one's tokens
    cache = a.work / f"data_v{a.vocab_size}_s{a.tok_sample_chars}_{corpus_fingerprint(corpus)}"
    streams = [cache / f"{n}.{part}.npy" for n in CORPUS_FILES for part in ("train", "heldout")]
    if all(f.is_file() for f in [cache / "tokenizer.json", *streams]):  # a run stopped midway left only some
        tok = PreTrainedTokenizerFast.from_pretrained(cache)
        train = {n: np.load(cache / f"{n}.train.npy") for n in CORPUS_FILES}
        held = {n: np.load(cache / f"{n}.heldout.npy") for n in CORPUS_FILES}
    else:
        tok = train_tokenizer({n: c[0] for n, c in corpus.items()}, a.vocab_size, a.tok_sample_chars)
        print(f"tokenizer trained in {time.time() - t0:.1f}s", flush=True)
        train = {n: encode_stream(tok, c[0]) for n, c in corpus.items()}
        held = {n: encode_stream(tok, c[1]) for n, c in corpus.items()}
        cache.mkdir(parents=True, exist_ok=True)
        for n in CORPUS_FILES:
            np.save(cache / f"{n}.train.npy", train[n])
            np.save(cache / f"{n}.heldout.npy", held[n])
        tok.save_pretrained(cache)  # last: the cache is whole once tokenizer.json is there
    for n in CORPUS_FILES:
        chars = len(corpus[n][0])
        print(f"  {n}: {len(train[n]):,} train tokens ({chars / len(train[n]):.2f} chars/token), "
              f"{len(held[n]):,} held-out tokens", flush=True)
    print(f"data ready in {time.time() - t0:.1f}s", flush=True)
    return tok, train, held


def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, a):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def train_step(model, opt, x, a, autocast_dtype):
    """One optimizer step on x: (batch, seq_len + 1). Returns (lm loss, aux loss) as floats."""
    inp, tgt = x[:, :-1], x[:, 1:]
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(input_ids=inp, output_router_logits=True, use_cache=False)
    ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), tgt.reshape(-1))
    loss = ce + a.aux_coef * out.aux_loss.float()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return ce.item(), out.aux_loss.item()


def export(model, tok, a, out: Path, info: dict):
    """Write the bf16 Hugging Face checkpoint + tokenizer + generation config + training_info.json."""
    from transformers import GenerationConfig

    # written beside --out, then swapped in: a write failing midway (disk full) leaves the previous model
    # (by default the shipped one) whole, not an emptied or half-written directory
    out = Path(out).resolve()  # '.' has no name to put beside
    part = out.with_name(f".{out.name}.part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    try:
        model16 = model.to(torch.bfloat16)
        model16.config.dtype = torch.bfloat16
        model16.save_pretrained(part, safe_serialization=True)
        tok.save_pretrained(part)
        eos = model.config.eos_token_id
        GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=model.config.pad_token_id, do_sample=True,
                         temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=128).save_pretrained(part)
        write_json(part / "training_info.json", info)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*"):  # a model this command wrote before (parse_args refused any other directory)
        if f.is_file():
            f.unlink()
    for f in part.iterdir():
        os.replace(f, out / f.name)
    part.rmdir()


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from transformers import Qwen3MoeForCausalLM

    try:
        tok, train, held = prepare(a)
    except (ValueError, OSError) as exc:  # a corpus file that cannot be read: one line, not a traceback
        print(f"train_default: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    short = [f"{n} has {len(train[n])} training and {len(held[n])} held-out tokens" for n in CORPUS_FILES
             if len(train[n]) < a.seq_len + 2 or len(held[n]) < a.seq_len + 1]
    if short:  # a window is seq_len + 1 tokens (WindowSampler failed in torch.randint; heldout_windows in stack)
        print(f"train_default: error: --seq-len {a.seq_len} needs windows of {a.seq_len + 1} tokens from every corpus "
              f"file's training and held-out parts: {'; '.join(short)}", file=sys.stderr)
        raise SystemExit(2)
    config = build_config(a, tok)
    model = Qwen3MoeForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,} ({n_params * 2 / 2**20:.1f} MiB in bf16)", flush=True)
    opt = make_optimizer(model, a)
    sampler = WindowSampler(train, a.seq_len, a.seed)
    autocast_dtype = torch.bfloat16 if a.dtype == "bf16" else None
    steps = a.calibrate or a.steps
    tokens_per_step = a.batch * a.seq_len
    t_train, stopped_early, history = time.time(), False, []
    ce_ema = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        ce, aux = train_step(model, opt, sampler.batch(a.batch), a, autocast_dtype)
        ce_ema = ce if ce_ema is None else 0.95 * ce_ema + 0.05 * ce
        elapsed = time.time() - t_train
        if (step + 1) % a.log_every == 0 or step == 0 or step + 1 == steps:
            tps = (step + 1) * tokens_per_step / elapsed
            print(f"step {step + 1}/{steps} ce {ce:.3f} ema {ce_ema:.3f} aux {aux:.3f} lr {lr_at(step, a):.2e} "
                  f"{tps:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
            history.append({"step": step + 1, "ce": round(ce, 4), "ce_ema": round(ce_ema, 4), "aux": round(aux, 4)})
        if not a.calibrate and (step + 1) % a.ckpt_every == 0:
            torch.save({"step": step + 1, "model": model.state_dict()}, a.work / "ckpt.pt")
        if elapsed > a.minutes * 60:
            stopped_early = step + 1 < steps
            print(f"wall-clock guard: stopping after step {step + 1}/{steps}", flush=True)
            break
    steps_done = step + 1
    train_s = time.time() - t_train
    if a.calibrate:
        print(f"calibration: {steps_done * tokens_per_step / train_s:.0f} tokens/s ({a.dtype})", flush=True)
        return
    model.eval()
    model = model.to(torch.bfloat16)
    ev = evaluate(model, heldout_windows(held, a.seq_len, per_file=16))
    print(f"held-out (bf16 model): loss {ev['loss']:.3f} ppl {ev['ppl']:.1f} "
          f"(uniform baseline ln V = {math.log(a.vocab_size):.3f})", flush=True)
    for l, counts in enumerate(ev["expert_tokens"]):
        print(f"  layer {l} tokens/expert: {counts}", flush=True)
    info = {
        "command": "python -m training.train_default " + " ".join(argv or sys.argv[1:]),
        "corpus_files": list(CORPUS_FILES), "source_weights": SOURCE_WEIGHTS, "heldout_fraction": HELDOUT_FRACTION,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "params": n_params, "steps_done": steps_done, "steps_planned": a.steps, "stopped_by_wall_clock": stopped_early,
        "tokens_trained": steps_done * tokens_per_step, "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1), "final_train_ce_ema": round(ce_ema, 4),
        "heldout": ev, "loss_history": history, "machine": "2-core CPU (shared)",
    }
    export(model, tok, a, a.out, info)
    print(f"saved {a.out} in {time.time() - t_start:.0f}s total", flush=True)


if __name__ == "__main__":
    main()
