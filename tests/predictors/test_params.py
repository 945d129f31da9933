"""Predictor parameters: a key no code reads is refused (naming it and the accepted ones), every key
some code reads is accepted, and saved files still load."""
import ast
import inspect
import json
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from predictors import load_predictor
from predictors.base import Predictor, RoutingState, trace_tensors
from predictors.compare import compare
from predictors.registry import REGISTRY, make_predictor
from tests.predictors.synth import layer_map_trace, router_trace

L, E, K = 3, 8, 2

# a valid (and cheap) value for every parameter some predictor takes; a key added to a PARAMS set
# without one here fails test_every_predictor_takes_its_full_params_set
VALID = dict(
    smoothing=0.5, weighted=False,  # transition
    steps=3, l2=1e-3, source="fitted",  # router, hidden_linear
    max_tokens=200, C=0.5, max_iter=5, alpha=1e-3, eta0=0.1, chunk=64, epochs=1,  # logreg, sgd
    dim=8, hidden_direct=True, seed=3, cur_window=2, prev_before=1, prev_after=0, use_hidden=True, batch=32,
    lr=1e-2, weight_decay=0.0, trunk_dropout=0.1, hidden_size=0,  # mlp
    online_steps=2, online_batch=16, online_lr=1e-3, online_dropout=0.0, online_buffer=50,  # mlp_online
    members=["transition", "mlp"], holdout=0.25, member_params={"mlp": dict(epochs=1, dim=8)},
    member_configs=[],  # ensemble
)


@pytest.mark.parametrize("name, typo, want", [
    ("popularity", "seed", None),  # takes none: seed is read by the MLPs only
    ("transition", "smoothin", "smoothing"),
    ("mlp", "dimm", "dim"),
    ("mlp_online", "online_stpes", "online_steps"),
    ("ensemble", "member", "members"),
    ("logreg", "c", "C"),
    ("sgd", "epoch", "epochs"),
])
def test_make_predictor_refuses_a_key_it_does_not_read(name, typo, want):
    with pytest.raises(ValueError) as info:
        make_predictor(name, L, E, K, 1, **{typo: 4})
    msg = str(info.value)
    assert msg.startswith(f"{name} does not take parameter {typo!r}; it takes"), msg
    accepted = sorted(REGISTRY[name].accepted_params())
    assert (f"it takes: {', '.join(accepted)}" if accepted else "it takes no parameters") in msg, msg
    if want:
        assert f"did you mean {want!r}" in msg, msg


def test_mlp_online_takes_the_mlps_parameters_too():
    accepted = REGISTRY["mlp_online"].accepted_params()
    assert REGISTRY["mlp"].accepted_params() < accepted and {"online_steps", "dim", "seed"} <= accepted
    with pytest.raises(ValueError, match=r"parameters 'dimm', 'online_stpes'; it takes: batch, cur_window, dim, "):
        make_predictor("mlp_online", L, E, K, 1, dimm=8, online_stpes=2)


def _self_params_keys(cls) -> set[str]:
    """Constant keys that the methods of `cls` (its own source) read or write on self.params."""
    keys = set()

    def on_self_params(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "params" and isinstance(node.value, ast.Name)
                and node.value.id == "self")

    for node in ast.walk(ast.parse(inspect.getsource(cls))):
        if isinstance(node, ast.Subscript) and on_self_params(node.value) and isinstance(node.slice, ast.Constant):
            keys.add(node.slice.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and on_self_params(node.func.value)
              and node.args and isinstance(node.args[0], ast.Constant)):
            keys.add(node.args[0].value)
        elif isinstance(node, ast.Compare) and any(on_self_params(c) for c in node.comparators) and isinstance(node.left, ast.Constant):
            keys.add(node.left.value)
    return keys


def _predictor_classes():
    seen = []
    for cls in REGISTRY.values():
        seen += [c for c in cls.__mro__ if issubclass(c, Predictor) and c not in seen]
    return seen


def test_every_key_the_code_reads_is_accepted():
    """Drift: a class whose code reads self.params["x"] (or .get("x")) but whose PARAMS lack it would
    refuse a valid key. Read from the source, so every code path counts (observe, load_arrays, ...)."""
    classes = _predictor_classes()
    assert {"Predictor", "CountPredictor", "LinearPredictor", "MLPPredictor"} <= {c.__name__ for c in classes}
    found = {}
    for cls in classes:
        keys = _self_params_keys(cls)
        found[cls.__name__] = keys
        assert keys <= cls.accepted_params(), (cls.__name__, keys - cls.accepted_params())
    # the reader sees the reads it must (a broken reader would pass the assertion above vacuously)
    assert {"seed", "dim", "hidden_size", "trunk_dropout"} <= found["MLPPredictor"]
    assert {"online_steps", "seed", "weight_decay"} <= found["OnlineMLPPredictor"]
    assert {"members", "member_params", "member_configs"} <= found["EnsemblePredictor"]
    assert "source" in found["RouterPredictor"] and "max_tokens" in found["LinearPredictor"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_predictor_takes_its_full_params_set(name, tmp_path):
    """Built with every key it accepts (valid values), it fits, predicts, saves and loads."""
    accepted = REGISTRY[name].accepted_params()
    assert accepted <= set(VALID), f"VALID lacks a value for {sorted(accepted - set(VALID))}"
    trace, _ = router_trace(tokens=120, L=L, E=E, K=K, H=8, seqs=6)  # routing and hidden states
    pred = make_predictor(name, L, E, K, 2, **{k: VALID[k] for k in accepted}).fit([trace])
    state = RoutingState.from_trace(trace, 0)
    scores = pred.predict(state, 0)
    if pred.adapts:
        pred.observe(*trace_tensors(trace), torch.from_numpy(trace.hidden.astype(np.float32)))  # finished tokens
    pred.save(tmp_path / "p.safetensors")
    with warnings.catch_warnings():  # a key it wrote itself but does not accept would be dropped, warned
        warnings.simplefilter("error", UserWarning)
        loaded = load_predictor(tmp_path / "p.safetensors")
    assert loaded.params == pred.params and loaded.predict(state, 0).shape == scores.shape


def test_ensemble_refuses_a_members_unknown_key_before_fitting_any(monkeypatch):
    fits = []
    monkeypatch.setattr(REGISTRY["transition"], "fit", lambda self, traces: fits.append(self) or self)
    trace = layer_map_trace(tokens=60, L=L, E=E, K=K, seqs=4)
    ens = make_predictor("ensemble", L, E, K, 1, members=["transition", "mlp"], member_params={"mlp": {"dimm": 8}})
    with pytest.raises(ValueError, match=r"ensemble: member 'mlp': mlp does not take parameter 'dimm'; it takes: "):
        ens.fit([trace])
    ens = make_predictor("ensemble", L, E, K, 1, members=["transition"], member_params={"transitoin": {"smoothing": 2}})
    with pytest.raises(ValueError, match=r"ensemble: member_params names \['transitoin'\], not among members"):
        ens.fit([trace])
    assert fits == []


def test_compare_refuses_bad_params_before_fitting_any():
    trace = layer_map_trace(tokens=60, L=L, E=E, K=K, seqs=4)
    logged = []
    for params, message in (({"transition": {"smoothin": 2}}, "transition does not take parameter 'smoothin'"),
                            ({"transitoin": {}}, r"params: 'transitoin' is not a predictor")):
        with pytest.raises(ValueError, match=message):
            compare([trace], [trace], ["popularity", "transition"], 1, params=params, log=logged.append)
    assert logged == []  # nothing was fitted


def test_saved_file_with_a_key_that_was_never_read_still_loads(tmp_path):
    """Files fitted before unknown keys were refused may carry one: it had no effect; loading drops it."""
    trace = layer_map_trace(tokens=60, L=L, E=E, K=K, seqs=4)
    pred = make_predictor("mlp", L, E, K, 1, epochs=1, dim=8).fit([trace])
    path, old = tmp_path / "p.safetensors", tmp_path / "old.safetensors"
    pred.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["predictor"])
    assert config["params"] == {"epochs": 1, "dim": 8, "hidden_size": 0}  # hidden_size: written by fit
    config["params"]["dimm"] = 256  # as `--param dimm=256` left it
    save_file(arrays, str(old), metadata={"predictor": json.dumps(config)})
    with pytest.warns(UserWarning, match=re.escape("mlp does not take parameter(s) ['dimm']")):
        loaded = load_predictor(old)
    assert loaded.params == {"epochs": 1, "dim": 8, "hidden_size": 0}
    state = RoutingState.from_trace(trace, 1)
    assert (loaded.predict(state, 1) == pred.predict(state, 1)).all()



def test_a_lookahead_past_the_last_layer_is_refused_naming_the_limit():
    # targets are later MoE layers of the same token: with lookahead >= num_layers the last slot has no
    # target anywhere, and mlp's fit failed in torch.arange ('upper bound and lower bound inconsistent')
    from predictors.registry import make_predictor

    for name in ("mlp", "popularity"):
        assert make_predictor(name, 3, 8, 2, 2).lookahead == 2
        with pytest.raises(ValueError, match=r"lookahead must be at most num_layers - 1 = 2 .*got 3"):
            make_predictor(name, 3, 8, 2, 3)
    assert make_predictor("popularity", 1, 8, 2, 0).lookahead == 0  # next token: any layer count
