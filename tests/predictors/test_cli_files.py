"""`moe-serve predict` output files and --param: an output may not replace an input, a key is given once."""
import numpy as np

from moe_serve.cli.main import main
from predictors import load_predictor
from tests.predictors.synth import layer_map_trace


def test_an_output_may_not_replace_an_input_trace(tmp_path, capsys):
    """`predict fit --out t.npz --trace t.npz` wrote the predictor (safetensors) over the trace and `predict
    eval --json t.npz --test t.npz` the results (JSON): the next run failed on a file that was no longer a
    trace. Refused now with exit 2 naming both flags (any spelling of the path), the trace untouched."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(a)
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3, seed=1).save(b)
    before = {p: p.read_bytes() for p in (a, b)}
    b_again = str(tmp_path / "." / b.name)
    for argv, flags in (
        (["predict", "fit", "--trace", str(a), str(b), "--predictor", "popularity", "--out", b_again],
         ("--out", "--trace")),
        (["predict", "eval", "--train", str(a), "--test", str(b), "--predictors", "popularity", "--json", str(a)],
         ("--json", "--train")),
        (["predict", "eval", "--train", str(a), "--test", str(b), "--predictors", "popularity", "--json", b_again],
         ("--json", "--test")),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert all(f in err for f in flags) and "is also an input" in err, (argv, err)
        assert {p: p.read_bytes() for p in (a, b)} == before, argv
    out = tmp_path / "p.safetensors"  # another output is written as before
    assert main(["predict", "fit", "--trace", str(a), "--predictor", "popularity", "--out", str(out)]) == 0
    assert out.exists()


def test_a_repeated_param_key_is_refused(tmp_path, capsys):
    """`--param smoothing=0.5 --param smoothing=2` kept 2 without a word (the first looked taken): now exit 2
    naming the key and both values, for predict fit and place alike; distinct keys go through."""
    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    out = tmp_path / "p.safetensors"
    rc = main(["predict", "fit", "--trace", str(trace), "--predictor", "transition", "--out", str(out),
               "--param", "smoothing=0.5", "--param", "smoothing=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--param: smoothing given twice (smoothing=0.5, smoothing=2)" in err, err
    assert not out.exists()
    plan = tmp_path / "plan.json"
    rc = main(["place", "--trace", str(trace), "--ep", "2", "--out", str(plan),
               "--param", "max_iters=3", "--param", "max_iters=5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--param: max_iters given twice (max_iters=3, max_iters=5)" in err, err
    assert not plan.exists()
    assert main(["predict", "fit", "--trace", str(trace), "--predictor", "transition", "--out", str(out),
                 "--param", "smoothing=0.5", "--param", "weighted=false"]) == 0
    assert load_predictor(out).params == {"smoothing": 0.5, "weighted": False}
    assert np.isfinite(load_predictor(out).params["smoothing"])


def test_predictors_that_read_no_hidden_states_are_run_without_loading_them(tmp_path, capsys):
    """predict fit / eval loaded every trace's hidden states (float16 [T, L, H], ~850 MB for a full
    DeepSeek-shaped trace; eval then made a float32 copy) whatever the predictor. Those that read none now
    never load them: their results equal those on the same traces without hidden states, and a trace whose
    hidden member cannot be read is accepted for them (the old code refused it). mlp still gets them."""
    import json

    from predictors.traces import RoutingTrace
    from tests.predictors.synth import router_trace

    t, _ = router_trace(tokens=300, L=3, E=8, K=2, seqs=6)
    with_hidden, without, broken = tmp_path / "h.npz", tmp_path / "n.npz", tmp_path / "b.npz"
    t.save(with_hidden)
    RoutingTrace(t.experts, t.weights, t.seq_offsets, t.num_experts).save(without)
    np.savez(broken, experts=t.experts, weights=t.weights, seq_offsets=t.seq_offsets,
             meta=np.array('{"num_experts": 8}'), hidden=np.array(["not", "numbers"]))
    names = "popularity,transition,prev_token,logreg,sgd"
    results = {}
    for path in (with_hidden, without, broken):
        out = tmp_path / f"{path.stem}.json"
        assert main(["predict", "eval", "--train", str(path), "--test", str(path), "--predictors", names,
                     "--lookahead", "1", "--json", str(out)]) == 0, capsys.readouterr().err
        res = json.loads(out.read_text())["results"]
        results[path.stem] = {n: {k: v for k, v in r.items() if "_s" not in k and "_ms" not in k} for n, r in res.items()}
        assert main(["predict", "fit", "--trace", str(path), "--predictor", "transition",
                     "--out", str(tmp_path / f"{path.stem}.safetensors")]) == 0
    assert results["h"] == results["n"] == results["b"] and set(results["h"]) == set(names.split(","))
    capsys.readouterr()
    assert main(["predict", "fit", "--trace", str(broken), "--predictor", "mlp", "--param", "epochs=1",
                 "--out", str(tmp_path / "m.safetensors")]) == 2  # mlp reads hidden states: it still loads them
    assert "'hidden' must hold numbers" in capsys.readouterr().err
