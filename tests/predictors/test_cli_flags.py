"""`moe-serve predict` flags: a bad value is exit code 2 with one line naming the flag and its limit."""
from moe_serve.cli.main import main
from tests.predictors.synth import layer_map_trace


def _traces(tmp_path):
    a, k3 = tmp_path / "a.npz", tmp_path / "k3.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(a)
    layer_map_trace(tokens=60, L=3, E=8, K=3, seqs=3).save(k3)
    return str(a), str(k3)


def test_budget_out_of_range_names_the_flag(tmp_path, capsys):
    a, _ = _traces(tmp_path)
    for budget in ("0", "9", "-2"):
        rc = main(["predict", "eval", "--train", a, "--test", a, "--predictors", "popularity", "--budget", budget])
        err = capsys.readouterr().err
        # was: 'budget must lie in [1, num_experts=8]', no flag named
        assert rc == 2 and err == (f"moe-serve predict: error: --budget must lie in [1, 8] (the traces' experts per "
                                   f"MoE layer), got {budget}\n"), err


def test_fit_on_traces_of_different_shapes_names_the_flag_and_file(tmp_path, capsys):
    a, k3 = _traces(tmp_path)
    out = tmp_path / "p.safetensors"
    rc = main(["predict", "fit", "--trace", a, k3, "--predictor", "popularity", "--out", str(out)])
    err = capsys.readouterr().err
    # was: 'popularity: trace has (layers, experts, top_k)=(3, 8, 3), predictor (3, 8, 2)': which trace?
    assert rc == 2 and f"--trace: {k3} has (MoE layers, experts, top_k)=(3, 8, 3), {a} has (3, 8, 2)" in err, err
    assert not out.exists()
