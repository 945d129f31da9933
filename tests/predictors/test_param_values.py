"""Predictor parameter values outside their kind or range are refused when the predictor is made,
naming the predictor, the key and the limit (they ended in a ZeroDivisionError, a torch RuntimeError,
NaN tables or a saved untrained net); `moe-serve predict` says which flag, with exit code 2."""
import pytest

from moe_serve.cli.main import main
from predictors.registry import REGISTRY, make_predictor
from tests.predictors.synth import layer_map_trace


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_parameter_has_a_limit(name):
    cls = REGISTRY[name]
    assert cls.accepted_params() == set(cls.param_limits()), sorted(cls.accepted_params() ^ set(cls.param_limits()))


@pytest.mark.parametrize("name, key, value, limit", [
    ("mlp", "batch", 0, "an integer >= 1"),  # was: ZeroDivisionError in fit
    ("mlp", "dim", -3, "an integer >= 1"),  # was: RuntimeError, negative dimension
    ("mlp", "epochs", 0, "an integer >= 1"),  # was: an untrained net, saved
    ("mlp", "epochs", 2.5, "an integer >= 1"),  # was: 2 epochs, silently
    ("mlp", "epochs", "abc", "an integer >= 1"),  # was: "invalid literal for int() with base 10: 'abc'"
    ("mlp", "epochs", True, "an integer >= 1"),
    ("mlp", "trunk_dropout", 1.0, "a number in [0, 1)"),  # was: a division by zero in the dropout scale
    ("mlp", "lr", float("nan"), "a number >= 0"),
    ("mlp", "hidden_direct", "yes", "true or false"),
    ("mlp_online", "online_buffer", 0, "an integer >= 1"),
    ("mlp_online", "online_dropout", -0.1, "a number in [0, 1)"),
    ("transition", "smoothing", 0, "a number > 0"),  # was: NaN rows for experts never seen
    ("ensemble", "holdout", 2, "a number in (0, 1)"),  # was: "test_fraction must lie in (0, 1)"
    ("ensemble", "members", "mlp", "a non-empty list of predictor names"),  # was: members 'm', 'l', 'p'
    ("ensemble", "members", [], "a non-empty list of predictor names"),
    ("router", "source", "model", "one of 'checkpoint', 'fitted'"),
    ("logreg", "C", 0, "a number > 0"),
    ("sgd", "chunk", 0, "an integer >= 1"),
])
def test_a_value_out_of_range_is_refused_naming_key_and_limit(name, key, value, limit):
    with pytest.raises(ValueError) as info:
        make_predictor(name, 3, 8, 2, 1, **{key: value})
    assert str(info.value) == f"{name}: parameter {key!r} must be {limit}, got {value!r}"


def test_cli_names_the_flag_and_exits_2(tmp_path, capsys):
    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    out = tmp_path / "p.safetensors"
    rc = main(["predict", "fit", "--trace", str(trace), "--out", str(out), "--predictor", "mlp", "--param", "batch=0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "moe-serve predict: error: --param: mlp: parameter 'batch' must be an integer >= 1, got 0"
    assert not out.exists()
    rc = main(["predict", "eval", "--train", str(trace), "--test", str(trace), "--predictors", "transition",
               "--params", '{"transition": {"smoothing": -1}}'])
    err = capsys.readouterr().err
    assert rc == 2 and "--params: transition: parameter 'smoothing' must be a number > 0, got -1" in err


def test_ensemble_member_params_that_are_not_objects_are_refused(tmp_path, capsys):
    trace = tmp_path / "t.npz"
    layer_map_trace(tokens=60, L=3, E=8, K=2, seqs=3).save(trace)
    out = tmp_path / "p.safetensors"
    rc = main(["predict", "fit", "--trace", str(trace), "--out", str(out), "--predictor", "ensemble",
               "--param", 'member_params={"mlp": 4}'])
    err = capsys.readouterr().err  # was: TypeError 'argument after ** must be a mapping, not int', a traceback
    assert rc == 2 and "ensemble: member_params['mlp'] must be an object of mlp's parameters, got 4" in err, err
