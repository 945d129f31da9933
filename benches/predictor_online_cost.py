"""Online cost of one predict() call: a decode batch of 64 tokens at one (middle) MoE layer.

Median over many calls, torch on --threads threads, predictors fitted briefly on a slice of the
DeepSeek-V2-Lite intent trace (the cost does not depend on how well they are fitted). Baseline in
the same run: one tiny torch op (x + 1 on [64, 64]), the floor of any torch predictor's overhead.

    python benches/predictor_online_cost.py [--threads 1] [--calls 2000]
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
         ("mlp", dict(epochs=1)), ("mlp", dict(epochs=1, dim=96)), ("mlp", dict(epochs=1, dim=64))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=str(REPO / "benches" / "results" / "predictor_online_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    trace = load_trace(REPO / ".." / "shared" / "traces" / "dsv2lite_intent.npz").select_sequences(range(10))
    x = torch.randn(64, 64)
    ts = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        x + 1
        ts.append(time.perf_counter() - t0)
    rows = [dict(predictor="torch_op_baseline", lookahead=None, ms=1e3 * statistics.median(ts))]
    for name, params in CASES:
        for la in (1, 3):
            pred = make_predictor(name, trace.num_layers, trace.num_experts, trace.top_k, la, **params).fit([trace])
            rows.append(dict(predictor=name, params=params, lookahead=la, ms=online_cost(pred, trace, batch=64, calls=args.calls)))
    print(f"{'predictor':<18} {'params':<24} {'lookahead':>9} {'ms/call (B=64)':>15}")
    for r in rows:
        print(f"{r['predictor']:<18} {json.dumps(r.get('params', {})):<24} {str(r['lookahead']):>9} {r['ms']:>15.3f}")
    out = dict(threads=args.threads, calls=args.calls, load_average=os.getloadavg(),
               machine="shared 2-core x86_64 CPU box", rows=rows)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
