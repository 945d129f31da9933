"""`moe-serve place` output files and flags: an output may not replace an input, and a bad flag is named."""
import numpy as np
import pytest

from moe_serve.cli.main import main
from tests.predictors.synth import layer_map_trace


@pytest.fixture
def trace_and_plan(tmp_path):
    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    plan = tmp_path / "p.json"
    assert main(["place", "--trace", str(trace), "--ep", "2", "--algorithm", "contiguous", "--out", str(plan)]) == 0
    return trace, plan


def test_an_output_may_not_replace_an_input(trace_and_plan, capsys):
    """`place --out t.npz --trace t.npz` wrote the plan (JSON) over the trace; `place eval --json p.json
    --plan p.json` (or --json naming a --trace) wrote the scores over it, so the next eval failed on a
    file that was no longer a plan. Refused now with exit 2 naming both flags, the input untouched."""
    trace, plan = trace_and_plan
    before = {p: p.read_bytes() for p in (trace, plan)}
    other_spelling = str(trace.parent / "." / trace.name)
    for argv, flags in (
        (["place", "--trace", str(trace), "--ep", "2", "--out", other_spelling], ("--out", "--trace")),
        (["place", "eval", "--plan", str(plan), "--trace", str(trace), "--json", str(plan)], ("--json", "--plan")),
        (["place", "eval", "--plan", str(plan), "--trace", str(trace), "--json", other_spelling], ("--json", "--trace")),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert all(f in err for f in flags), (argv, err)
        assert {p: p.read_bytes() for p in (trace, plan)} == before, argv
    assert main(["place", "eval", "--plan", str(plan), "--trace", str(trace)]) == 0  # the plan is still one


@pytest.mark.parametrize("online", [[], ["--online-budget", "2"]])
@pytest.mark.parametrize("size", ["0", "-3"])
def test_eval_refuses_a_batch_size_below_one_naming_the_flag(trace_and_plan, capsys, size, online):
    """--batch-size 0 was refused in the scorer's words ('score: batch_size must be >= 1'), not the flag's."""
    trace, plan = trace_and_plan
    assert main(["place", "eval", "--plan", str(plan), "--trace", str(trace), "--batch-size", size, *online]) == 2
    assert f"--batch-size must be >= 1, got {size}" in capsys.readouterr().err


def test_an_unknown_algorithm_names_the_flag(trace_and_plan, capsys):
    """'--algorithm foo' was refused as "placement: algorithm 'foo' is not one of [...]", naming no flag."""
    trace, plan = trace_and_plan
    assert main(["place", "--trace", str(trace), "--ep", "2", "--algorithm", "foo", "--out", str(plan)]) == 2
    err = capsys.readouterr().err
    assert "--algorithm foo is not one of affinity, contiguous, eplb, round_robin" in err, err


@pytest.mark.parametrize("algorithm", ["contiguous", "round_robin", "affinity"])
def test_num_nodes_is_refused_where_the_algorithm_ignores_it(trace_and_plan, capsys, algorithm):
    """'--num-nodes 2' with any algorithm but eplb was silently ignored: a plan for one node was written as
    if it respected the node boundaries."""
    trace, plan = trace_and_plan
    before = plan.read_bytes()
    argv = ["place", "--trace", str(trace), "--ep", "2", "--algorithm", algorithm, "--out", str(plan)]
    assert main(argv + ["--num-nodes", "2"]) == 2
    assert f"--num-nodes 2: only eplb places over nodes, not {algorithm}" in capsys.readouterr().err
    assert plan.read_bytes() == before
    assert main(argv + ["--num-nodes", "1"]) == 0  # the default, said out loud


def test_eval_on_a_trace_of_other_layers_names_the_flags(trace_and_plan, tmp_path, capsys):
    """A --trace with another number of MoE layers than the plan was refused in the scorer's words
    ('score: trace has 4 MoE layers, plan has 3'); experts per layer were already named by flag."""
    _, plan = trace_and_plan
    other = tmp_path / "four_layers.npz"
    layer_map_trace(tokens=60, L=4, E=8, K=2, seqs=3).save(other)
    for online in ([], ["--online-budget", "2"]):
        assert main(["place", "eval", "--plan", str(plan), "--trace", str(other), *online]) == 2
        err = capsys.readouterr().err
        assert f"--trace has 4 MoE layers, the --plan {plan} 3" in err, err


def test_an_action_after_the_traces_is_named_not_read_as_a_trace(trace_and_plan, capsys, monkeypatch):
    """`place --trace t.npz eval --plan p.json`: --trace (nargs='+') took 'eval' as a second trace, the
    action stayed fit and the run failed with 'trace file eval does not exist'. Now exit 2 saying that
    'eval' is the action and to put it first; a trace file really named so is still read."""
    trace, plan = trace_and_plan
    for action, rest in (("eval", ["--plan", str(plan)]), ("fit", ["--ep", "2", "--out", str(plan.with_name("q.json"))])):
        assert main(["place", "--trace", str(trace), action, *rest]) == 2
        err = capsys.readouterr().err
        assert f"--trace: {action!r} is the action, not a trace file" in err, err
        assert f"moe-serve place {action} --trace" in err and "does not exist" not in err, err
        assert not plan.with_name("q.json").exists()
    trace.with_name("eval").write_bytes(trace.read_bytes())  # a trace file named like the action: read
    monkeypatch.chdir(trace.parent)
    assert main(["place", "eval", "--plan", str(plan), "--trace", "eval"]) == 0


def test_a_flag_of_the_other_action_is_refused(trace_and_plan, capsys):
    """`place --trace t.npz --out p.json --json s.json` wrote the plan and no scores, and `place eval ... --ep 4
    --out x.json` scored the plan's own ranks: a flag of the other action was ignored without a word. Now
    exit 2 naming the flags and the action they belong to; nothing is written."""
    trace, plan = trace_and_plan
    new_plan, scores = plan.with_name("q.json"), plan.with_name("s.json")
    for argv, message in (
        (["place", "--trace", str(trace), "--ep", "2", "--out", str(new_plan), "--json", str(scores),
          "--batch-size", "64"], "--json, --batch-size: only for 'place eval'"),
        (["place", "eval", "--plan", str(plan), "--trace", str(trace), "--ep", "4", "--out", str(new_plan)],
         "--ep, --out: only for 'place fit'"),
        (["place", "eval", "--plan", str(plan), "--trace", str(trace), "--param", "max_iters=3"],
         "--param: only for 'place fit'"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert not new_plan.exists() and not scores.exists()
    # the defaults, spelt out, are no change: accepted
    assert main(["place", "eval", "--plan", str(plan), "--trace", str(trace), "--ep", "8", "--json", str(scores)]) == 0


@pytest.mark.parametrize("algorithm", ["contiguous", "round_robin", "eplb"])
def test_no_tokens_is_refused_where_the_algorithm_reads_no_tokens(trace_and_plan, capsys, algorithm):
    """'--no-tokens' (affinity: fit from the co-activation matrix) with another algorithm was silently
    ignored: they fit from the load alone either way, and the user thought the switch did something."""
    trace, plan = trace_and_plan
    before = plan.read_bytes()
    argv = ["place", "--trace", str(trace), "--ep", "2", "--algorithm", algorithm, "--out", str(plan)]
    assert main(argv + ["--no-tokens"]) == 2
    assert f"--no-tokens: only affinity fits from tokens, not {algorithm}" in capsys.readouterr().err
    assert plan.read_bytes() == before
    assert main(argv[:-4] + ["--algorithm", "affinity", "--out", str(plan), "--no-tokens"]) == 0
