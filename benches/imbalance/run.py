"""The load-imbalance benchmark suite: every placement algorithm side by side, one command.

    python benches/imbalance/run.py --out benches/results/imbalance        # full suite (minutes)
    python benches/imbalance/run.py --smoke --out /tmp/imbalance           # CI smoke (seconds)

Sections (all seeded, deterministic up to solver timings):
  real     DeepSeek-V2-Lite traces (26 layers x 64 experts, top-6), EP=8, 1 redundant slot per rank: fitted
           on one domain, scored on both (in-domain and cross-domain), static plans and online re-placement.
  sweep    the same traces (every 3rd layer), EP in {2, 4, 8, 16} x redundant slots per rank in {0, 1, 2}.
  synth    synthetic workloads (benches/imbalance/workloads.py), EP=8, 1 redundant slot per rank.
  stats    OLMoE / Mixtral per-domain expert loads (../shared/routing_stats): fit on one domain's load,
           score imbalance on every other domain's load (no tokens there, so no fan-out).
Writes results.json, report.md and PNG plots to --out; prints the tables. Baseline: EPLB, same run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices on a shared host: threads only contend
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402

from placement.algorithms import ALGORITHMS  # noqa: E402
from placement.online import online_replay  # noqa: E402
from placement.score import score_load, score_plan  # noqa: E402
from placement.stats import expert_load  # noqa: E402

SHARED = (ROOT / ".." / "shared").resolve()
RESULTS = ROOT / "benches" / "results" / "imbalance"
SECTIONS = ("real", "sweep", "synth", "stats")
KEYS = ("layers", "imbalance_mean", "imbalance_p50", "imbalance_p99", "imbalance_trace", "fanout_mean", "rank_changes_mean",
        "dispatch_bytes_per_token", "solver_seconds", "solver_cpu_seconds", "experts_moved_total",
        "experts_moved_per_layer_step_mean", "imbalance_series")


def fit(name, tokens, E, ep, spr, **kw):
    t0, c0 = time.perf_counter(), time.process_time()
    plan = ALGORITHMS[name](expert_load(tokens, E), ep, spr, tokens=tokens, **kw)
    plan.meta.update(solver_seconds=time.perf_counter() - t0, solver_cpu_seconds=time.process_time() - c0)
    return plan


def row(scores, **labels):
    return dict(labels, **{k: scores[k] for k in KEYS if k in scores})


def section_real(traces, B, algos, online_budget, log):
    """Static plans of every algorithm + online re-placement, fitted on each domain, scored on each."""
    rows = []
    for fit_dom, tr in traces.items():
        plans = {a: fit(a, tr.experts, tr.num_experts, 8, 9) for a in algos}
        for ev_dom, ev in traces.items():
            for a, plan in plans.items():
                for b in B:
                    rows.append(row(score_plan(plan, ev.experts, b), fit=fit_dom, eval=ev_dom, algorithm=a,
                                    batch_size=b, solver_seconds=plan.meta["solver_seconds"],
                                    solver_cpu_seconds=plan.meta["solver_cpu_seconds"]))
                    log(rows[-1])
            for a, b in itertools.product([x for x in ("eplb", "affinity") if x in plans], B):
                s, _ = online_replay(plans[a], ev.experts, b, window=1024, budget=online_budget)
                rows.append(row(s, fit=fit_dom, eval=ev_dom, algorithm=f"{a}+online", batch_size=b,
                                solver_cpu_seconds=plans[a].meta["solver_cpu_seconds"]))
                log(rows[-1])
    return rows


def section_sweep(traces, B, algos, eps, reds, layers, log, max_tokens):
    rows = []
    fit_dom, ev_dom = list(traces)[:2]
    tr, ev = traces[fit_dom], traces[ev_dom]
    tok, E = tr.experts[:, layers], tr.num_experts
    for ep, red in itertools.product(eps, reds):
        spr = E // ep + red
        for a in algos:
            plan = fit(a, tok, E, ep, spr, max_tokens=max_tokens)
            for dom, x in ((fit_dom, tok), (ev_dom, ev.experts[:, layers])):
                rows.append(row(score_plan(plan, x, B), fit=fit_dom, eval=dom, algorithm=a, ep=ep,
                                redundant_per_rank=red, batch_size=B, layer_ids=list(layers),
                                solver_seconds=plan.meta["solver_seconds"],
                                solver_cpu_seconds=plan.meta["solver_cpu_seconds"]))
                log(rows[-1])
    return rows


def section_synth(workloads, B, algos, online_budget, log):
    rows = []
    for wname, make in workloads.items():
        fit_tok, stream = make()
        E = 64
        for a in algos:
            plan = fit(a, fit_tok, E, 8, 9)
            rows.append(row(score_plan(plan, stream, B), workload=wname, algorithm=a, batch_size=B,
                            solver_seconds=plan.meta["solver_seconds"],
                            solver_cpu_seconds=plan.meta["solver_cpu_seconds"]))
            log(rows[-1])
        if online_budget:
            s, _ = online_replay(fit("affinity", fit_tok, E, 8, 9), stream, B, window=1024, budget=online_budget)
            rows.append(row(s, workload=wname, algorithm="affinity+online", batch_size=B))
            log(rows[-1])
    return rows


def section_stats(path, algos, log):
    """Fit on one domain's load, score the plan's imbalance on every other domain's load (mean over pairs)."""
    z = np.load(path, allow_pickle=False)
    rows = []
    for model, ep, red in (("olmoe", 8, 1), ("mixtral", 4, 1)):
        domains = sorted(k[len(model) + 1:-5] for k in z.files if k.startswith(model + "_") and k.endswith("_load"))
        loads = {d: z[f"{model}_{d}_load"].astype(np.float64) for d in domains}
        E = next(iter(loads.values())).shape[1]
        for a in algos:
            vals = {}
            for f_dom in domains:
                plan = ALGORITHMS[a](loads[f_dom], ep, E // ep + red)
                for e_dom in domains:
                    vals[(f_dom, e_dom)] = score_load(plan, loads[e_dom])["imbalance_trace"]
            cross = [v for (f, e), v in vals.items() if f != e]
            same = [v for (f, e), v in vals.items() if f == e]
            rows.append(dict(model=model, algorithm=a, ep=ep, redundant_per_rank=red, domains=domains,
                             imbalance_in_domain=float(np.mean(same)), imbalance_cross_mean=float(np.mean(cross)),
                             imbalance_cross_max=float(np.max(cross))))
            log(rows[-1])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help=f"results folder (default: {RESULTS}, for the full suite only)")
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (CI): few tokens and layers")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    secs = args.sections.split(",")
    unknown = [s for s in secs if s not in SECTIONS]
    if unknown:  # ran nothing of it and wrote an empty report
        ap.error(f"--sections: {unknown[0]!r} is not one of {', '.join(SECTIONS)}")
    if args.out is None:  # the default is the committed full-suite results: a partial run must not replace them
        if args.smoke or set(secs) != set(SECTIONS):
            what = "--smoke" if args.smoke else f"--sections {args.sections}"
            ap.error(f"{what} writes its results over the full suite's in {RESULTS}; pass --out")
        args.out = str(RESULTS)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out}: is a file, expected a folder")
    from predictors.traces import load_trace
    import report
    import workloads
    from workloads import WORKLOADS

    if args.smoke:
        workloads.T = 512

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    algos = list(ALGORITHMS)
    t_start = time.perf_counter()
    log = lambda r: print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                                      if k != "imbalance_series"}), flush=True)
    results = dict(machine="2-core shared CPU (numpy, 1 BLAS thread)", smoke=args.smoke, sections={})
    have_traces = (SHARED / "traces" / "dsv2lite_intent.npz").exists()
    if have_traces and ("real" in secs or "sweep" in secs):
        traces = {d: load_trace(SHARED / "traces" / f"dsv2lite_{d}.npz", keys=()) for d in ("intent", "summary")}
        if args.smoke:
            traces = {d: t.select_sequences([0]) for d, t in traces.items()}
            traces = {d: type(t)(t.experts[:512, :2], t.weights[:512, :2], np.array([0, min(512, t.num_tokens)]),
                                 t.num_experts)
                      for d, t in traces.items()}
        if "real" in secs:
            results["sections"]["real"] = section_real(traces, [256] if args.smoke else [256, 512], algos,
                                                       4, log)
        if "sweep" in secs:
            layers = list(range(traces["intent"].num_layers))[:: 1 if args.smoke else 3]
            results["sections"]["sweep"] = section_sweep(
                traces, 256, algos, [2] if args.smoke else [2, 4, 8, 16], [1] if args.smoke else [0, 1, 2],
                layers, log, max_tokens=1024 if args.smoke else 2048)
    elif not have_traces:
        print(f"skipping real/sweep: {SHARED / 'traces'} is absent", file=sys.stderr)
    if "synth" in secs:
        wl = {k: WORKLOADS[k] for k in (["rotating_hotspot"] if args.smoke else WORKLOADS)}
        results["sections"]["synth"] = section_synth(wl, 256, algos, 4, log)
    stats_path = SHARED / "routing_stats" / "olmoe_mixtral_expert_counts.npz"
    if "stats" in secs and stats_path.exists():
        results["sections"]["stats"] = section_stats(stats_path, algos, log)
    results["suite_seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = report.write_report(results, out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
