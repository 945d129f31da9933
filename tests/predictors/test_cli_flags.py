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


def _checkpoint(path, L: int, E: int, H: int, seed: int = 0):
    """A checkpoint directory holding only routers: model.layers.{i}.mlp.gate.weight [E, H]."""
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    gen = torch.Generator().manual_seed(seed)
    routers = {f"model.layers.{i}.mlp.gate.weight": torch.randn(E, H, generator=gen) for i in range(L)}
    save_file(routers, str(path / "model.safetensors"))
    return routers


def test_router_checkpoint_must_fit_the_traces_and_the_predictor(tmp_path, capsys):
    import torch

    from predictors import load_predictor
    from tests.predictors.synth import router_trace

    trace = tmp_path / "h.npz"
    router_trace(tokens=80, L=3, E=8, K=2, H=8, seqs=3)[0].save(trace)
    out = tmp_path / "p.safetensors"
    _checkpoint(tmp_path / "two_layers", L=2, E=8, H=8)
    _checkpoint(tmp_path / "h4", L=3, E=8, H=4)
    routers = _checkpoint(tmp_path / "good", L=3, E=8, H=8)

    def fit(predictor, ckpt, *extra):
        rc = main(["predict", "fit", "--trace", str(trace), "--predictor", predictor, "--out", str(out),
                   "--router-checkpoint", str(tmp_path / ckpt), *extra])
        return rc, capsys.readouterr().err

    # was: exit 0, a 2-layer router predictor saved for a 3-layer trace
    rc, err = fit("router", "two_layers")
    assert rc == 2 and (f"--router-checkpoint {tmp_path / 'two_layers'} has 2 MoE layers with 8 experts, "
                        f"--trace {trace} has 3") in err, err
    # was: exit 0, a predictor that fails on every predict() with the traces' hidden states
    rc, err = fit("router", "h4")
    assert rc == 2 and f"--router-checkpoint {tmp_path / 'h4'} has hidden size 4, --trace {trace} has 8" in err, err
    # was: ignored in silence (transition has no use for routers; hidden_linear had one but was not given them)
    rc, err = fit("transition", "good")
    assert rc == 2 and "--router-checkpoint applies to predictors hidden_linear, mlp, mlp_online, router; not transition" in err
    plain = tmp_path / "plain.npz"  # no hidden states: mlp fitted without the hidden-state map, silently
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(plain)
    rc = main(["predict", "fit", "--trace", str(plain), "--predictor", "mlp", "--out", str(out),
               "--router-checkpoint", str(tmp_path / "good")])
    assert rc == 2 and f"--router-checkpoint starts mlp's hidden-state map, but --trace {plain} has no hidden" in capsys.readouterr().err
    assert not out.exists()
    assert fit("router", "good")[0] == 0
    want = torch.stack([routers[f"model.layers.{i}.mlp.gate.weight"] for i in range(3)])
    assert torch.equal(load_predictor(out).weight, want)
    # hidden_linear starts from the routers: a strong pull towards the start keeps it there
    assert fit("hidden_linear", "good", "--param", "l2=1e6", "--param", "steps=2")[0] == 0
    weight = load_predictor(out).weight  # [D, L, E, H]: slot 0 at source layer l starts as layer l+1's router
    assert torch.allclose(weight[0, 0], want[1], atol=1e-3) and torch.allclose(weight[0, 1], want[2], atol=1e-3)


def test_eval_on_traces_with_hidden_states_of_different_sizes_names_them(tmp_path, capsys):
    # the hidden-state predictors were fitted on one size and failed on the other, after every fit before them
    from tests.predictors.synth import router_trace

    a, b = tmp_path / "h8.npz", tmp_path / "h16.npz"
    router_trace(tokens=60, L=3, E=8, K=2, H=8, seqs=3)[0].save(a)
    router_trace(tokens=60, L=3, E=8, K=2, H=16, seqs=3)[0].save(b)
    rc = main(["predict", "eval", "--train", str(a), "--test", str(b), "--predictors", "popularity,router"])
    captured = capsys.readouterr()
    assert rc == 2 and f"--train/--test: {b} has hidden states of size 16, {a} of size 8" in captured.err, captured.err
    assert "fit" not in captured.err


def test_eval_default_budget_fits_few_experts(tmp_path, capsys):
    # the default budget 2 * top_k (6 for top-3) exceeds 4 experts: eval refused a budget never given
    import json

    trace, out = tmp_path / "k3e4.npz", tmp_path / "e.json"
    layer_map_trace(tokens=60, L=3, E=4, K=3, seqs=3).save(trace)
    rc = main(["predict", "eval", "--train", str(trace), "--test", str(trace), "--predictors", "popularity", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["budget"] == 4


def test_router_from_a_checkpoint_refuses_fit_parameters(tmp_path, capsys):
    # --param steps=5 with --router-checkpoint: the routers are taken as they are, no fit runs; was ignored
    from tests.predictors.synth import router_trace

    trace = tmp_path / "h.npz"
    router_trace(tokens=60, L=3, E=8, K=2, H=8, seqs=3)[0].save(trace)
    _checkpoint(tmp_path / "ckpt", L=3, E=8, H=8)
    out = tmp_path / "p.safetensors"
    rc = main(["predict", "fit", "--trace", str(trace), "--predictor", "router", "--out", str(out),
               "--router-checkpoint", str(tmp_path / "ckpt"), "--param", "steps=5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--param: router from --router-checkpoint is not fitted: steps would have no effect" in err, err
    assert not out.exists()


def test_a_router_checkpoint_with_an_unreadable_file_names_it(tmp_path, capsys):
    # was: safetensors' 'header too large' traceback
    from tests.predictors.synth import router_trace

    trace = tmp_path / "h.npz"
    router_trace(tokens=60, L=3, E=8, K=2, H=8, seqs=3)[0].save(trace)
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "model.safetensors").write_text("not a checkpoint\n" * 10)
    rc = main(["predict", "fit", "--trace", str(trace), "--predictor", "router", "--out", str(tmp_path / "p.safetensors"),
               "--router-checkpoint", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and f"router checkpoint {bad}: {bad / 'model.safetensors'} is not a readable safetensors file" in err, err
