"""Online re-placement (budget, stable slots, adaptation) and the `moe-serve place` CLI end to end."""
import argparse
import json

import numpy as np
import pytest

from placement.algorithms import get_algorithm
from placement.online import online_replay, rebalance_layer, stable_layout
from placement.plan import PlacementPlan
from placement.score import score_plan


def test_stable_layout_keeps_slots_of_experts_that_stay():
    old = np.array([0, 1, 2, 3, 4, 5])
    new = np.array([4, 0, 1, 2, 3, 5])  # rank 0 = {0,1,4}: 2 -> 4 ; rank 1 = {2,3,5}: 4 -> 2
    assert stable_layout(old, new, 3).tolist() == [0, 1, 4, 3, 2, 5]


def _shifted_stream(T, E, K, hot, seed):
    rng = np.random.default_rng(seed)
    p = np.ones(E)
    p[hot] = 12.0
    p /= p.sum()
    return np.stack([rng.choice(E, K, replace=False, p=p) for _ in range(T)])[:, None, :]


def test_online_adapts_within_budget():
    E, N, K = 16, 4, 2
    fit = _shifted_stream(1024, E, K, hot=[0, 1], seed=0)
    stream = _shifted_stream(2048, E, K, hot=[4, 5], seed=1)  # experts 4, 5 on the same contiguous rank
    plan = get_algorithm("contiguous")(np.bincount(fit.ravel(), minlength=E)[None].astype(float), N, 5)
    static = score_plan(plan, stream, 128)
    scores, final = online_replay(plan, stream, batch_size=128, window=256, budget=2)
    assert scores["imbalance_mean"] < static["imbalance_mean"] - 0.1
    assert 0 < scores["experts_moved_total"] <= 2 * scores["online_steps"]
    assert scores["experts_moved_per_step_max"] <= 2
    assert final.replica_count[0, 4] + final.replica_count[0, 5] > 2  # replicas followed the traffic


def test_rebalance_layer_respects_budget():
    rng = np.random.default_rng(3)
    phy = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 1])
    tokens = rng.integers(8, size=(300, 2))
    tokens[:, 1] = np.where(tokens[:, 1] == tokens[:, 0], (tokens[:, 0] + 1) % 8, tokens[:, 1])
    for budget in (0, 1, 3):
        new, moved = rebalance_layer(phy, tokens, 8, 2, 5, budget=budget)
        assert moved <= budget and moved == int((new != phy).sum())
        PlacementPlan.from_phy2log(new[None], 8, 2).validate()


def test_rebalance_plan_moves_replicas_to_new_hot_experts():
    from placement.online import rebalance_plan

    E, N = 8, 2
    plan = PlacementPlan.from_phy2log([[0, 1, 2, 3, 0, 4, 5, 6, 7, 1]], E, N)  # replicas of 0 and 1
    rng = np.random.default_rng(0)
    window = np.stack([rng.choice(E, 2, replace=False, p=[.02, .02, .02, .02, .02, .02, .44, .44])
                       for _ in range(400)])[:, None, :]
    new, moved = rebalance_plan(plan, window, budget=2)
    assert new.validate().replica_count[0, 6] == 2 and new.replica_count[0, 7] == 2
    assert moved.tolist() == [2] and int((new.phy2log != plan.phy2log).sum()) == 2
    with pytest.raises(ValueError, match="window_experts"):
        rebalance_plan(plan, window[:, 0])


def _parser():
    from moe_serve.cli import place

    parser = argparse.ArgumentParser()
    place.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_place_is_a_registered_command():
    from moe_serve.cli.main import COMMANDS

    assert "moe_serve.cli.place" in COMMANDS


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_cli_fit_and_eval_on_shared_trace(shared_dir, tmp_path, suffix):
    from predictors.traces import load_trace

    src = load_trace(shared_dir / "traces" / "dsv2lite_intent.npz")
    small = tmp_path / "intent_small.npz"
    src.select_sequences(range(12)).save(small)  # a few sequences keep the test fast
    other = tmp_path / "summary_small.npz"
    load_trace(shared_dir / "traces" / "dsv2lite_summary.npz").select_sequences([0]).save(other)
    plan_path, out_json = tmp_path / f"plan{suffix}", tmp_path / "scores.json"
    args = _parser().parse_args(["place", "--trace", str(small), "--ep", "8", "--redundant", "8",
                                 "--algorithm", "affinity", "--param", "max_iters=20", "--out", str(plan_path)])
    assert args.func(args) == 0
    plan = PlacementPlan.load(plan_path)
    assert plan.phy2log.shape == (26, 72) and plan.meta["algorithm"] == "affinity"
    args = _parser().parse_args(["place", "eval", "--plan", str(plan_path), "--trace", str(other),
                                 "--json", str(out_json), "--batch-size", "256"])
    assert args.func(args) == 0
    scores = json.loads(out_json.read_text())
    for key in ("imbalance_mean", "imbalance_p99", "fanout_mean", "solver_seconds"):
        assert key in scores
    assert 1.0 <= scores["imbalance_mean"] <= scores["imbalance_max"]
    assert 1.0 <= scores["fanout_mean"] <= 6.0
    assert scores["solver_seconds"] == pytest.approx(plan.meta["solver_seconds"])


def test_cli_errors_name_the_flag(shared_dir, tmp_path):
    trace = str(shared_dir / "traces" / "dsv2lite_intent.npz")
    args = _parser().parse_args(["place", "--trace", trace, "--ep", "8", "--redundant", "3", "--out",
                                 str(tmp_path / "p.json")])
    with pytest.raises(ValueError, match="--redundant=3"):
        args.func(args)
    args = _parser().parse_args(["place", "--trace", trace, "--algorithm", "nope", "--out", str(tmp_path / "p.json")])
    with pytest.raises(ValueError, match="not one of"):
        args.func(args)


def test_rebalance_layer_replica_moves_caps_repointing():
    # 8 experts on 2 ranks, replicas of cold experts 0 and 1; the window makes 6 and 7 hot
    phy = np.array([0, 1, 2, 3, 0, 4, 5, 6, 7, 1])
    rng = np.random.default_rng(0)
    p = np.array([.02, .02, .02, .02, .02, .02, .44, .44])
    window = np.stack([rng.choice(8, 2, replace=False, p=p) for _ in range(400)])
    repointed = lambda new: int(np.abs(np.bincount(new, minlength=8) - np.bincount(phy, minlength=8)).sum() // 2)
    free, _ = rebalance_layer(phy, window, 8, 2, 5, budget=4, replica_moves=None)
    capped, moved = rebalance_layer(phy, window, 8, 2, 5, budget=4, replica_moves=1)
    assert repointed(free) == 2 and repointed(capped) == 1
    assert moved <= 4
    PlacementPlan.from_phy2log(capped[None], 8, 2).validate()


def test_rebalance_layer_lightest_donor_puts_new_copy_on_light_rank():
    # cold expert 0 has copies on rank 0 (slot 0; rank 0 also holds hot 1, 2), rank 1 (slot 6, light) and
    # rank 2 (slot 11, next to the hottest expert 9, which wants another copy)
    phy = np.array([0, 1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 0])
    rng = np.random.default_rng(1)
    second = rng.choice([1, 2, 3, 4, 5, 6, 7, 8], size=300, p=[.3, .3, .05, .05, .1, .1, .05, .05])
    window = np.stack([np.full(300, 9), second], axis=1)
    new, _ = rebalance_layer(phy, window, 10, 3, 4, budget=1, lightest_donor=True, replica_moves=1)
    assert new[6] == 9 and new[0] == 0  # the light rank's copy was re-pointed
    first, _ = rebalance_layer(phy, window, 10, 3, 4, budget=1, lightest_donor=False, replica_moves=1)
    assert first[0] == 9 and first[6] == 0  # default: the first eligible copy (rank 0's)


def test_rebalance_layer_sub_window_balances_each_chunk():
    # 4 experts, 2 ranks x 2 slots, top-1: totals are balanced, but chunk A uses only rank 0's experts
    # and chunk B only rank 1's; fan-out cannot change (k=1), so only the per-chunk term can ask for a swap
    phy = np.array([0, 1, 2, 3])
    window = np.r_[np.tile([0, 1], 50), np.tile([2, 3], 50)][:, None]
    same, moved = rebalance_layer(phy, window, 4, 2, 2, budget=2)
    assert moved == 0 and same.tolist() == phy.tolist()
    new, moved = rebalance_layer(phy, window, 4, 2, 2, budget=2, sub_window=100)
    assert moved == 2
    ranks = {e: i // 2 for i, e in enumerate(new)}
    assert ranks[0] != ranks[1] and ranks[2] != ranks[3]  # each chunk now spans both ranks


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "eplb", "--num-nodes", "0"], "--num-nodes must be >= 1, got 0"),
    (["--algorithm", "eplb", "--num-nodes", "-1"], "--num-nodes must be >= 1, got -1"),
    # these named eplb's internals: "eplb: need E=8 % num_groups=3 == 0, num_gpus=2 % num_nodes=3 == 0, ..."
    (["--algorithm", "eplb", "--num-nodes", "3"],
     "--num-nodes 3 must divide --ep 2 (eplb gives every node the same number of ranks)"),
    (["--algorithm", "eplb", "--ep", "6", "--redundant", "4", "--num-nodes", "3"],
     "--num-nodes 3 must divide the 8 experts per layer (eplb gives every node the same number of "
     "expert groups, blocks of consecutive expert ids; set their number with --param num_groups)"),
    (["--algorithm", "eplb", "--param", "num_groups=3"],
     "--param num_groups=3 must divide the 8 experts per layer (eplb's expert groups are equal "
     "blocks of consecutive expert ids)"),
])
def test_cli_refuses_bad_num_nodes(tmp_path, argv, message):
    """--num-nodes 0 raised ZeroDivisionError inside eplb (a traceback), -1 a numpy reshape error; a node
    count that does not divide the ranks or the experts was refused in eplb's internal names."""
    import re

    from tests.predictors.synth import layer_map_trace

    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    args = _parser().parse_args(["place", "--trace", str(trace), "--ep", "2", "--out", str(tmp_path / "p.json"), *argv])
    with pytest.raises(ValueError, match=re.escape(message)):
        args.func(args)



@pytest.mark.parametrize("argv, message", [
    (["--online-budget", "-1"], "--online-budget must be >= 0"),
    (["--online-budget", "2", "--online-window", "0"], "--online-window must be >= 1"),
])
def test_cli_eval_refuses_bad_online_flags(tmp_path, argv, message):
    """A negative --online-budget ran an online replay with it; --online-window 0 failed in np.concatenate."""
    from tests.predictors.synth import layer_map_trace

    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    plan = tmp_path / "p.json"
    args = _parser().parse_args(["place", "--trace", str(trace), "--ep", "2", "--algorithm", "contiguous",
                                 "--out", str(plan)])
    assert args.func(args) == 0
    args = _parser().parse_args(["place", "eval", "--plan", str(plan), "--trace", str(trace), *argv])
    with pytest.raises(ValueError, match=message):
        args.func(args)


def test_cli_refuses_a_parameter_the_algorithm_does_not_take(tmp_path, capsys):
    """`--param max_iter=20` (affinity reads max_iters) was ignored: the plan used the default."""
    from moe_serve.cli.main import main
    from tests.predictors.synth import layer_map_trace

    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    out = tmp_path / "p.json"
    for argv, message in (
        (["--algorithm", "affinity", "--param", "max_iter=20"],
         "--param: placement algorithm affinity does not take parameter 'max_iter'; it takes: balance_tol, "
         "balance_weight, contiguous_windows, cross_layer_weight, explore_tol, max_iters, max_tokens, rounds, "
         "uniform_blend, window_tokens (did you mean 'max_iters'?)"),
        (["--algorithm", "eplb", "--param", "num_group=2"],
         "--param: placement algorithm eplb does not take parameter 'num_group'; it takes: num_groups"),
        (["--algorithm", "eplb", "--param", "num_nodes=2"],  # passed twice, it was a TypeError traceback
         "--param: placement algorithm eplb: num_nodes is set by --num-nodes, not as a parameter"),
        (["--algorithm", "contiguous", "--param", "max_iters=5"],
         "--param: placement algorithm contiguous does not take parameter 'max_iters'; it takes no parameters"),
    ):
        rc = main(["place", "--trace", str(trace), "--ep", "2", "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("moe-serve place: error: ") and message in err, (argv, err)
        assert not out.exists()
    assert main(["place", "--trace", str(trace), "--ep", "2", "--out", str(out), "--algorithm", "eplb",
                 "--num-nodes", "2", "--param", "num_groups=4"]) == 0
    assert main(["place", "--trace", str(trace), "--ep", "2", "--out", str(out), "--algorithm", "affinity",
                 "--param", "max_iters=5", "--param", "contiguous_windows=true", "--param", "window_tokens=20"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "affinity", "--param", "balance_tol=abc"], "balance_tol='abc' must be a number"),
    (["--algorithm", "affinity", "--param", "max_iters=2.5"], "max_iters=2.5 must be an integer"),
    (["--algorithm", "affinity", "--param", "contiguous_windows=1"], "contiguous_windows=1 must be true or false"),
    (["--algorithm", "affinity", "--param", "max_tokens=0"], "max_tokens=0 must be >= 1"),
    (["--algorithm", "affinity", "--param", "uniform_blend=2"], "uniform_blend=2 must be <= 1"),
    (["--algorithm", "affinity", "--param", "window_tokens=-3"], "window_tokens=-3 must be >= 0"),
    (["--algorithm", "eplb", "--param", "num_groups=0"], "num_groups=0 must be >= 1"),
])
def test_cli_refuses_a_parameter_value_of_the_wrong_type_or_range(tmp_path, capsys, argv, message):
    """balance_tol=abc was a TypeError traceback inside the swap search; max_tokens=0 fitted a plan from no
    tokens, uniform_blend=2 from negative loads, num_groups=0 silently meant one group per node."""
    from moe_serve.cli.main import main
    from tests.predictors.synth import layer_map_trace

    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    out = tmp_path / "p.json"
    rc = main(["place", "--trace", str(trace), "--ep", "2", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and f"--param: placement algorithm {argv[1]}: {message}" in err, err
    assert not out.exists()


def test_cli_refuses_an_empty_trace_and_a_bad_hidden_size(tmp_path, capsys):
    """`place` on a trace without tokens wrote a plan fitted from nothing; `place eval --hidden-size -1`
    printed a negative dispatch_bytes_per_token."""
    from moe_serve.cli.main import main
    from predictors.traces import RoutingTrace
    from tests.predictors.synth import layer_map_trace

    empty = tmp_path / "empty.npz"
    RoutingTrace(np.zeros((0, 3, 2), np.int16), np.zeros((0, 3, 2), np.float16), np.array([0]), 8).save(empty)
    out = tmp_path / "p.json"
    assert main(["place", "--trace", str(empty), "--ep", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--trace: {empty} has no tokens" in err and not out.exists(), err
    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    assert main(["place", "--trace", str(trace), "--ep", "2", "--out", str(out), "--algorithm", "contiguous"]) == 0
    capsys.readouterr()
    assert main(["place", "eval", "--plan", str(out), "--trace", str(trace), "--hidden-size", "-1"]) == 2
    assert "--hidden-size must be >= 1, got -1" in capsys.readouterr().err
