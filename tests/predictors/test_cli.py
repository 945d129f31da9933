"""`moe-serve predict fit` and `predict eval` end to end on the shared DeepSeek-V2-Lite traces."""
import json
import re

import numpy as np
import torch

from moe_serve.cli.main import main
from predictors import load_predictor, load_trace
from predictors.base import RoutingState


def _small(shared_dir, name, tmp_path, seqs):
    """A few whole sequences of a shared trace (keeps the test fast)."""
    trace = load_trace(shared_dir / "traces" / f"dsv2lite_{name}.npz")
    part = trace.select_sequences(seqs)
    path = tmp_path / f"{name}.npz"
    part.save(path)
    return path, part


def test_predict_fit_and_eval_on_shared_traces(shared_dir, tmp_path, capsys):
    train_path, train = _small(shared_dir, "intent", tmp_path, range(0, 30))
    test_path, test = _small(shared_dir, "summary", tmp_path, [0])
    out = tmp_path / "transition.safetensors"
    assert main(["predict", "fit", "--trace", str(train_path), "--predictor", "transition", "--lookahead", "2", "--out", str(out)]) == 0
    pred = load_predictor(out)
    assert (pred.name, pred.lookahead, pred.num_layers, pred.num_experts, pred.top_k) == ("transition", 2, 26, 64, 6)
    scores = pred.predict(RoutingState.from_trace(test, 3, rows=np.arange(64)), 3)
    assert scores.shape == (64, 2, 64) and torch.isfinite(scores).all()

    js = tmp_path / "eval.json"
    rc = main(["predict", "eval", "--train", str(train_path), "--test", str(test_path), "--lookahead", "2",
               "--predictors", "popularity,transition,prev_token,router", "--json", str(js)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "transition" in table and "next_token" in table and "skipped" in table
    res = json.loads(js.read_text())
    assert res["skipped"] == {"router": "needs hidden states; the traces have none"}
    for name in ("popularity", "transition", "prev_token"):
        r = res["results"][name]
        for slot in ("lookahead_1", "lookahead_2", "next_token"):
            for metric in ("recall_at_k", "precision_at_budget", "recall_at_budget"):
                assert 0.0 <= r[slot][metric] <= 1.0
        assert r["fit_s"] >= 0 and r["predict_ms_b64"] > 0
    # routing structure is real: counting beats popularity on another domain
    assert res["results"]["transition"]["lookahead_1"]["recall_at_k"] > res["results"]["popularity"]["lookahead_1"]["recall_at_k"] + 0.1


def test_predict_cli_errors_name_the_field(shared_dir, tmp_path, capsys):
    rc = main(["predict", "fit", "--trace", str(tmp_path / "missing.npz"), "--predictor", "transition", "--out", str(tmp_path / "x")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    train_path, _ = _small(shared_dir, "intent", tmp_path, [0, 1])
    rc = main(["predict", "eval", "--train", str(train_path), "--test", str(train_path), "--budget", "65", "--predictors", "popularity"])
    assert rc == 2 and "budget" in capsys.readouterr().err


def test_predict_eval_refuses_traces_of_another_shape_and_bad_params(tmp_path, capsys):
    from predictors.traces import RoutingTrace

    def trace(path, E, K):
        ex = np.stack([np.arange(K) + (t % 2) for t in range(40)])[:, None, :].repeat(3, 1).astype(np.int16)
        RoutingTrace(experts=ex, weights=np.ones(ex.shape, dtype=np.float16), seq_offsets=np.array([0, 40]),
                     num_experts=E).save(path)
        return str(path)

    a, b, c = trace(tmp_path / "a.npz", 8, 2), trace(tmp_path / "b.npz", 16, 2), trace(tmp_path / "c.npz", 8, 3)
    for other, shape in ((b, r"\(3, 16, 2\)"), (c, r"\(3, 8, 3\)")):
        rc = main(["predict", "eval", "--train", a, "--test", other, "--predictors", "popularity"])
        err = capsys.readouterr().err
        assert rc == 2 and re.search(rf"--train/--test: {re.escape(other)} has \(MoE layers, experts, top_k\)={shape}", err), err
    for bad in ("[1]", "{not json", '{"mlp": 4}'):
        rc = main(["predict", "eval", "--train", a, "--test", a, "--predictors", "popularity", "--params", bad])
        err = capsys.readouterr().err
        assert rc == 2 and "--params must be" in err, err


def test_predict_eval_runs_mlp_online_prequentially(shared_dir, tmp_path, capsys):
    train_path, _ = _small(shared_dir, "intent", tmp_path, range(0, 20))
    test_path, test = _small(shared_dir, "summary", tmp_path, [0])
    js = tmp_path / "eval.json"
    params = json.dumps({"mlp": {"epochs": 1, "dim": 32}, "mlp_online": {"epochs": 1, "dim": 32}})
    assert main(["predict", "eval", "--train", str(train_path), "--test", str(test_path), "--lookahead", "1",
                 "--no-next-token", "--predictors", "mlp,mlp_online", "--params", params, "--json", str(js)]) == 0
    res = json.loads(js.read_text())["results"]
    on, off = res["mlp_online"], res["mlp"]
    assert on["prequential"] is True and on["observe_s"] > 0 and "observe_s" not in off
    assert on["lookahead_1"]["rows"] == off["lookahead_1"]["rows"] == test.num_tokens * 25  # layers 0..24 have a next layer
    # it learns from the summary stream it has already seen: better than the same net frozen
    assert on["lookahead_1"]["recall_at_k"] > off["lookahead_1"]["recall_at_k"] + 0.03
    out = tmp_path / "o.safetensors"
    assert main(["predict", "fit", "--trace", str(train_path), "--predictor", "mlp_online", "--param", "epochs=1",
                 "--param", "dim=32", "--out", str(out)]) == 0
    assert load_predictor(out).name == "mlp_online"


def test_predict_cli_refuses_a_parameter_the_predictor_does_not_take(tmp_path, capsys):
    """`--param online_stpes=4` was ignored: the predictor trained with online_steps=1 and said nothing."""
    from tests.predictors.synth import layer_map_trace

    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    out = tmp_path / "p.safetensors"
    for argv, message in (
        (["--predictor", "mlp_online", "--param", "online_stpes=4"],
         "--param: mlp_online does not take parameter 'online_stpes'; it takes: batch, cur_window, dim, epochs, "),
        (["--predictor", "mlp", "--param", "epochs=1", "--param", "dimm=256"], "--param: mlp does not take parameter 'dimm'"),
        (["--predictor", "popularity", "--param", "seed=1"], "--param: popularity does not take parameter 'seed'; it takes no parameters"),
        (["--predictor", "sgd", "--param", "epoch=2"], "--param: sgd does not take parameter 'epoch'; it takes: alpha, chunk, epochs, eta0, max_tokens"),
        (["--predictor", "ensemble", "--param", 'member_params={"mlp": {"dimm": 8}}'],
         "ensemble: member 'mlp': mlp does not take parameter 'dimm'"),
    ):
        rc = main(["predict", "fit", "--trace", str(trace), "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("moe-serve predict: error: ") and message in err, (argv, err)
        assert not out.exists()
    rc = main(["predict", "eval", "--train", str(trace), "--test", str(trace), "--predictors", "popularity,transition",
               "--params", '{"transition": {"smoothin": 2}}'])
    captured = capsys.readouterr()
    assert rc == 2 and "--params: transition does not take parameter 'smoothin'; it takes: smoothing, weighted" in captured.err
    assert "fit" not in captured.err  # refused before the first predictor was fitted
    rc = main(["predict", "eval", "--train", str(trace), "--test", str(trace), "--predictors", "popularity",
               "--params", '{"mlpp": {"dim": 8}}'])
    assert rc == 2 and "--params: 'mlpp' is not a predictor" in capsys.readouterr().err
    # every key accepted goes through (values parsed as before: JSON when it parses)
    assert main(["predict", "fit", "--trace", str(trace), "--out", str(out), "--predictor", "transition",
                 "--param", "smoothing=0.5", "--param", "weighted=false"]) == 0
    assert load_predictor(out).params == {"smoothing": 0.5, "weighted": False}


def test_predict_cli_refuses_a_lookahead_past_the_last_layer_and_empty_predictor_names(tmp_path, capsys):
    """`predict fit --lookahead 99` on a 3-layer trace fitted (and saved) a predictor whose slots 3..99 score
    zeros for every layer; `predict eval --predictors ""` ran every predictor (minutes), "a,,b" failed late."""
    from tests.predictors.synth import layer_map_trace

    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    out = tmp_path / "p.safetensors"
    for la in ("99", "3", "-1"):
        rc = main(["predict", "fit", "--trace", str(trace), "--predictor", "transition", "--lookahead", la, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert f"--lookahead must lie in [0, 2] (MoE layers - 1; {trace} has 3 MoE layers), got {la}" in err
        assert not out.exists()
    rc = main(["predict", "eval", "--train", str(trace), "--test", str(trace), "--predictors", "popularity", "--lookahead", "5"])
    assert rc == 2 and "--lookahead must lie in [0, 2]" in capsys.readouterr().err
    rc = main(["predict", "eval", "--train", str(trace), "--test", str(trace), "--predictors", "popularity",
               "--lookahead", "0", "--no-next-token"])
    assert rc == 2 and "--lookahead 0 with --no-next-token" in capsys.readouterr().err
    for names, message in (("", "--predictors: an empty name in ''"), ("popularity,,transition", "--predictors: an empty name"),
                           ("popularity,", "--predictors: an empty name"), ("popularty", "--predictors: 'popularty' is not a predictor"),
                           ("popularity,popularity", "names a predictor twice")):
        rc = main(["predict", "eval", "--train", str(trace), "--test", str(trace), "--predictors", names])
        captured = capsys.readouterr()
        assert rc == 2 and message in captured.err and "fit" not in captured.err, (names, captured.err)
    # the largest lookahead there is works, and eval's default (3) stops at the traces' last layer
    assert main(["predict", "fit", "--trace", str(trace), "--predictor", "transition", "--lookahead", "2", "--out", str(out)]) == 0
    assert load_predictor(out).lookahead == 2
    js = tmp_path / "e.json"
    assert main(["predict", "eval", "--train", str(trace), "--test", str(trace), "--predictors", " popularity",
                 "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    slots = {k for k in res["results"]["popularity"] if k.startswith(("lookahead_", "next_token"))}
    assert res["lookahead"] == 2 and slots == {"lookahead_1", "lookahead_2", "next_token"}
