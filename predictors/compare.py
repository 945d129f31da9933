"""Every predictor side by side: fit on train traces, evaluate on test traces, one table.

Used by `moe-serve predict eval` and `benches/predictor_eval.py`. Each predictor is fitted twice:
with lookahead D (slots = layers l+1..l+D of the same token) and with lookahead 0 (the next token at
the same layer). Predictors that need hidden states are skipped, with the reason, when a trace lacks them.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from predictors.evaluate import evaluate, online_cost
from predictors.registry import REGISTRY, make_predictor
from predictors.traces import RoutingTrace

DEFAULT_ORDER = ["popularity", "transition", "prev_token", "router", "hidden_linear", "logreg", "sgd", "mlp", "mlp_online", "ensemble"]
METRICS = ("recall_at_k", "precision_at_budget", "recall_at_budget")


def compare(
    train: list[RoutingTrace], test: list[RoutingTrace], names: list[str] | None = None, lookahead: int = 3,
    budget: int | None = None, next_token: bool = True, params: dict | None = None, log=print,
    aliases: dict[str, str] | None = None,
) -> dict:
    """{'results': {name: {slot: metrics, fit_s, predict_s, predict_ms_b64}}, 'skipped': {name: why}, ...}.

    aliases: extra row name -> registry name (e.g. {"mlp_online_d256": "mlp_online"} with its own params).
    """
    ref = train[0]
    L, E, K = ref.num_layers, ref.num_experts, ref.top_k
    budget = min(2 * K, E) if budget is None else budget  # 2 * top_k, or every expert when there are fewer
    if not 1 <= budget <= E:
        raise ValueError(f"budget must lie in [1, num_experts={E}], got {budget}")
    names = names or [n for n in DEFAULT_ORDER if n in REGISTRY]
    has_hidden = all(t.hidden is not None for t in train + test)
    if not has_hidden:  # an mlp fitted on hidden states would need them in the test traces too
        train = [t if t.hidden is None else dataclasses.replace(t, hidden=None) for t in train]
    out = dict(top_k=K, budget=budget, lookahead=lookahead, num_layers=L, num_experts=E,
               torch_threads=torch.get_num_threads(), results={}, skipped={})
    aliases = aliases or {}
    # names and parameters checked before the first fit (minutes each), not when their turn comes
    for name in names:
        if aliases.get(name, name) not in REGISTRY:
            raise ValueError(f"predictor must be one of {sorted(REGISTRY)}, got {aliases.get(name, name)!r}")
    for name, kw in (params or {}).items():
        if aliases.get(name, name) not in REGISTRY:
            raise ValueError(f"params: {name!r} is not a predictor (one of {sorted(REGISTRY)})")
        REGISTRY[aliases.get(name, name)].check_params(kw)
    for name in names:
        kind = aliases.get(name, name)
        if REGISTRY[kind].needs_hidden and not has_hidden:
            out["skipped"][name] = "needs hidden states; the traces have none"
            continue
        res: dict = {}
        for la in ([lookahead] if lookahead else []) + ([0] if next_token else []):
            t0 = time.perf_counter()
            pred = make_predictor(kind, L, E, K, la, **(params or {}).get(name, {})).fit(train)
            fit_s = time.perf_counter() - t0
            ev = evaluate(pred, test, budget)
            tag = "" if la else "_next_token"
            res[f"fit_s{tag}"] = fit_s
            res[f"predict_s{tag}"] = ev.pop("predict_s")
            if "observe_s" in ev:  # adapted online, prequentially: learned only from already-seen test tokens
                res[f"observe_s{tag}"] = ev.pop("observe_s")
                res["prequential"] = True
            res[f"predict_ms_b64{tag}"] = online_cost(pred, test[0])
            res.update(ev)
            log(f"  {name} lookahead={la}: fit {fit_s:.1f}s, " + ", ".join(f"{k} r@k={_num(v['recall_at_k'], 0)}" for k, v in ev.items()))
        out["results"][name] = res
    return out


def _num(value: float | None, width: int) -> str:
    """A metric to 3 decimals, or '-' for a slot with no row to score (MetricSum's None)."""
    return f"{'-' if value is None else format(value, '.3f'):>{width}}"


def format_table(result: dict) -> str:
    """One row per predictor and slot: recall@k, precision/recall at the budget, fit and predict times."""
    K, B = result["top_k"], result["budget"]
    w = max([12, *(len(n) for n in (*result["results"], *result["skipped"]))])  # 'hidden_linear' is 13
    head = f"{'predictor':<{w}} {'target':<12} {'recall@' + str(K):>9} {'prec@' + str(B):>8} {'rec@' + str(B):>8} {'fit s':>7} {'ms/b64':>7}"
    lines = [head, "-" * len(head)]
    for name, res in result["results"].items():
        ahead = sorted((k for k in res if k.startswith("lookahead_")), key=lambda k: int(k.split("_")[1]))  # 2 < 10
        for slot in ahead + (["next_token"] if "next_token" in res else []):
            m = res[slot]
            tag = "_next_token" if slot == "next_token" else ""
            lines.append(
                f"{name:<{w}} {slot:<12} {_num(m['recall_at_k'], 9)} {_num(m['precision_at_budget'], 8)} "
                f"{_num(m['recall_at_budget'], 8)} {res['fit_s' + tag]:>7.1f} {res['predict_ms_b64' + tag]:>7.3f}"
            )
    for name, why in result["skipped"].items():
        lines.append(f"{name:<{w}} skipped: {why}")
    return "\n".join(lines)
