"""`moe-serve cache-sim`: replay routing traces through the expert-cache policies, no model.

    moe-serve cache-sim --trace A.npz [B.npz ...] --capacity 0.125 0.25 0.5 --policy all \
        [--predictor P.safetensors] [--fit-trace OTHER.npz] [--reuse] --json OUT.json

Prints a table and writes JSON: {"config": ..., "results": {trace: {capacity: {policy: {hit_rate,
ready_in_time, bytes_per_token, stall_ms_per_token, ...}}}}}.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from moe_serve.cli.flags import not_an_input, output_file
from moe_serve.experts.policies import POLICY_NAMES
from moe_serve.experts.replay import DSV2_LITE_EXPERT_BYTES, CostModel
from moe_serve.experts.simulate import format_table, reuse_weights_for, simulate


def register(subparsers) -> None:
    p = subparsers.add_parser("cache-sim", help="simulate expert-cache policies on routing traces (no model)")
    # action="extend": a repeated flag adds to the list (argparse's default kept only the last one);
    # the list defaults are filled in by `main` (an extended default list would keep its values)
    p.add_argument("--trace", nargs="+", action="extend", required=True, help="routing trace files (.npz) to replay")
    p.add_argument("--capacity", type=float, nargs="+", action="extend", default=None,
                   help="fraction(s) of all experts resident, in (0, 1] (default: 0.25)")
    p.add_argument("--policy", nargs="+", action="extend", default=None, help=f"{', '.join(POLICY_NAMES)} or all (default: all)")
    p.add_argument("--predictor", default=None, help="fitted predictor file for the predicted policy's prefetch")
    p.add_argument("--fit-trace", nargs="*", action="extend", default=None,
                   help="traces (another domain) the static load and the predicted prior are fitted on")
    p.add_argument("--reuse", action="store_true",
                   help="the predicted policies also evict by the learned reuse forecast (P(used within the next "
                        "w tokens), weights fitted on --fit-trace, its transition counts learned online from the "
                        "replayed trace); needs --fit-trace; default: off")
    p.add_argument("--lookahead", type=int, default=None,
                   help="MoE layers ahead the predicted policies prefetch, at most the predictor's own lookahead "
                        "(default: 1, or the predictor's lookahead when it is 0; belady-prefetch's oracle always "
                        "looks 4 layer steps ahead, recorded in its results as oracle_lookahead)")
    p.add_argument("--prefetch-from", default="1",
                   help="the nearest MoE layer ahead the predicted policies prefetch for: N >= 1, or auto (copy time "
                        "over layer time, rounded up: the nearest layer a copy can reach in time); default: 1")
    p.add_argument("--learn-lag", type=int, default=1,
                   help="64-token chunks an adapting predictor's (mlp_online) online learning trails its "
                        "predictions: 1 as the runtime's --predictor-learning background (default), 0 as inline")
    p.add_argument("--expert-bytes", type=int, default=DSV2_LITE_EXPERT_BYTES,
                   help=f"bytes of one expert (default: {DSV2_LITE_EXPERT_BYTES}, DeepSeek-V2-Lite bf16)")
    p.add_argument("--bandwidth-gbps", type=float, default=25.0, help="host-to-device GB/s (default: 25)")
    p.add_argument("--layer-ms", type=float, default=0.25, help="compute ms per MoE layer (default: 0.25)")
    p.add_argument("--copy-order", choices=("fifo", "demand-first"), default="fifo",
                   help="copy engine order: fifo (the CUDA side stream) or demand-first (demand copies, then "
                        "prefetches by need time: the CPU copy thread); default: fifo")
    p.add_argument("--prefetch-when", choices=("always", "idle"), default="always",
                   help="idle: a prefetch starts only while the copy engine has nothing to do, as the store's "
                        "--prefetch-when idle; default: always")
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(func=main)


def check_matches(trace, path, fit, predictor, args) -> None:
    """What is fitted elsewhere must describe the replayed model: a predictor over other expert counts
    failed inside torch (a traceback), mismatched fit traces with a message naming no flag."""
    if trace.num_tokens == 0:
        raise ValueError(f"--trace {path} holds no tokens")
    shape = (trace.num_layers, trace.num_experts)
    for fpath, f in zip(args.fit_trace, fit):
        if f.num_tokens == 0:  # nothing to profile: the static hot set came from all-zero loads
            raise ValueError(f"--fit-trace {fpath} holds no tokens")
        if (f.num_layers, f.num_experts) != shape:
            raise ValueError(f"--fit-trace {fpath} has (MoE layers, experts) = {(f.num_layers, f.num_experts)}, "
                             f"--trace {path} {shape}")
    if predictor is not None and (predictor.num_layers, predictor.num_experts) != shape:
        raise ValueError(f"--predictor {args.predictor} was fitted for (MoE layers, experts) = "
                         f"{(predictor.num_layers, predictor.num_experts)}, --trace {path} has {shape}")
    if predictor is not None and predictor.top_k != trace.top_k:  # its forecast is scaled to (and prefetches) top_k
        raise ValueError(f"--predictor {args.predictor} was fitted for top_k={predictor.top_k}, --trace {path} "
                         f"has top_k={trace.top_k}")
    if predictor is not None and args.lookahead > predictor.lookahead:  # it was cut silently, and recorded uncut
        why = ("; it forecasts the next token at the same layer, no later layer, so the predicted policies "
               "prefetch nothing with it" if predictor.lookahead == 0 else "")
        raise ValueError(f"--lookahead {args.lookahead} is beyond what --predictor {args.predictor} forecasts "
                         f"(lookahead {predictor.lookahead}{why}): give at most {predictor.lookahead}")
    if predictor is not None and predictor.needs_hidden and trace.hidden is None:
        raise ValueError(f"--predictor {args.predictor} ({predictor.name}) predicts from hidden states; --trace "
                         f"{path} has none (record with --record-hidden)")


def check_cost_flags(args) -> None:
    """The cost model's numbers, named by their flags (inf ran, and wrote Infinity into the JSON)."""
    for flag, value in (("--expert-bytes", args.expert_bytes), ("--bandwidth-gbps", args.bandwidth_gbps),
                        ("--layer-ms", args.layer_ms)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a finite number > 0, got {value}")
    if not math.isfinite(args.expert_bytes / (args.bandwidth_gbps * 1e9) * 1e3):
        raise ValueError(f"--bandwidth-gbps must be large enough for a finite copy time of --expert-bytes "
                         f"{args.expert_bytes}, got {args.bandwidth_gbps}")


def result_names(paths) -> list[str]:
    """The key of each trace's results: its file name without extension. Two files of one name (say
    a/x.npz and b/x.npz) would share a key, the second's results replacing the first's: refused."""
    seen: dict[str, str] = {}
    for path in paths:
        name = Path(path).stem
        if name in seen:
            raise ValueError(f"--trace {seen[name]} and {path} would both be reported as {name!r} "
                             f"(results are keyed by file name): rename one")
        seen[name] = path
    return list(seen)


def main(args) -> int:
    from predictors.registry import load_predictor
    from predictors.traces import load_trace

    args.capacity, args.policy, args.fit_trace = args.capacity or [0.25], args.policy or ["all"], args.fit_trace or []
    policies = list(POLICY_NAMES) if args.policy == ["all"] else args.policy
    for name in policies:  # before loading anything
        if name not in POLICY_NAMES:
            raise ValueError(f"--policy must be one of {', '.join(POLICY_NAMES)} (one or more), or all alone; "
                             f"got {name!r}")
    if "predicted-prefetch" in args.policy and not args.predictor:  # asked for by name: as the server, refuse
        raise ValueError("--policy predicted-prefetch needs --predictor (the forecast it prefetches); without "
                         "one it is plain predicted")
    if args.reuse and not args.fit_trace:  # its weights are fitted on another domain, never the replayed one
        raise ValueError("--reuse fits the reuse forecast's weights on --fit-trace (another domain); give one")
    if args.reuse and not any(n.startswith("predicted") for n in policies):  # it would change nothing, silently
        raise ValueError(f"--reuse changes only the predicted policies (predicted, predicted-prefetch); "
                         f"--policy gave {', '.join(policies)}")
    check_cost_flags(args)
    cost = CostModel(expert_bytes=args.expert_bytes, bandwidth_gbps=args.bandwidth_gbps, layer_ms=args.layer_ms,
                     copy_order=args.copy_order, prefetch_when=args.prefetch_when)
    keys: dict[str, float] = {}
    for c in args.capacity:
        if not 0.0 < c <= 1.0:
            raise ValueError(f"--capacity must be a fraction in (0, 1], got {c}")
        key = f"{c:g}"  # what simulate keys the results by: one would replace the other
        if key in keys:
            raise ValueError(f"--capacity {keys[key]} and {c} would both be reported as {key!r}: give each once")
        keys[key] = c
    if args.lookahead is not None and args.lookahead < 0:
        raise ValueError(f"--lookahead must be >= 0, got {args.lookahead}")
    if args.learn_lag < 0:
        raise ValueError(f"--learn-lag must be >= 0 chunks, got {args.learn_lag}")
    prefetch_from = cost.prefetch_from(args.prefetch_from)
    output_file(args.json, "--json")
    inputs = [("--trace", p) for p in args.trace] + [("--fit-trace", p) for p in args.fit_trace]
    not_an_input("--json", args.json, inputs + ([("--predictor", args.predictor)] if args.predictor else []))
    predictor = None
    if args.predictor:
        predictor = load_predictor(args.predictor)
    if args.lookahead is None:  # a next-token predictor (lookahead 0) runs by default; one asked beyond it is refused
        args.lookahead = 1 if predictor is None else min(1, predictor.lookahead)
    fit = [load_trace(p, keys=()) for p in args.fit_trace]  # the policies learn expert ids from them, nothing else
    names = result_names(args.trace)
    # the hidden states (GBs for a full trace) only for a predictor that predicts from them
    replay_keys = ("hidden",) if getattr(predictor, "needs_hidden", False) else ()
    traces = [load_trace(path, keys=replay_keys) for path in args.trace]
    for path, trace in zip(args.trace, traces):  # all of them first: a bad last one wasted every replay before it
        check_matches(trace, path, fit, predictor, args)
    # fitted once for every replayed trace (~40 s on a full DeepSeek-V2-Lite trace)
    try:
        reuse = reuse_weights_for(fit, traces[0].num_experts) if args.reuse else False
    except ValueError as exc:  # too few tokens to fit on
        raise ValueError(f"--reuse: --fit-trace {' '.join(args.fit_trace)}: {exc}") from exc
    results = {}
    for i, (name, trace) in enumerate(zip(names, traces)):
        if i and getattr(predictor, "adapts", False):  # it learned on the trace before: each starts from the file
            predictor = load_predictor(args.predictor)
        results[name] = simulate(trace, policies, args.capacity, cost, predictor=predictor, fit_traces=fit,
                                 lookahead=args.lookahead, prefetch_from=prefetch_from, learn_lag=args.learn_lag,
                                 reuse=reuse, log=lambda s: print(f"{name}: {s}", file=sys.stderr))
    print(format_table(results))
    if args.json:
        config = dict(trace=args.trace, capacity=args.capacity, policies=policies, predictor=args.predictor,
                      fit_trace=args.fit_trace, lookahead=args.lookahead, prefetch_from=prefetch_from,
                      learn_lag=args.learn_lag, reuse=args.reuse,
                      expert_bytes=cost.expert_bytes,
                      bandwidth_gbps=cost.bandwidth_gbps, layer_ms=cost.layer_ms, copy_ms=cost.copy_ms,
                      copy_order=cost.copy_order, prefetch_when=cost.prefetch_when)
        Path(args.json).write_text(json.dumps(dict(config=config, results=results), indent=1, default=float))
    return 0
