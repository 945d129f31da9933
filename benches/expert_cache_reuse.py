"""Issue 5's ready-in-time target: the predicted-prefetch policy with and without the learned reuse forecast.

Both directions (replay one DeepSeek-V2-Lite trace, fit everything on the other), full traces, 50%
resident, lookahead 6, 54.8 GB/s, prefetch from layer 2, mlp_online predictor learning one chunk
behind (learn_lag 1), as the session-11 table. The reuse forecast's weights are fitted on the other
trace (`fit_reuse`); its transition counts are learned online from the replayed trace only.

    python benches/expert_cache_reuse.py --out benches/results/expert_cache_sim_session13.json \
        [--scores-dir DIR]   # DIR/scores_{trace}_0.npy: TracePredictions.scores saved by an earlier run
        [--online-steps 8]   # mlp_online's steps per chunk (default 1); 8 -> expert_cache_sim_session13_steps8.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from moe_serve.experts.policies import make_policy
from moe_serve.experts.policies.reuse import fit_reuse
from moe_serve.experts.replay import CostModel, TracePredictions, capacity_slots, replay

TRACES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "traces"
MIX = 0.75  # reuse_mix: first 2,000 tokens, .5 / .75 / 1: intent .9057 / .9061 / .9035, summary .8772 / .8795 / .8801;
# full traces, .5 / .75: intent .9141 / .9132, summary .8907 / .8919


class Saved:
    """Scores float [T, L, D, E] served as a predictor's (TracePredictions' interface)."""
    def __init__(self, scores, lookahead, top_k):
        self.scores, self.lookahead, self.top_k = scores, lookahead, top_k

    def predict(self, state, layer):
        return self.scores[state, layer][None]


def predictions(name, other, scores_dir, online_steps):
    from predictors.traces import load_trace
    if scores_dir:
        return Saved(np.load(pathlib.Path(scores_dir) / f"scores_{name}_0.npy", mmap_mode="r"), 6, 6)
    from predictors.registry import make_predictor
    fit = load_trace(TRACES / f"dsv2lite_{other}.npz", keys=())
    p = make_predictor("mlp_online", fit.num_layers, fit.num_experts, fit.top_k, lookahead=6,
                       online_steps=online_steps).fit([fit])
    return TracePredictions(p, load_trace(TRACES / f"dsv2lite_{name}.npz", keys=()), learn_lag=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scores-dir", default=None)
    ap.add_argument("--online-steps", type=int, default=1,
                    help="mlp_online's optimizer steps per learned chunk (8: session 11's better summary forecast)")
    args = ap.parse_args()
    cost = CostModel(bandwidth_gbps=54.8)
    out = dict(setup=dict(capacity=0.5, lookahead=6, bandwidth_gbps=54.8, prefetch_from=2, policy="predicted-prefetch",
                          predictor="mlp_online fitted on the other trace, learn_lag 1",
                          online_steps=args.online_steps, reuse_mix=MIX,
                          predictions="loaded from --scores-dir" if args.scores_dir else "computed"), results={})
    for name, other in (("summary", "intent"), ("intent", "summary")):
        experts = np.load(TRACES / f"dsv2lite_{name}.npz")["experts"].astype(np.int64)
        T, L, K = experts.shape
        preds = predictions(name, other, args.scores_dir, args.online_steps)
        t0 = time.perf_counter()
        weights = fit_reuse(np.load(TRACES / f"dsv2lite_{other}.npz")["experts"].astype(np.int64), 64)
        fit_s = time.perf_counter() - t0
        row = out["results"][f"{other}->{name}"] = {"reuse_fit_seconds": fit_s}
        for label, reuse in (("old", None), ("new", weights)):
            policy = make_policy("predicted-prefetch", predictor=preds, lookahead=6, prefetch_from=2,
                                 reuse_weights=reuse, reuse_mix=MIX)
            t0 = time.perf_counter()
            m = replay(experts, 64, policy, capacity_slots(0.5, L, 64, K), cost, state_fn=lambda t, layer: t)
            m["replay_ms_per_token"] = (time.perf_counter() - t0) / T * 1e3
            row[label] = m
            print(f"{other}->{name} {label}: ready {m['ready_in_time']:.4f} hit {m['hit_rate']:.4f} "
                  f"stall {m['stall_ms_per_token']:.2f} ms/token, replay {m['replay_ms_per_token']:.2f} ms/token",
                  flush=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
