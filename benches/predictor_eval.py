"""Cross-domain expert-prediction benchmark on the shared DeepSeek-V2-Lite traces.

Fits every predictor on one domain and measures it on the other, in both directions, at lookahead
1..D and for the next token at the same layer. The baselines (popularity, transition table,
previous token) are measured in the same run. Prints one table per direction and writes
benches/results/predictor_eval.json.

    python benches/predictor_eval.py [--lookahead 3] [--predictors a,b] [--threads 1] [--merge]
    python benches/predictor_eval.py --predictors mlp_online,mlp_online_d256 \
        --alias mlp_online_d256=mlp_online --params '{"mlp_online_d256": {"dim": 256}}' --merge

Adapting predictors (mlp_online) are measured prequentially: each test trace is replayed in time
order, 64 tokens at a time, and the predictor learns from a chunk only after predicting all of it.
--merge keeps the rows of predictors not re-run from the existing JSON (each row says which run
produced it), so slow unchanged predictors (logreg, sgd) need not be refitted.
"""
from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--alias", action="append", default=[], help="NAME=REGISTRY_NAME: an extra row (parameters via --params)")
    ap.add_argument("--directions", default="both", choices=["both", "forward", "backward"])
    ap.add_argument("--merge", action="store_true", help="keep rows of predictors not re-run from the existing --out")
    ap.add_argument("--out", default=str(REPO / "benches" / "results" / "predictor_eval.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    a, b = args.domains.split(",")
    traces = {d: load_trace(Path(args.traces) / f"dsv2lite_{d}.npz") for d in (a, b)}
    names = args.predictors.split(",") if args.predictors else None
    params = json.loads(args.params) if args.params else None
    aliases = dict(a.split("=", 1) for a in args.alias)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    run = dict(started=started, argv=sys.argv[1:], load_average_start=os.getloadavg(), threads=torch.get_num_threads())
    pairs = {"both": ((a, b), (b, a)), "forward": ((a, b),), "backward": ((b, a),)}[args.directions]
    for src, dst in pairs:
        print(f"\n== fit on {src}, measure on {dst} ==", flush=True)
        res = compare([traces[src]], [traces[dst]], names, args.lookahead, params=params, aliases=aliases,
                      log=lambda s: print(s, file=sys.stderr, flush=True))
        for r in res["results"].values():
            r["run"] = started
        print(format_table(res), flush=True)
        run[f"{src}->{dst}"] = res
    run["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    report = json.loads(out.read_text()) if args.merge and out.exists() else {}
    report["machine"] = f"{platform.machine()}, shared 2-core CPU box, torch {args.threads} thread(s)"
    report.setdefault("directions", {})
    report["runs"] = report.get("runs", []) + [{k: v for k, v in run.items() if "->" not in k}]
    for key, res in ((k, v) for k, v in run.items() if "->" in k):
        old = report["directions"].get(key, {"results": {}})
        merged = dict(old.get("results", {}))
        merged.update(res["results"])
        report["directions"][key] = dict(res, results=merged)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
