"""Cross-domain expert-prediction benchmark on the shared DeepSeek-V2-Lite traces.

Fits every predictor on one domain and measures it on the other, in both directions, at lookahead
1..D and for the next token at the same layer. The baselines (popularity, transition table,
previous token) are measured in the same run. Prints one table per direction and writes
benches/results/predictor_eval.json.

    python benches/predictor_eval.py [--lookahead 3] [--predictors a,b] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from predictors.compare import compare, format_table  # noqa: E402
from predictors.traces import load_trace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default=str(REPO / ".." / "shared" / "traces"))
    ap.add_argument("--domains", default="intent,summary", help="two domains: dsv2lite_<domain>.npz")
    ap.add_argument("--lookahead", type=int, default=3)
    ap.add_argument("--predictors", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--params", default=None, help="JSON per-predictor parameters")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    ap.add_argument("--out", default=str(REPO / "benches" / "results" / "predictor_eval.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    a, b = args.domains.split(",")
    traces = {d: load_trace(Path(args.traces) / f"dsv2lite_{d}.npz") for d in (a, b)}
    names = args.predictors.split(",") if args.predictors else None
    params = json.loads(args.params) if args.params else None
    report = dict(machine=f"{platform.machine()} {torch.get_num_threads()} torch thread(s), shared 2-core CPU box",
                  started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), directions={})
    for src, dst in ((a, b), (b, a)):
        print(f"\n== fit on {src}, measure on {dst} ==", flush=True)
        res = compare([traces[src]], [traces[dst]], names, args.lookahead, params=params,
                      log=lambda s: print(s, file=sys.stderr, flush=True))
        print(format_table(res), flush=True)
        report["directions"][f"{src}->{dst}"] = res
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
