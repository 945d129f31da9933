"""`moe-serve place` and `moe-serve place eval`: expert placement plans from routing traces.

    moe-serve place --trace a.npz [b.npz ...] --ep 8 --redundant 8 --algorithm affinity --out plan.json
    moe-serve place eval --plan plan.json --trace c.npz --json scores.json [--batch-size 512]

`--redundant` is the number of extra physical slots in all (as `ParallelConfig.redundant_experts`): it
must make experts + redundant divisible by ep. The plan file is JSON, or safetensors when --out ends
in .safetensors. `eval` prints the scores and writes them as JSON (imbalance_mean, imbalance_p99,
fanout_mean, solver_seconds, ... - see placement.score).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from moe_serve.cli.flags import key_value_params as _params, not_an_input, output_file, same_trace_shape


def _experts(paths: list[str]):
    """Concatenate the traces' expert ids: (int [T, L, K], num_experts)."""
    import numpy as np

    from predictors.traces import load_trace

    traces = [load_trace(p, keys=()) for p in paths]  # ids only: never the hidden states (GBs for a full trace)
    same_trace_shape(paths, traces, "--trace")
    for path, t in zip(paths, traces):  # a plan fitted from nothing was written as if fitted
        if t.num_tokens == 0:
            raise ValueError(f"--trace: {path} has no tokens")
    return np.concatenate([t.experts for t in traces]), traces[0].num_experts


def run_fit(args) -> int:
    from placement.algorithms import ALGORITHMS, check_options, get_algorithm
    from placement.stats import coactivation, expert_load

    if not args.out:
        raise ValueError("--out is required (the plan file to write)")
    if args.ep < 1:
        raise ValueError(f"--ep must be >= 1, got {args.ep}")
    if args.num_nodes < 1:  # 0 divided by zero inside eplb, -1 reached a numpy reshape
        raise ValueError(f"--num-nodes must be >= 1, got {args.num_nodes}")
    if args.algorithm not in ALGORITHMS:  # was refused in the registry's words, naming no flag
        raise ValueError(f"--algorithm {args.algorithm} is not one of {', '.join(sorted(ALGORITHMS))}")
    algorithm = get_algorithm(args.algorithm)
    if args.num_nodes != 1 and args.algorithm != "eplb":  # the others ignored it: a one-node plan, silently
        raise ValueError(f"--num-nodes {args.num_nodes}: only eplb places over nodes, not {args.algorithm}")
    if args.no_tokens and args.algorithm != "affinity":  # the others fit from the load alone: ignored, silently
        raise ValueError(f"--no-tokens: only affinity fits from tokens, not {args.algorithm} (it fits from the load)")
    options = _params(args.param)
    try:  # a misspelt option was ignored, its default used; num_nodes twice was a TypeError
        check_options(args.algorithm, options, set_by={"num_nodes": "--num-nodes"})
    except ValueError as exc:
        raise ValueError(f"--param: {exc}") from None
    not_an_input("--out", args.out, [("--trace", p) for p in args.trace])
    output_file(args.out, "--out")
    experts, E = _experts(args.trace)
    if args.redundant < 0 or (E + args.redundant) % args.ep:
        raise ValueError(f"--redundant={args.redundant}: experts ({E}) + redundant must be >= {E} and divisible "
                         f"by --ep={args.ep}")
    if args.algorithm == "eplb":  # in the flags' words, not eplb's (it said "need E=64 % num_groups=3 == 0, ...")
        from placement.algorithms.eplb import hierarchy_problem

        problem = hierarchy_problem(E, args.ep, args.num_nodes, options.get("num_groups"),
                                    names={"num_nodes": "--num-nodes ", "num_ranks": "--ep ",
                                           "num_groups": "--param num_groups="})
        if problem:
            raise ValueError(problem)
    t0 = time.perf_counter()
    plan = algorithm(expert_load(experts, E), args.ep, (E + args.redundant) // args.ep,
                     coact=coactivation(experts, E) if args.algorithm == "affinity" and args.no_tokens else None,
                     tokens=None if args.no_tokens else experts, num_nodes=args.num_nodes, **options)
    plan.meta["solver_seconds"] = time.perf_counter() - t0  # statistics included
    plan.meta["traces"] = [Path(p).name for p in args.trace]
    plan.validate().save(args.out)
    print(f"placed {plan.num_layers} layers x {E} experts on {args.ep} ranks x {plan.slots_per_rank} slots "
          f"({args.algorithm}) in {plan.meta['solver_seconds']:.1f}s -> {args.out}")
    return 0


def run_eval(args) -> int:
    from placement.plan import PlacementPlan
    from placement.score import score_plan

    if not args.plan:
        raise ValueError("--plan is required (the plan file to score)")
    not_an_input("--json", args.json, [("--plan", args.plan)] + [("--trace", p) for p in args.trace])
    output_file(args.json, "--json")
    if args.batch_size < 1:  # was refused in the scorer's words, "score: batch_size must be >= 1"
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    # a negative budget was taken as "online" (it is truthy); a window of 0 failed in np.concatenate
    if args.online_budget < 0:
        raise ValueError(f"--online-budget must be >= 0 (0: static), got {args.online_budget}")
    if args.hidden_size < 1:  # dispatch_bytes_per_token came out negative
        raise ValueError(f"--hidden-size must be >= 1, got {args.hidden_size}")
    if args.online_window < 1:
        raise ValueError(f"--online-window must be >= 1 token, got {args.online_window}")
    plan = PlacementPlan.load(args.plan)
    experts, E = _experts(args.trace)
    if E != plan.num_experts:
        raise ValueError(f"--trace has {E} experts per layer, the plan {plan.num_experts}")
    if experts.shape[1] != plan.num_layers:  # was refused in the scorer's words, naming neither flag
        raise ValueError(f"--trace has {experts.shape[1]} MoE layers, the --plan {args.plan} {plan.num_layers}")
    if args.online_budget:
        from placement.online import online_replay

        scores, _ = online_replay(plan, experts, args.batch_size, window=args.online_window,
                                  budget=args.online_budget, hidden_size=args.hidden_size)
    else:
        scores = score_plan(plan, experts, args.batch_size, args.hidden_size)
    scores.update(plan=str(args.plan), traces=[Path(p).name for p in args.trace])
    for key in ("imbalance_mean", "imbalance_p99", "imbalance_trace", "fanout_mean", "rank_changes_mean",
                "dispatch_bytes_per_token", "solver_seconds", "experts_moved_total"):
        if key in scores:
            print(f"{key:>26}: {scores[key]:.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2))
    return 0


# each action's own flags and their defaults: a flag of the other action, set, would be ignored without a word
FIT_FLAGS = {"--ep": 8, "--redundant": 0, "--algorithm": "affinity", "--num-nodes": 1, "--no-tokens": False,
             "--param": None, "--out": None}
EVAL_FLAGS = {"--plan": None, "--json": None, "--batch-size": 512, "--hidden-size": 2048, "--online-budget": 0,
              "--online-window": 1024}


def refuse_other_actions_flags(args) -> None:
    """ValueError naming the flags set (not at their defaults) that only the other action reads."""
    other, flags = ("eval", EVAL_FLAGS) if args.action == "fit" else ("fit", FIT_FLAGS)
    given = [flag for flag, default in flags.items() if getattr(args, flag[2:].replace("-", "_")) != default]
    if given:
        raise ValueError(f"{', '.join(given)}: only for 'place {other}', and this runs 'place {args.action}' "
                         "(they would be ignored)")


def run(args) -> int:
    if not args.trace:
        raise ValueError("--trace is required (one or more routing trace .npz files)")
    for word in args.trace:  # --trace takes every word after it: 'place --trace t.npz eval' made 'eval' a trace
        if word in ("fit", "eval") and not Path(word).exists():
            raise ValueError(f"--trace: {word!r} is the action, not a trace file (--trace takes every word after "
                             f"it): name the action first, as in 'moe-serve place {word} --trace ...'")
    refuse_other_actions_flags(args)
    return run_eval(args) if args.action == "eval" else run_fit(args)


def register(subparsers) -> None:
    p = subparsers.add_parser("place", help="expert placement plans: fit one, or `place eval` to score one",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("action", nargs="?", choices=["fit", "eval"], default="fit",
                   help="fit (default): write a plan; eval: score a plan on traces")
    p.add_argument("--trace", nargs="+", action="extend", help="routing trace files (.npz)")
    p.add_argument("--ep", type=int, default=FIT_FLAGS["--ep"], help="expert-parallel ranks (default: 8)")
    p.add_argument("--redundant", type=int, default=FIT_FLAGS["--redundant"],
                   help="extra physical expert slots in all, replicas of hot experts (default: 0)")
    p.add_argument("--algorithm", default=FIT_FLAGS["--algorithm"],
                   help="contiguous, round_robin, eplb or affinity (default)")
    p.add_argument("--num-nodes", type=int, default=FIT_FLAGS["--num-nodes"],
                   help="nodes, for eplb's hierarchical policy (default: 1)")
    p.add_argument("--no-tokens", action="store_true",
                   help="affinity: fit from the co-activation matrix instead of the tokens themselves")
    p.add_argument("--param", action="append", help="algorithm option KEY=VALUE (repeatable), e.g. max_iters=100 for affinity; "
                   "a key the algorithm does not take is an error naming those it takes")
    p.add_argument("--out", help="plan file to write (.json or .safetensors)")
    p.add_argument("--plan", help="eval: plan file to score")
    p.add_argument("--json", help="eval: write the scores here")
    p.add_argument("--batch-size", type=int, default=EVAL_FLAGS["--batch-size"],
                   help="eval: tokens per batch for imbalance (default: 512)")
    p.add_argument("--hidden-size", type=int, default=EVAL_FLAGS["--hidden-size"],
                   help="eval: hidden size for dispatch bytes (default: 2048)")
    p.add_argument("--online-budget", type=int, default=EVAL_FLAGS["--online-budget"],
                   help="eval: replay with online re-placement, at most this many slots rewritten per layer "
                        "and batch (default: 0, static)")
    p.add_argument("--online-window", type=int, default=EVAL_FLAGS["--online-window"],
                   help="eval: online sliding window in tokens (default: 1024)")
    p.set_defaults(func=run)
