"""Expert prediction with hidden states: the router-on-hidden predictor vs routing-only predictors.

Records a routing trace WITH hidden states through the engine's own recorder (`record_hidden`), from
the project's default model when it is present (moe_serve/default_model): the two domains are text
chunks of ../shared/corpus (Wikipedia and the Python docs). Without it, a tiny random OLMoE checkpoint
written with transformers, prompted with token ids from the two halves of its vocabulary (said so in
the output). Predictors are fitted on one domain and measured on the other, both directions. The
router predictor `router_ckpt` takes the checkpoint's own router weights; `router` estimates them.
`mlp_ckpt` / `mlp_online_ckpt`: the history MLP with a direct hidden-state map started from those
routers; `mlp_online*` keep learning from the test stream prequentially (a chunk of 64 tokens is
predicted before the predictor observes it; see predictors/online.py). `mlp_online_ckpt` takes two
AdamW steps of 256 rows per chunk (the default is one of 128): updates of this 4-layer model are cheap.

    python benches/predictor_hidden.py [--prompts 24] [--max-tokens 48] [--lookahead 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_serve.config import DEFAULT_MODEL  # noqa: E402
from moe_serve.engine.llm import LLM  # noqa: E402
from moe_serve.engine.sampling_params import SamplingParams  # noqa: E402
from predictors.compare import compare, format_table  # noqa: E402
from predictors.evaluate import evaluate, online_cost  # noqa: E402
from predictors.registry import make_predictor  # noqa: E402
from predictors.router import HiddenLinearPredictor, RouterPredictor, router_weights_from_checkpoint  # noqa: E402
from predictors.traces import load_trace  # noqa: E402


ONLINE_CKPT = {"online_steps": 2, "online_batch": 256}


def tiny_olmoe(path: Path, layers: int, experts: int, top_k: int) -> Path:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=experts, num_experts_per_tok=top_k,
                      max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    OlmoeForCausalLM(cfg).save_pretrained(path)
    return path


def text_chunks(path: Path, n: int, chars: int, rng) -> list[str]:
    """n chunks of about `chars` characters from random places of a text file, cut at spaces."""
    text = path.read_text(errors="replace")
    out = []
    for start in rng.integers(0, max(len(text) - 2 * chars, 1), n):
        piece = text[start : start + chars]
        out.append(piece[piece.find(" ") + 1 :])
    return out


def record(model: Path, prompts: list[list[int]], max_tokens: int, out: Path):
    with LLM(str(model), record_trace=str(out), record_hidden=True) as llm:
        llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=0, ignore_eos=True))
    return load_trace(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=32, help="token ids per prompt (random-model fallback)")
    ap.add_argument("--prompt-chars", type=int, default=1200, help="characters per corpus prompt")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--lookahead", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="keep the recorded traces here; reuse them when present")
    ap.add_argument("--mlp-epochs", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "benches" / "results" / "predictor_hidden.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="predhidden-"))
    tmp.mkdir(parents=True, exist_ok=True)
    default = Path(DEFAULT_MODEL)
    if (default / "config.json").exists():
        model, source = default, "project default model (moe_serve/default_model)"
    else:
        model, source = tiny_olmoe(tmp / "olmoe", layers=8, experts=32, top_k=4), "tiny random OLMoE (8 layers, 32 experts, top-4, hidden 128)"
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    rng = np.random.default_rng(0)
    corpus = REPO / ".." / "shared" / "corpus"
    if model == default and corpus.is_dir():
        domains = {d: text_chunks(corpus / f, args.prompts, args.prompt_chars, rng)
                   for d, f in (("wikipedia", "wikipedia_sample.txt"), ("python_docs", "python311_docs.txt"))}
    else:
        domains = {d: [rng.integers(lo, hi, args.prompt_len).tolist() for _ in range(args.prompts)]
                   for d, (lo, hi) in (("low_vocab", (3, vocab // 2)), ("high_vocab", (vocab // 2, vocab)))}
    traces, trace_files = {}, {}
    for dom, prompts in domains.items():
        t0 = time.time()
        path = tmp / f"{dom}.npz"
        reused = path.exists()
        traces[dom] = load_trace(path) if reused else record(model, prompts, args.max_tokens, path)
        trace_files[dom] = dict(path=str(path), reused=reused, recorded=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(path.stat().st_mtime)),
                                model_saved=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime((model / "config.json").stat().st_mtime)))
        print(f"recorded {dom}: {traces[dom].num_tokens} tokens, hidden {traces[dom].hidden.shape} in {time.time() - t0:.1f}s", flush=True)
    (a, b), ref = list(traces), next(iter(traces.values()))
    routers = router_weights_from_checkpoint(model, ref.num_experts)
    report = dict(model=source, started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), directions={},
                  load_average_start=os.getloadavg(), threads=args.threads, traces=trace_files)
    for src, dst in ((a, b), (b, a)):
        print(f"\n== fit on {src}, measure on {dst} ({source}) ==", flush=True)
        names = ["popularity", "transition", "prev_token", "router", "hidden_linear", "mlp", "mlp_online"]
        mlp_params = {"epochs": args.mlp_epochs}
        res = compare([traces[src]], [traces[dst]], names, args.lookahead, params={"mlp": mlp_params, "mlp_online": mlp_params},
                      log=lambda s: print(s, file=sys.stderr, flush=True))
        for name, make in (
            ("router_ckpt", lambda la: RouterPredictor.from_router_weights(routers, ref.top_k, la)),
            ("hidden_linear_ckpt", lambda la: HiddenLinearPredictor.from_router_weights(routers, ref.top_k, la)),
            ("mlp_ckpt", lambda la: make_predictor("mlp", ref.num_layers, ref.num_experts, ref.top_k, la, **mlp_params).with_router_weights(routers)),
            ("mlp_online_ckpt", lambda la: make_predictor(
                "mlp_online", ref.num_layers, ref.num_experts, ref.top_k, la, **mlp_params, **ONLINE_CKPT).with_router_weights(routers)),
        ):
            entry = {}
            for la, tag in ((args.lookahead, ""), (0, "_next_token")):
                t0 = time.perf_counter()
                pred = make(la).fit([traces[src]])
                entry["fit_s" + tag] = time.perf_counter() - t0
                ev = evaluate(pred, [traces[dst]], res["budget"])
                entry["predict_s" + tag] = ev.pop("predict_s")
                if "observe_s" in ev:
                    entry["observe_s" + tag] = ev.pop("observe_s")
                    entry["prequential"] = True
                    entry["params"] = ONLINE_CKPT
                entry["predict_ms_b64" + tag] = online_cost(pred, traces[dst])
                entry.update(ev)
            res["results"][name] = entry
        print(format_table(res), flush=True)
        report["directions"][f"{src}->{dst}"] = res
    report["load_average_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
