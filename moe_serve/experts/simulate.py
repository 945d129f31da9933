"""Run cache policies side by side over routing traces (what `moe-serve cache-sim` and the benchmark do).

Everything a policy learns before the replay comes from `fit_traces` (another domain, to keep the
comparison honest): the static policy's profiled load, the predicted policy's next-token prior
(passed in; `PredictedPolicy` weights it 0 by default: measured, it costs more than it helps).
The cross-layer predictor is a fitted `predictors.Predictor` (fit it on the other domain too).
Without fit traces, the static policy profiles the replayed trace itself, which the result notes.
"""
from __future__ import annotations

import time

import numpy as np

from moe_serve.experts.policies import POLICY_NAMES, gap_counts, make_policy
from moe_serve.experts.replay import CostModel, TracePredictions, capacity_slots, global_steps, replay


def expert_load(traces) -> np.ndarray:
    """float [L, E]: tokens routed to each expert, summed over `traces`."""
    L, E = traces[0].num_layers, traces[0].num_experts
    load = np.zeros((L, E))
    for t in traces:
        np.add.at(load, (np.broadcast_to(np.arange(L)[None, :, None], t.experts.shape), t.experts.astype(np.int64)), 1.0)
    return load


def reuse_weights_for(fit_traces, num_experts: int) -> np.ndarray:
    """The learned reuse forecast's weights [NF, 8], fitted on `fit_traces` (another domain) as one stream."""
    if not fit_traces:
        raise ValueError("simulate: reuse=True fits the reuse forecast on fit_traces; none were given")
    from moe_serve.experts.policies.reuse import fit_reuse
    return fit_reuse(np.concatenate([t.experts.astype(np.int64) for t in fit_traces]), num_experts)


def simulate(trace, policies, capacities, cost: CostModel, predictor=None, fit_traces=(), lookahead: int = 1,
             prefetch_from: int = 1, learn_lag: int = 1, reuse=False, log=None) -> dict:
    """{capacity fraction (str): {policy: metrics}} for one trace; metrics also hold `vs_belady`
    (hit rate over Belady's at that capacity; None where Belady hits nothing) when Belady ran.
    `prefetch_from`: see `PredictedPolicy` (`cost.min_prefetch_distance` is the nearest layer a copy
    can reach in time). `learn_lag`: chunks an adapting predictor's learning trails its predictions
    (see `TracePredictions`; 1 as the runtime's background learner, 0 as inline learning). `reuse`: the
    predicted policies also use the learned reuse forecast (`policies/reuse.py`): True fits it on
    `fit_traces` (`reuse_weights_for`), an array [NF, >= 7] is weights fitted already (once for many traces)."""
    for name in policies:
        if name not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {', '.join(POLICY_NAMES)} or all, got {name!r}")
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    experts = trace.experts.astype(np.int64)
    fit_traces = list(fit_traces)
    load = expert_load(fit_traces or [trace])
    prior = None
    predicted = any(n.startswith("predicted") for n in policies)
    if fit_traces and predicted:
        parts = [gap_counts(t.experts.astype(np.int64), E) for t in fit_traces]
        prior = (sum(p[0] for p in parts), sum(p[1] for p in parts))
    reuse_weights = None
    if isinstance(reuse, np.ndarray):
        reuse_weights = reuse
    elif reuse and predicted:
        reuse_weights = reuse_weights_for(fit_traces, E)
    preds = None
    if predictor is not None and predicted and lookahead > 0:
        preds = TracePredictions(predictor, trace, learn_lag=learn_lag)
    future = global_steps(experts, E) if any(n.startswith("belady") for n in policies) else None
    out: dict = {}
    for frac in capacities:
        slots = capacity_slots(frac, L, E, K)
        row = out.setdefault(f"{frac:g}", {})
        for name in policies:
            t0 = time.perf_counter()
            use_pred = name.startswith("predicted") and preds is not None
            policy = make_policy(name, load=load, future=future, predictor=preds if use_pred else None,
                                 lookahead=min(lookahead, preds.lookahead) if use_pred else 0, prior=prior,
                                 prefetch_from=prefetch_from, reuse_weights=reuse_weights)
            m = replay(experts, E, policy, slots, cost, state_fn=(lambda t, layer: t) if use_pred else None)
            m["seconds"] = time.perf_counter() - t0
            if name == "belady-prefetch":
                m["oracle_lookahead"] = policy.lookahead  # its own, whatever `lookahead` the predicted policies use
            if name == "static":
                m["profiled_on"] = "fit traces" if fit_traces else "the replayed trace (in-domain)"
            row[name] = m
            if log:
                log(f"capacity {frac:g} ({slots} slots) {name:9s} hit {m['hit_rate']:.4f} "
                    f"ready {m['ready_in_time']:.4f} MB/token {m['bytes_per_token'] / 1e6:.1f} "
                    f"stall ms/token {m['stall_ms_per_token']:.2f} ({m['seconds']:.0f}s)")
        if "belady" in row:
            best = row["belady"]["hit_rate"]
            for m in row.values():  # Belady hits nothing when every access is a first use (a 1-token trace)
                m["vs_belady"] = m["hit_rate"] / best if best > 0 else None
    return out


def format_table(results: dict) -> str:
    """results {trace: {capacity: {policy: metrics}}} -> a plain-text table."""
    lines = [f"{'trace':24s} {'cap':>6s} {'policy':18s} {'hit':>7s} {'/belady':>8s} {'ready':>7s} "
             f"{'MB/tok':>8s} {'stall ms/tok':>12s}"]
    for tname, caps in results.items():
        for cap, row in caps.items():
            for name, m in row.items():
                vb = m.get("vs_belady")
                lines.append(f"{tname:24s} {cap:>6s} {name:18s} {m['hit_rate']:7.4f} "
                             f"{(f'{vb:.3f}' if vb is not None else '-'):>8s} {m['ready_in_time']:7.4f} "
                             f"{m['bytes_per_token'] / 1e6:8.1f} {m['stall_ms_per_token']:12.2f}")
    return "\n".join(lines)
