"""Trace replay and `moe-serve cache-sim` at the edges: tiny traces, full caches, odd flags."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from moe_serve.cli.main import main as cli_main
from moe_serve.experts.replay import CostModel
from predictors.traces import RoutingTrace


def save_trace(path, experts, num_experts: int) -> str:
    """experts int [T, L, K] as one sequence; returns the path as a string."""
    x = np.asarray(experts, dtype=np.int16)
    RoutingTrace(experts=x, weights=np.ones(x.shape, dtype=np.float16), seq_offsets=np.array([0, len(x)]),
                 num_experts=num_experts).save(path)
    return str(path)


def test_one_token_trace_every_policy(tmp_path, capsys):
    """One token: every access is a first use, so Belady hits nothing and vs_belady (hit rate over
    Belady's) has no meaning. It divided by zero (a ZeroDivisionError traceback); it is now null."""
    path = save_trace(tmp_path / "one.npz", [[[0, 1], [2, 3]]], 4)  # T=1, L=2, K=2
    out = tmp_path / "sim.json"
    assert cli_main(["cache-sim", "--trace", path, "--capacity", "0.5", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]["one"]
    for cap, row in results.items():
        assert row["belady"]["hit_rate"] == 0.0
        for name, m in row.items():
            assert m["vs_belady"] is None, (cap, name)
            assert m["accesses"] == 4 and m["tokens"] == 1
    assert "one" in capsys.readouterr().out


def test_traces_with_the_same_file_name_are_refused(tmp_path, capsys):
    """Results are keyed by file name without extension: a/x.npz and b/x.npz both reported as "x",
    and the second one's results silently replaced the first's. Now refused, naming both files."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = save_trace(tmp_path / "a" / "x.npz", [[[0, 1], [2, 3]]] * 3, 4)
    second = save_trace(tmp_path / "b" / "x.npz", [[[0], [1], [2]]] * 5, 6)
    out = tmp_path / "sim.json"
    assert cli_main(["cache-sim", "--trace", first, second, "--policy", "lru", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--trace" in err and first in err and second in err and "Traceback" not in err
    assert not out.exists()


def test_cost_flags_must_be_finite_and_are_named(tmp_path, capsys):
    """--layer-ms inf, --bandwidth-gbps inf or one so small that a copy takes forever ran, and wrote
    Infinity into the JSON (not JSON: json.loads in other languages refuses it); a bad value was
    reported by its field name (expert_bytes), not its flag. Now each is refused naming the flag."""
    path = save_trace(tmp_path / "t.npz", [[[0, 1], [2, 3]]] * 3, 4)
    for flag, value in [("--layer-ms", "inf"), ("--bandwidth-gbps", "inf"), ("--bandwidth-gbps", "1e-320"),
                        ("--bandwidth-gbps", "nan"), ("--expert-bytes", "0"), ("--layer-ms", "-1")]:
        out = tmp_path / "sim.json"
        assert cli_main(["cache-sim", "--trace", path, "--policy", "lru", flag, value, "--json", str(out)]) == 2, flag
        err = capsys.readouterr().err
        assert f"{flag} must be" in err and "finite" in err and "Traceback" not in err, (flag, value, err)
        assert not out.exists()
    with pytest.raises(ValueError, match="layer_ms must be a finite number > 0"):
        CostModel(layer_ms=float("inf"))
    with pytest.raises(ValueError, match="copy time"):
        CostModel(bandwidth_gbps=1e-320)


def test_unknown_policy_is_refused_naming_the_flag(tmp_path, capsys):
    """The message named no flag ("policy must be one of ...") and came only once the traces were loaded."""
    path = save_trace(tmp_path / "t.npz", [[[0, 1], [2, 3]]] * 3, 4)
    for policies in (["mru"], ["lru", "all"], ["lru", "LRU"]):
        assert cli_main(["cache-sim", "--trace", path, "--policy", *policies]) == 2
        err = capsys.readouterr().err
        assert "--policy must be one of lru, lfu, static" in err and "or all" in err, err


def test_every_trace_is_checked_before_any_replay(tmp_path, capsys):
    """A bad second --trace (no tokens, other shape than the predictor or fit traces) was refused
    only after the first had been replayed, for nothing: no results were written. Now before."""
    good = save_trace(tmp_path / "good.npz", [[[0, 1], [2, 3]]] * 3, 4)
    other = save_trace(tmp_path / "other.npz", [[[0], [1], [2]]] * 5, 6)
    empty = tmp_path / "empty.npz"
    RoutingTrace(experts=np.zeros((0, 2, 2), np.int16), weights=np.zeros((0, 2, 2), np.float16),
                 seq_offsets=np.array([0]), num_experts=4).save(empty)
    for argv, message in [([good, str(empty)], "holds no tokens"),
                          ([good, other, "--fit-trace", good], "--fit-trace .*good.npz has")]:
        assert cli_main(["cache-sim", "--trace", *argv, "--policy", "lru"]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert "good: capacity" not in err  # the replay log of the first trace: nothing was replayed


def test_lookahead_beyond_the_predictors_is_refused(tmp_path, capsys):
    """--lookahead 5 with a predictor that forecasts 2 layers ahead ran with 2, and the JSON config
    recorded 5. Now refused, naming the flag and the predictor's lookahead; up to it runs."""
    from predictors.registry import make_predictor
    from tests.predictors.synth import layer_map_trace

    trace = layer_map_trace(tokens=40, L=3, E=8, K=2, seqs=2)
    path = str(tmp_path / "lm.npz")
    trace.save(path)
    pred = make_predictor("popularity", 3, 8, 2, 2)
    pred.fit([trace])
    pred.save(tmp_path / "p.safetensors")
    argv = ["cache-sim", "--trace", path, "--policy", "predicted", "--predictor", str(tmp_path / "p.safetensors")]
    assert cli_main([*argv, "--lookahead", "5"]) == 2
    err = capsys.readouterr().err
    assert "--lookahead 5" in err and "lookahead 2" in err, err
    out = tmp_path / "sim.json"
    assert cli_main([*argv, "--lookahead", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["lookahead"] == 2
    next_token = make_predictor("popularity", 3, 8, 2, 0)  # lookahead 0: the next token, same layer
    next_token.fit([trace])
    next_token.save(tmp_path / "p0.safetensors")
    argv[-1] = str(tmp_path / "p0.safetensors")
    assert cli_main([*argv, "--lookahead", "1"]) == 2  # asked beyond it: said so, with why
    assert "(lookahead 0; it forecasts the next token at the same layer" in capsys.readouterr().err
    assert cli_main([*argv, "--lookahead", "0"]) == 0
    # without --lookahead, a next-token predictor runs with its own 0 (the default 1 was refused), recorded so
    assert cli_main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["lookahead"] == 0


def test_json_config_records_every_cost_flag(tmp_path):
    """--prefetch-when idle changes every prefetching policy's figures, but the JSON config left it
    out: a run with it could not be told from one without. Now recorded, with the rest."""
    path = save_trace(tmp_path / "t.npz", [[[0, 1], [2, 3]], [[1, 2], [0, 3]]] * 3, 4)
    out = tmp_path / "sim.json"
    assert cli_main(["cache-sim", "--trace", path, "--prefetch-when", "idle", "--copy-order", "demand-first",
                     "--layer-ms", "0.5", "--json", str(out)]) == 0
    config = json.loads(out.read_text())["config"]
    assert config["prefetch_when"] == "idle" and config["copy_order"] == "demand-first"
    assert config["layer_ms"] == 0.5 and config["policies"] == ["lru", "lfu", "static", "predicted",
                                                                 "predicted-prefetch", "belady", "belady-prefetch"]


def test_empty_fit_trace_is_refused(tmp_path, capsys):
    """A --fit-trace with no tokens ran: the static hot set was "profiled on fit traces" from all-zero
    loads (an arbitrary set), with nothing said. Refused now, as an empty --trace already was."""
    path = save_trace(tmp_path / "t.npz", [[[0, 1], [2, 3]]] * 3, 4)
    empty = tmp_path / "empty.npz"
    RoutingTrace(experts=np.zeros((0, 2, 2), np.int16), weights=np.zeros((0, 2, 2), np.float16),
                 seq_offsets=np.array([0]), num_experts=4).save(empty)
    assert cli_main(["cache-sim", "--trace", path, "--policy", "static", "--fit-trace", str(empty)]) == 2
    assert re.search(r"--fit-trace .*empty.npz holds no tokens", capsys.readouterr().err)


def test_capacities_reported_under_one_key_are_refused(tmp_path, capsys):
    """Results are keyed by the fraction to 6 significant digits: 0.1234567 and 0.1234568 were both
    "0.123457", the second silently replacing the first (and 0.25 twice replayed twice). Refused now."""
    path = save_trace(tmp_path / "t.npz", [[[0, 1], [2, 3]]] * 3, 4)
    for caps in (["0.1234567", "0.1234568"], ["0.25", "0.25"]):
        assert cli_main(["cache-sim", "--trace", path, "--policy", "lru", "--capacity", *caps]) == 2
        err = capsys.readouterr().err
        assert "--capacity" in err and caps[0] in err and caps[1] in err, err


def test_repeated_list_flags_add_up(tmp_path):
    """`--trace a.npz --trace b.npz` replayed only b (argparse kept the last list), and so did a
    repeated --capacity, --policy or --fit-trace: the earlier values were dropped silently."""
    a = save_trace(tmp_path / "a.npz", [[[0, 1], [2, 3]]] * 3, 4)
    b = save_trace(tmp_path / "b.npz", [[[1, 2], [0, 3]]] * 4, 4)
    out = tmp_path / "sim.json"
    assert cli_main(["cache-sim", "--trace", a, "--trace", b, "--capacity", "0.5", "--capacity", "1",
                     "--policy", "lru", "--policy", "belady", "--fit-trace", a, "--fit-trace", b,
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["fit_trace"] == [a, b]
    assert set(data["results"]) == {"a", "b"}
    for caps in data["results"].values():
        assert set(caps) == {"0.5", "1"} and all(set(row) == {"lru", "belady"} for row in caps.values())
    assert cli_main(["cache-sim", "--trace", a, "--json", str(out)]) == 0  # the defaults still apply
    data = json.loads(out.read_text())
    assert data["config"]["capacity"] == [0.25] and len(data["results"]["a"]["0.25"]) == 7


def test_predicted_prefetch_asked_for_without_a_predictor_is_refused(tmp_path, capsys):
    """--policy predicted-prefetch without --predictor ran plain predicted (nothing to prefetch) and
    reported it as predicted-prefetch; the server refuses that setting. Refused here too; with
    --policy all it still runs (there the row equals predicted, as before)."""
    path = save_trace(tmp_path / "t.npz", [[[0, 1], [2, 3]]] * 3, 4)
    assert cli_main(["cache-sim", "--trace", path, "--policy", "predicted-prefetch"]) == 2
    err = capsys.readouterr().err
    assert "--policy predicted-prefetch needs --predictor" in err, err
    assert cli_main(["cache-sim", "--trace", path, "--policy", "all"]) == 0


def test_an_adapting_predictor_starts_afresh_on_every_trace(tmp_path):
    """An online predictor (mlp_online) learns while a trace is replayed; with several --trace files
    the second started from what it had learned on the first, so a trace's figures depended on which
    files came before it. Each trace now gets the predictor as fitted (the file), as when alone."""
    from predictors.registry import make_predictor
    from tests.predictors.synth import layer_map_trace

    first, second = (layer_map_trace(tokens=200, L=3, E=8, K=2, seqs=2, seed=s) for s in (1, 2))
    first.save(tmp_path / "first.npz")
    second.save(tmp_path / "second.npz")
    pred = make_predictor("mlp_online", 3, 8, 2, 2)
    pred.fit([layer_map_trace(tokens=200, L=3, E=8, K=2, seqs=2, seed=3)])
    pred.save(tmp_path / "p.safetensors")

    def second_results(*traces):
        out = tmp_path / "sim.json"
        assert cli_main(["cache-sim", "--trace", *(str(tmp_path / t) for t in traces), "--policy", "predicted",
                         "--capacity", "0.3", "--predictor", str(tmp_path / "p.safetensors"), "--lookahead", "2",
                         "--learn-lag", "0", "--json", str(out)]) == 0
        return json.loads(out.read_text())["results"]["second"]["0.3"]["predicted"]

    alone, after = second_results("second.npz"), second_results("first.npz", "second.npz")
    for key in ("hit_rate", "ready_in_time", "bytes_per_token", "stall_ms_per_token"):
        assert after[key] == alone[key], key


def test_json_output_may_not_overwrite_an_input(tmp_path, capsys):
    """--json naming one of the input files (a slip of the shell) replaced that trace with the
    results. Refused now, before anything runs; the input is left as it was."""
    path = save_trace(tmp_path / "t.npz", [[[0, 1], [2, 3]]] * 3, 4)
    before = (tmp_path / "t.npz").read_bytes()
    same_file = str(tmp_path / "." / "t.npz")  # another spelling of the same path
    for argv in (["--trace", path, "--json", path], ["--trace", path, "--fit-trace", path, "--json", same_file]):
        assert cli_main(["cache-sim", *argv, "--policy", "lru"]) == 2
        assert "--json" in capsys.readouterr().err
        assert (tmp_path / "t.npz").read_bytes() == before


def test_json_naming_an_input_is_refused_by_the_shared_check(tmp_path, capsys):
    """cache-sim refuses --json naming a --trace, --fit-trace (any spelling) with the same check and words as
    place and predict (moe_serve.cli.flags.not_an_input); the input is left as it was."""
    a = save_trace(tmp_path / "a.npz", [[[0, 1], [2, 3]]] * 4, 4)
    b = save_trace(tmp_path / "b.npz", [[[1, 2], [0, 3]]] * 4, 4)
    before = {p: open(p, "rb").read() for p in (a, b)}
    for argv, flag, path in ((["--json", str(tmp_path / "." / "a.npz")], "--trace", a),
                             (["--fit-trace", b, "--json", b], "--fit-trace", b)):
        assert cli_main(["cache-sim", "--trace", a, "--policy", "lru", *argv]) == 2
        assert f"is also an input ({flag} {path}): name another output file" in capsys.readouterr().err
    assert {p: open(p, "rb").read() for p in (a, b)} == before
