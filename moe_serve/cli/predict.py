"""`moe-serve predict fit` and `moe-serve predict eval`: expert predictors on routing traces.

    moe-serve predict fit --trace a.npz [b.npz ...] --predictor mlp --lookahead 3 --out mlp.safetensors
    moe-serve predict eval --train a.npz --test b.npz --lookahead 3 --json results.json

`mlp_online` keeps learning from the routing it observes; `eval` measures it prequentially (each
64-token chunk of the test traces is predicted before the predictor learns from it).

`eval` fits every predictor (or those named by --predictors) on the train traces, measures them on
the test traces, prints a table and writes the JSON (per predictor and lookahead: recall_at_k,
precision_at_budget, recall_at_budget, fit and predict times).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from moe_serve.cli.flags import key_value_params as _params, not_an_input, output_file, same_trace_shape


# the predictors whose fit or predict reads the traces' hidden states when they hold some; the others are
# run without loading them (float16 [T, L, H]: ~850 MB for a full DeepSeek-shaped trace, and eval's float32 copy)
READS_HIDDEN = ("ensemble", "hidden_linear", "mlp", "mlp_online", "router")


def trace_keys(names) -> tuple | None:
    """load_trace's keys for running predictors `names` (None: all of them): hidden states only if one reads them."""
    return None if names is None or any(n in READS_HIDDEN for n in names) else ()


def run_fit(args) -> int:
    from predictors.registry import make_predictor
    from predictors.router import HiddenLinearPredictor, RouterPredictor
    from predictors.traces import load_trace

    not_an_input("--out", args.out, [("--trace", p) for p in args.trace])  # a predictor written over a trace
    output_file(args.out, "--out")
    params = _params(args.param)
    check_params(args.predictor, params, "--param")  # a misspelt key: refused before the traces load
    traces = [load_trace(p, keys=trace_keys([args.predictor])) for p in args.trace]
    same_trace_shape(args.trace, traces, "--trace")  # the predictor's shape is the first one's
    ref = traces[0]
    check_lookahead(args.lookahead, ref.num_layers, args.trace[0])
    routers = router_start(args, ref) if args.router_checkpoint else None
    t0 = time.perf_counter()
    if args.predictor == "router" and routers:
        if params:  # the routers are taken as they are: steps and l2 (fit's) would be ignored
            raise ValueError(f"--param: router from --router-checkpoint is not fitted: {', '.join(params)} would have no effect")
        pred = RouterPredictor.from_router_weights(routers, ref.top_k, args.lookahead)
    elif args.predictor == "hidden_linear" and routers:
        pred = HiddenLinearPredictor.from_router_weights(routers, ref.top_k, args.lookahead, **params).fit(traces)
    else:
        pred = make_predictor(args.predictor, ref.num_layers, ref.num_experts, ref.top_k, args.lookahead, **params)
        if routers:  # mlp, mlp_online: their hidden-state map starts from the routers
            pred.with_router_weights(routers)
        pred.fit(traces)
    pred.save(args.out)
    print(f"fitted {args.predictor} (lookahead {args.lookahead}) on {sum(t.num_tokens for t in traces)} tokens "
          f"in {time.perf_counter() - t0:.1f}s -> {args.out}")
    return 0


ROUTER_STARTS = ("hidden_linear", "mlp", "mlp_online", "router")  # the predictors that can use a model's routers


def router_start(args, ref) -> dict:
    """--router-checkpoint's routers (MoE layer -> [E, H]), refused unless they fit --predictor and the
    traces: as many MoE layers, and the hidden size of the traces' hidden states (when recorded)."""
    from predictors.router import router_weights_from_checkpoint

    if args.predictor not in ROUTER_STARTS:  # it would be ignored: the user thinks it was used
        raise ValueError(f"--router-checkpoint applies to predictors {', '.join(ROUTER_STARTS)}; not {args.predictor}")
    routers = router_weights_from_checkpoint(args.router_checkpoint, ref.num_experts)
    if len(routers) != ref.num_layers:
        raise ValueError(f"--router-checkpoint {args.router_checkpoint} has {len(routers)} MoE layers with "
                         f"{ref.num_experts} experts, --trace {args.trace[0]} has {ref.num_layers}")
    if ref.hidden is None and args.predictor != "router":  # mlp would fit without a hidden-state map, silently
        raise ValueError(f"--router-checkpoint starts {args.predictor}'s hidden-state map, but --trace "
                         f"{args.trace[0]} has no hidden states (record with --record-hidden)")
    H = int(routers[0].shape[1])
    if ref.hidden is not None and ref.hidden.shape[-1] != H:
        raise ValueError(f"--router-checkpoint {args.router_checkpoint} has hidden size {H}, --trace "
                         f"{args.trace[0]} has {ref.hidden.shape[-1]}")
    return routers


def check_lookahead(lookahead: int, num_layers: int, trace: str) -> None:
    """--lookahead d predicts MoE layers l+1 .. l+d; from layer 0 the farthest layer there is, is
    num_layers - 1, so a larger d only adds slots that score zeros for every layer (0 = next token)."""
    if not 0 <= lookahead <= num_layers - 1:
        raise ValueError(f"--lookahead must lie in [0, {num_layers - 1}] (MoE layers - 1; {trace} has {num_layers} "
                         f"MoE layers), got {lookahead}")


def predictor_names(text: str | None) -> list[str] | None:
    """--predictors: comma-separated registry names; None (flag absent) = all. An empty name (an empty
    flag, a stray comma) or an unknown one is an error naming the flag, not every predictor run."""
    from predictors.registry import REGISTRY

    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise ValueError(f"--predictors: an empty name in {text!r}; give comma-separated names from {sorted(REGISTRY)}")
    for n in names:
        if n not in REGISTRY:
            raise ValueError(f"--predictors: {n!r} is not a predictor (one of {sorted(REGISTRY)})")
    if len(set(names)) < len(names):
        raise ValueError(f"--predictors: {text!r} names a predictor twice")
    return names


def check_params(name: str, params: dict, flag: str) -> None:
    """A key that predictor `name` does not take (a misspelt one would be ignored, its default used):
    ValueError naming the flag, the key and the keys it takes."""
    from predictors.registry import REGISTRY

    if name not in REGISTRY:
        raise ValueError(f"{flag}: {name!r} is not a predictor (one of {sorted(REGISTRY)})")
    try:
        REGISTRY[name].check_params(params)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def predictor_params(text: str | None) -> dict | None:
    """--params: a JSON object {predictor name: {parameter: value}}."""
    if not text:
        return None
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--params must be JSON ({exc}), got {text!r}") from exc
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f'--params must be a JSON object of objects, e.g. {{"mlp": {{"epochs": 4}}}}, got {text!r}')
    for name, kw in params.items():
        check_params(name, kw, "--params")
    return params


def run_eval(args) -> int:
    from predictors.compare import compare, format_table
    from predictors.traces import load_trace

    not_an_input("--json", args.json, [("--train", p) for p in args.train] + [("--test", p) for p in args.test])
    output_file(args.json, "--json")
    names = predictor_names(args.predictors)
    params = predictor_params(args.params)
    keys = trace_keys(names)
    train = [load_trace(p, keys=keys) for p in args.train]
    test = [load_trace(p, keys=keys) for p in args.test]
    same_trace_shape(args.train + args.test, train + test, "--train/--test")
    sized = [(p, t.hidden.shape[-1]) for p, t in zip(args.train + args.test, train + test) if t.hidden is not None]
    for path, H in sized:  # a hidden-state predictor fitted on one size fails on the other, after every fit
        if H != sized[0][1]:
            raise ValueError(f"--train/--test: {path} has hidden states of size {H}, {sized[0][0]} of size {sized[0][1]}")
    lookahead = args.lookahead
    if lookahead is None:  # the default: 3, or as far as the traces' layers go
        lookahead = min(3, train[0].num_layers - 1)
    check_lookahead(lookahead, train[0].num_layers, args.train[0])
    E = train[0].num_experts
    if args.budget is not None and not 1 <= args.budget <= E:  # compare() says so too, without the flag
        raise ValueError(f"--budget must lie in [1, {E}] (the traces' experts per MoE layer), got {args.budget}")
    if lookahead == 0 and args.no_next_token:
        raise ValueError("--lookahead 0 with --no-next-token: nothing left to measure")
    result = compare(train, test, names, lookahead, args.budget, not args.no_next_token, params,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    result.update(train=[str(p) for p in args.train], test=[str(p) for p in args.test])
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


def register(subparsers) -> None:
    from predictors.registry import REGISTRY

    p = subparsers.add_parser("predict", help="fit and evaluate expert predictors on routing traces")
    sub = p.add_subparsers(dest="predict_command", required=True)

    f = sub.add_parser("fit", help="fit one predictor on traces and save it (safetensors, no pickle)")
    f.add_argument("--trace", nargs="+", action="extend", required=True, help="trace files (.npz)")
    f.add_argument("--predictor", required=True, choices=sorted(REGISTRY), help="which predictor")
    f.add_argument("--lookahead", type=int, default=1, help="MoE layers ahead to predict, at most MoE layers - 1; 0 = next token, same layer (default: 1)")
    f.add_argument("--out", required=True, help="output file (.safetensors)")
    f.add_argument("--param", action="append", help="predictor parameter KEY=VALUE (repeatable), e.g. epochs=8; a key the predictor does not take is an error naming those it takes")
    f.add_argument("--router-checkpoint", default=None, help="router: take the router weights from this checkpoint directory; hidden_linear, mlp, mlp_online: start their hidden-state map from them")
    f.set_defaults(func=run_fit)

    e = sub.add_parser("eval", help="fit every predictor on --train, measure on --test, print a table, write JSON")
    e.add_argument("--train", nargs="+", action="extend", required=True, help="trace files to fit on")
    e.add_argument("--test", nargs="+", action="extend", required=True, help="trace files to measure on")
    e.add_argument("--lookahead", type=int, default=None, help="measure lookahead 1..D, D at most MoE layers - 1; 0 = next token only (default: 3, or MoE layers - 1 when fewer)")
    e.add_argument("--budget", type=int, default=None, help="prefetch budget B experts per layer (default: 2 * top_k, at most the experts per layer)")
    e.add_argument("--predictors", default=None, help="comma-separated subset of predictor names (default: all)")
    e.add_argument("--params", default=None, help='JSON: per-predictor parameters, e.g. {"mlp": {"epochs": 4}}')
    e.add_argument("--no-next-token", action="store_true", help="skip the next-token same-layer evaluation")
    e.add_argument("--json", default=None, help="write the results here")
    e.set_defaults(func=run_eval)
