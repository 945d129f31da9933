"""Invariants of every algorithm on the real DeepSeek-V2-Lite traces (every 5th layer, both domains), and
the CLI's plan and scores against the Python functions and an independent recount. Tests only."""
import json

import numpy as np
import pytest

from moe_serve.cli.main import main
from placement.algorithms import ALGORITHMS
from placement.plan import PlacementPlan
from placement.score import score_load
from placement.stats import expert_load


@pytest.fixture(scope="module")
def traces(shared_dir):
    from predictors.traces import load_trace

    return {d: load_trace(shared_dir / "traces" / f"dsv2lite_{d}.npz") for d in ("intent", "summary")}


@pytest.mark.parametrize("ranks, slots", [(8, 9), (4, 17), (3, 22), (16, 4), (64, 1)])
def test_every_algorithm_on_the_real_traces(traces, ranks, slots):
    for trace in traces.values():
        ex = trace.experts[:, ::5].astype(np.int64)
        load = expert_load(ex, 64)
        base = score_load(ALGORITHMS["contiguous"](load, ranks, slots), load)["imbalance_per_layer"]
        for name, algorithm in ALGORITHMS.items():
            kw = dict(tokens=ex, max_tokens=512, max_iters=50) if name == "affinity" else {}
            plan = algorithm(load, ranks, slots, **kw).validate()  # every expert placed, maps consistent
            assert (plan.num_ranks, plan.slots_per_rank, plan.num_layers) == (ranks, slots, ex.shape[1])
            assert plan.replica_count.sum(1).tolist() == [ranks * slots] * ex.shape[1]
            held = plan.expert_ranks().sum(-1)  # ranks holding each expert: one per copy, none doubled
            assert np.array_equal(held, np.minimum(plan.replica_count, ranks)), name
            ours = np.array(score_load(plan, load)["imbalance_per_layer"])
            slack = {"eplb": 1.0, "affinity": 1.02}.get(name)  # the guards' promises on the fitted load
            if slack:
                assert np.all(ours <= np.array(base) * slack + 1e-9), (name, ours, base)
            if name == "affinity":
                assert np.array_equal(algorithm(load, ranks, slots, **kw).phy2log, plan.phy2log)  # deterministic


def test_cli_plan_and_scores_are_the_python_ones(traces, tmp_path, capsys):
    from predictors.traces import RoutingTrace
    from placement.score import score_plan

    t = traces["summary"]
    ex = t.experts[:1500, ::5]
    small = RoutingTrace(ex, t.weights[:1500, ::5], np.array([0, 1500]), 64)
    path, plan_path, scores = tmp_path / "t.npz", tmp_path / "plan.json", tmp_path / "s.json"
    small.save(path)
    assert main(["place", "--trace", str(path), "--ep", "8", "--redundant", "8", "--algorithm", "affinity",
                 "--param", "max_iters=50", "--out", str(plan_path)]) == 0
    ex64 = ex.astype(np.int64)
    want = ALGORITHMS["affinity"](expert_load(ex64, 64), 8, 9, tokens=ex64, max_iters=50)
    assert np.array_equal(PlacementPlan.load(plan_path).phy2log, want.phy2log)
    # eval: the JSON is score_plan's; printed lines are its values
    assert main(["place", "eval", "--plan", str(plan_path), "--trace", str(path), "--json", str(scores)]) == 0
    printed = capsys.readouterr().out
    got, ref = json.loads(scores.read_text()), score_plan(want, ex64, 512)
    for key in ("imbalance_mean", "imbalance_p99", "imbalance_trace", "fanout_mean", "rank_changes_mean"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12) and f"{key:>26}: {ref[key]:.4g}" in printed
    # a plan without replicas, recounted by hand: rank loads summed over the trace, max/mean per layer
    assert main(["place", "--trace", str(path), "--ep", "8", "--algorithm", "round_robin", "--out", str(plan_path)]) == 0
    assert main(["place", "eval", "--plan", str(plan_path), "--trace", str(path), "--json", str(scores)]) == 0
    rank = ex64 % 8  # round robin: expert e on rank e % 8
    whole = np.stack([np.bincount(rank[:, l].ravel(), minlength=8) for l in range(ex.shape[1])])
    assert json.loads(scores.read_text())["imbalance_trace"] == pytest.approx((whole.max(1) / whole.mean(1)).mean())
