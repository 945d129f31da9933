"""Where the prefetch predictor learns online: in the decode step (inline) or on a worker thread
(background, `moe_serve/experts/learner.py`), side by side in one process.

The host side of a batch-1 offloaded decode of DeepSeek-V2-Lite, driven by the real routing of the
summary trace: per token, the cache policy's predictor call after each of the 26 MoE routers
(mlp_online fitted briefly on part of the intent trace, lookahead --lookahead), then the device's compute for the
token, emulated by a sleep of --device-ms (the host thread waits on the GPU there and holds no GIL,
as in a CUDA synchronize). Every 64 tokens the routing of those tokens goes to the learner: inline,
the step runs `online_steps` AdamW steps before the next token; background, it queues them.

Reported per configuration: token time p50 / p99 / max (ms), the tokens whose time exceeds 1.5x
the median (the hiccups), and the learning rounds done. Torch runs on --threads threads. The load
average is recorded before and after (a busy machine widens every percentile).

    python benches/predictor_learning.py [--tokens 640] [--device-ms 6.5] [--steps 1,8]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_serve.experts.learner import BackgroundLearner  # noqa: E402
from predictors.base import RoutingState, trace_tensors  # noqa: E402
from predictors.registry import make_predictor  # noqa: E402
from predictors.traces import load_trace  # noqa: E402

TRACES = REPO.parent / "shared" / "traces"
CHUNK = 64


def decode(predictor, learner, trace, tokens: int, device_ms: float) -> dict:
    """Token-by-token host loop; returns per-token wall times (ms) and what was learned."""
    tensors = trace_tensors(trace)  # experts, weights, prev experts, prev weights [T, L, K]
    L = trace.num_layers
    # built before the clock starts: the runtime's routing hook has each state at hand
    states = [[RoutingState.from_trace(trace, layer, np.array([t])) for layer in range(L)] for t in range(tokens)]
    times = []
    with torch.inference_mode():
        for t in range(tokens):
            start = time.perf_counter()
            for layer in range(L):
                predictor.predict(states[t][layer], layer)
            time.sleep(device_ms / 1e3)
            if (t + 1) % CHUNK == 0 and learner is not None:
                done = slice(t + 1 - CHUNK, t + 1)
                with torch.inference_mode(False):
                    learner.observe(*(x[done].clone() for x in tensors))
            times.append((time.perf_counter() - start) * 1e3)
    if isinstance(learner, BackgroundLearner):
        learner.flush(timeout=600)
        learner.close()
    times = np.array(times)
    med = float(np.median(times))
    return dict(p50_ms=med, p99_ms=float(np.percentile(times, 99)), max_ms=float(times.max()),
                mean_ms=float(times.mean()), hiccups=int((times > 1.5 * med).sum()),
                rounds=getattr(learner, "rounds", (tokens // CHUNK) if learner is not None else 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--device-ms", type=float, default=6.5, help="emulated device compute per token (26 x 0.25 ms)")
    ap.add_argument("--steps", default="1,8", help="online_steps values to compare")
    ap.add_argument("--lookahead", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(REPO / "benches" / "results" / "predictor_learning.json"))
    args = ap.parse_args()
    if not TRACES.is_dir():
        sys.exit(f"predictor_learning: needs the DeepSeek-V2-Lite traces in {TRACES}")
    torch.set_num_threads(args.threads)
    fit, served = load_trace(TRACES / "dsv2lite_intent.npz"), load_trace(TRACES / "dsv2lite_summary.npz")
    served = served.select_sequences(range(int(np.searchsorted(served.seq_offsets, args.tokens, side="right"))))
    torch.manual_seed(0)  # fitted once, briefly, on a slice: the cost does not depend on how well
    base = make_predictor("mlp_online", fit.num_layers, fit.num_experts, fit.top_k, lookahead=args.lookahead,
                          epochs=1).fit([fit.select_sequences(range(32))])
    load_before = os.getloadavg()
    results = {}
    print(f"{'online_steps':>12} {'learning':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'hiccups':>8} {'rounds':>7}")
    for steps in [int(s) for s in args.steps.split(",")]:
        for mode in ("none", "inline", "background"):
            if mode == "none" and steps != int(args.steps.split(",")[0]):
                continue
            pred = copy.deepcopy(base)
            pred.params["online_steps"] = steps
            learner = {"none": None, "inline": pred, "background": None}[mode]
            if mode == "background":
                learner = BackgroundLearner(pred)
            r = decode(pred, learner, served, args.tokens, args.device_ms)
            key = "no learning" if mode == "none" else f"online_steps={steps} {mode}"
            results[key] = r
            print(f"{'-' if mode == 'none' else steps:>12} {mode:>10} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
                  f"{r['max_ms']:8.2f} {r['hiccups']:8d} {r['rounds']:7d}", flush=True)
    out = dict(machine=dict(cpus=os.cpu_count(), torch_threads=args.threads, torch=torch.__version__,
                            load_average_before=load_before, load_average_after=os.getloadavg()),
               tokens=args.tokens, device_ms=args.device_ms, lookahead=args.lookahead, chunk=CHUNK, results=results)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
