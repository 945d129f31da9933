"""A predictor file whose arrays do not match its own header (missing, another shape, one too many) is
refused when loaded, naming the file and the array; it loaded and failed at the first predict() (or an
mlp's load_state_dict raised a RuntimeError traceback)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from predictors.registry import REGISTRY, load_predictor, make_predictor
from tests.predictors.synth import router_trace

FAST = dict(mlp=dict(epochs=1, dim=8), mlp_online=dict(epochs=1, dim=8, hidden_direct=True), logreg=dict(max_iter=5),
            router=dict(steps=2), hidden_linear=dict(steps=2),
            ensemble=dict(members=["transition", "mlp"], member_params={"mlp": dict(epochs=1, dim=8)}))


def _saved(name, tmp_path):
    trace, _ = router_trace(tokens=80, L=3, E=8, K=2, H=8, seqs=4)
    path = tmp_path / "p.safetensors"
    make_predictor(name, 3, 8, 2, 2, **FAST.get(name, {})).fit([trace]).save(path)
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_arrays_that_do_not_match_the_header_are_refused(name, tmp_path):
    meta, arrays = _saved(name, tmp_path)
    bad = tmp_path / "bad.safetensors"
    # e.g. freq, table, weight, coef; an ensemble's own weight and its mlp member's cur (m1.cur)
    for key in [sorted(arrays)[-1]] + (["m1.cur"] if name == "ensemble" else []):
        array = key.split(".", 1)[-1] if key.startswith("m1.") else key
        short = dict(arrays, **{key: arrays[key][:-1].clone()})  # one row too few
        save_file(short, str(bad), metadata=meta)
        with pytest.raises(ValueError) as info:
            load_predictor(bad)
        assert str(info.value).startswith(f"predictor file {bad}: ") and f"array {array!r} has shape" in str(info.value)
        missing = {k: v for k, v in arrays.items() if k != key}
        save_file(missing, str(bad), metadata=meta)
        with pytest.raises(ValueError, match=f"array {array!r} is missing"):
            load_predictor(bad)


def test_an_mlp_array_its_net_does_not_have_is_refused(tmp_path):
    meta, arrays = _saved("mlp", tmp_path)
    bad = tmp_path / "bad.safetensors"
    save_file(dict(arrays, extra=torch.zeros(2)), str(bad), metadata=meta)
    with pytest.raises(ValueError, match=f"predictor file {bad}: mlp: its arrays do not load .*extra"):
        load_predictor(bad)
    config = json.loads(meta["predictor"])
    config["params"]["dim"] = 16  # a header edited (or written by another version): every array is the wrong size
    save_file(arrays, str(bad), metadata={"predictor": json.dumps(config)})
    with pytest.raises(ValueError, match=r"mlp: array 'bias' has shape|mlp: array 'cur' has shape \(24, 8\); .* needs \(24, 16\)"):
        load_predictor(bad)


@pytest.mark.parametrize("header", ["[1, 2]", "null", '"mlp"', '{"predictor": "popularity", "num_layers": 3, "num_experts": 8, "top_k": 2, "lookahead": 1, "params": [1], "format_version": 1}'])
def test_a_header_that_is_no_config_object_is_refused_naming_the_file(header, tmp_path):
    # a JSON list or null ended in AttributeError ("'list' object has no attribute 'get'"), a traceback
    bad = tmp_path / "bad.safetensors"
    save_file({"freq": torch.zeros(3, 8)}, str(bad), metadata={"predictor": header})
    with pytest.raises(ValueError, match=f"predictor file {bad}: its 'predictor' header is not a predictor's config"):
        load_predictor(bad)


def test_an_ensemble_member_config_that_is_no_object_is_refused(tmp_path):
    meta, arrays = _saved("ensemble", tmp_path)
    config = json.loads(meta["predictor"])
    config["params"]["member_configs"][1] = [1, 2]
    bad = tmp_path / "bad.safetensors"
    save_file(arrays, str(bad), metadata={"predictor": json.dumps(config)})
    with pytest.raises(ValueError, match=f"predictor file {bad}: its 'predictor' header is not a predictor's config"):
        load_predictor(bad)
