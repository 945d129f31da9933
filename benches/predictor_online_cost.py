"""Online cost of one predict() call: a decode batch of 64 tokens at one (middle) MoE layer.

Median over many calls, torch on each of --threads (default 1 and 2), predictors fitted briefly on a
slice of the DeepSeek-V2-Lite intent trace (the cost does not depend on how well they are fitted).
Baseline in the same run: one tiny torch op (x + 1 on [64, 64]), the floor of any torch predictor's
overhead. For `mlp_online` it also times one observe() (the online update after a 64-token step),
which runs off the critical path but costs CPU. The load average is recorded before and after.

    python benches/predictor_online_cost.py [--threads 1,2] [--calls 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from predictors.evaluate import online_cost  # noqa: E402
from predictors.registry import make_predictor  # noqa: E402
from predictors.traces import load_trace  # noqa: E402

CASES = [("popularity", {}), ("transition", {}), ("prev_token", {}), ("logreg", dict(max_tokens=300, max_iter=5)),
         ("mlp", dict(epochs=1)), ("mlp", dict(epochs=1, dim=128)), ("mlp", dict(epochs=1, dim=64)),
         ("mlp_online", dict(epochs=1)), ("mlp_online", dict(epochs=1, dim=64))]


def observe_cost(pred, trace, calls: int) -> float:
    """Median ms of one observe() of 64 finished tokens (the update after one decode step)."""
    from predictors.base import trace_tensors

    full = [t[:64] for t in trace_tensors(trace)]
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        pred.observe(*full)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to measure")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=str(REPO / "benches" / "results" / "predictor_online_cost.json"))
    args = ap.parse_args()
    load_start = os.getloadavg()
    trace = load_trace(REPO / ".." / "shared" / "traces" / "dsv2lite_intent.npz").select_sequences(range(10))
    fitted = {}
    for i, (name, params) in enumerate(CASES):
        for la in (1, 3):
            fitted[i, la] = make_predictor(name, trace.num_layers, trace.num_experts, trace.top_k, la, **params).fit([trace])
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        x = torch.randn(64, 64)
        ts = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            x + 1
            ts.append(time.perf_counter() - t0)
        rows.append(dict(predictor="torch_op_baseline", threads=threads, lookahead=None, ms=1e3 * statistics.median(ts)))
        for i, (name, params) in enumerate(CASES):
            for la in (1, 3):
                pred = fitted[i, la]
                rows.append(dict(predictor=name, params=params, threads=threads, lookahead=la, ms=online_cost(pred, trace, batch=64, calls=args.calls)))
                if pred.adapts:
                    rows.append(dict(predictor=name + ".observe", params=params, threads=threads, lookahead=la,
                                     ms=observe_cost(pred, trace, max(args.calls // 100, 5))))
    print(f"{'predictor':<18} {'params':<24} {'threads':>7} {'lookahead':>9} {'ms/call (B=64)':>15}")
    for r in rows:
        print(f"{r['predictor']:<18} {json.dumps(r.get('params', {})):<24} {r['threads']:>7} {str(r['lookahead']):>9} {r['ms']:>15.3f}")
    out = dict(threads=args.threads, calls=args.calls, load_average_start=load_start, load_average_end=os.getloadavg(),
               started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               machine="shared 2-core x86_64 CPU box", torch=torch.__version__, rows=rows)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} (load average {load_start[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
