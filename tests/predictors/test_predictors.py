"""Each predictor recovers a known structure; scores survive save/load bit for bit."""
import re

import numpy as np
import pytest
import torch

from predictors import load_predictor
from predictors.base import RoutingState
from predictors.evaluate import evaluate, online_cost
from predictors.registry import REGISTRY, make_predictor
from predictors.router import HiddenLinearPredictor, RouterPredictor
from tests.predictors.synth import copy_trace, layer_map_trace, router_trace

L, E, K = 5, 16, 2
FAST = {"mlp": dict(epochs=10, dim=32, batch=32, lr=2e-2, trunk_dropout=0.9), "mlp_online": dict(epochs=10, dim=32, batch=32, lr=2e-2, trunk_dropout=0.9), "sgd": dict(epochs=3), "router": dict(steps=100), "hidden_linear": dict(steps=100)}
ENSEMBLE = dict(members=["transition", "prev_token"])


def _make(name, lookahead, **extra):
    params = dict(FAST.get(name, {}), **(ENSEMBLE if name == "ensemble" else {}), **extra)
    return make_predictor(name, L, E, K, lookahead, **params)


@pytest.fixture(scope="module")
def layer_map():
    return layer_map_trace(seed=0), layer_map_trace(tokens=200, seed=1)


@pytest.mark.parametrize("name", ["transition", "logreg", "sgd", "mlp", "ensemble"])
def test_recovers_layer_to_layer_map(name, layer_map):
    train, test = layer_map
    pred = _make(name, 3).fit([train])
    res = evaluate(pred, [test], budget=4)
    for d in (1, 2, 3):
        assert res[f"lookahead_{d}"]["recall_at_k"] > 0.95, (name, d, res)


def test_popularity_is_not_fooled(layer_map):
    train, test = layer_map
    res = evaluate(_make("popularity", 1).fit([train]), [test], budget=4)
    assert res["lookahead_1"]["recall_at_k"] < 0.4  # layer 0 is uniform: popularity cannot know the map


@pytest.mark.parametrize("name,lookahead", [("prev_token", 2), ("prev_token", 0), ("mlp", 1), ("mlp", 0), ("logreg", 1)])
def test_recovers_previous_token_copying(name, lookahead):
    # many short training sequences (their patterns cannot be memorized), long test sequences
    # (only the first token of each has no predecessor to copy)
    train, test = copy_trace(tokens=1200, seqs=400, seed=0), copy_trace(tokens=300, seqs=10, seed=1)
    res = evaluate(_make(name, lookahead).fit([train]), [test], budget=4)
    slot = "next_token" if lookahead == 0 else "lookahead_1"
    assert res[slot]["recall_at_k"] > 0.9, res


def test_router_from_weights_and_fitted():
    train, routers = router_trace(seed=0, drift=0.0)
    test, _ = router_trace(tokens=200, seed=1, drift=0.0, routers=routers)
    exact = RouterPredictor.from_router_weights({l: torch.from_numpy(routers[l]) for l in range(4)}, top_k=K, lookahead=2)
    res = evaluate(exact, [test], budget=4)
    assert res["lookahead_1"]["recall_at_k"] > 0.97 and res["lookahead_2"]["recall_at_k"] > 0.97
    fitted = make_predictor("router", 4, E, K, 1, steps=100).fit([train])
    assert evaluate(fitted, [test], budget=4)["lookahead_1"]["recall_at_k"] > 0.85
    learned = make_predictor("hidden_linear", 4, E, K, 2).fit([train])
    res = evaluate(learned, [test], budget=4)
    assert res["lookahead_1"]["recall_at_k"] > 0.85 and res["lookahead_2"]["recall_at_k"] > 0.85
    warm = HiddenLinearPredictor.from_router_weights({l: torch.from_numpy(routers[l]) for l in range(4)}, top_k=K, lookahead=1, steps=5)
    assert evaluate(warm.fit([train]), [test], budget=4)["lookahead_1"]["recall_at_k"] > 0.9
    with pytest.raises(ValueError, match="hidden"):
        make_predictor("router", L, E, K, 1).fit([copy_trace()])


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("lookahead", [2, 0])
def test_save_load_round_trip(name, lookahead, tmp_path):
    if name in ("router", "hidden_linear"):
        trace, _ = router_trace(tokens=200, L=L, seed=2)
    else:
        trace = layer_map_trace(tokens=200, seed=2)
    pred = _make(name, lookahead, **({"epochs": 1} if name in ("mlp", "mlp_online") else {})).fit([trace])
    path = tmp_path / f"{name}.safetensors"
    pred.save(path)
    loaded = load_predictor(path)
    assert type(loaded) is type(pred) and loaded.lookahead == lookahead
    for layer in (0, L - 1):
        st = RoutingState.from_trace(trace, layer)
        a, b = pred.predict(st, layer), loaded.predict(st, layer)
        assert a.shape == (trace.num_tokens, max(lookahead, 1), E)
        assert torch.equal(a, b)
    if lookahead:  # slots past the last layer score nothing
        assert (pred.predict(RoutingState.from_trace(trace, L - 1), L - 1) == 0).all()


def test_mlp_online_matches_training_forward():
    trace = layer_map_trace(tokens=100, seed=3)
    pred = _make("mlp", 2, epochs=1).fit([trace])
    from predictors.base import trace_tensors

    full = pred._forward_all(pred.net, *trace_tensors(trace), None)
    for layer in (0, 2):
        online = pred.predict(RoutingState.from_trace(trace, layer), layer)
        for j in range(2):
            assert torch.allclose(online[:, j], full[j][:, layer], atol=1e-4)
    assert online_cost(pred, trace, batch=64, calls=5) > 0


def test_bad_input_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="predictor must be one of"):
        make_predictor("nope", L, E, K)
    with pytest.raises(ValueError, match="top_k"):
        make_predictor("popularity", L, 2, 4)
    pred = make_predictor("popularity", L, E, K, 1)
    st = RoutingState.from_trace(layer_map_trace(tokens=50), 0)
    with pytest.raises(ValueError, match="before fit"):
        pred.predict(st, 0)
    with pytest.raises(ValueError, match="num_layers"):
        make_predictor("popularity", 0, E, K)
    pred.fit([layer_map_trace(tokens=50)])
    with pytest.raises(ValueError, match="layer must lie"):
        pred.predict(st, L)
    with pytest.raises(ValueError, match="experts"):
        make_predictor("popularity", L, E + 1, K).fit([layer_map_trace(tokens=50)])
    bad = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="no 'predictor' JSON"):
        load_predictor(bad)


def test_fused_predict_matches_training_forward_with_hidden():
    trace, _ = router_trace(tokens=120, L=L, seed=4)
    pred = _make("mlp", 3, epochs=1).fit([trace])
    from predictors.base import trace_tensors

    full = pred._forward_all(pred.net, *trace_tensors(trace), torch.from_numpy(trace.hidden).float())
    for layer in range(L):  # every layer: all, some and none of the targets past the last layer
        online = pred.predict(RoutingState.from_trace(trace, layer), layer)
        for j, t in enumerate(pred.target_layers(layer)):
            if t < L:
                assert torch.allclose(online[:, j], full[j][:, layer], atol=1e-4)


def _bad_trace_files(tmp_path):
    """name -> (path, expected message) of broken trace files."""
    import json

    good = layer_map_trace(tokens=20, seqs=2)
    arrays = dict(experts=good.experts.astype(np.int16), weights=good.weights, seq_offsets=good.seq_offsets)
    cases = {}
    (tmp_path / "text.npz").write_text("hello")
    cases["text"] = (tmp_path / "text.npz", "not an .npz archive")
    np.save(tmp_path / "bare.npy", good.experts)
    cases["bare"] = (tmp_path / "bare.npy", "not an .npz archive")
    cases["dir"] = (tmp_path, "not an .npz archive")
    for name, extra, message in [
        ("meta_list", dict(meta=np.array("[1]")), "'meta' must be a JSON object"),
        ("meta_e", dict(meta=np.array(json.dumps({"num_experts": "16"}))), "num_experts must be a positive integer"),
        ("float_ids", dict(experts=good.experts.astype(np.float32) + 0.5), "'experts' must hold integers"),
        ("float_offsets", dict(seq_offsets=good.seq_offsets + 0.5), "'seq_offsets' must hold integers"),
        ("no_layers", dict(experts=np.zeros((20, 0, K), np.int16), weights=np.zeros((20, 0, K), np.float16)),
         "L, K >= 1"),
    ]:
        np.savez(tmp_path / f"{name}.npz", **{**arrays, **extra})
        cases[name] = (tmp_path / f"{name}.npz", message)
    return cases


def test_load_trace_refuses_bad_files_naming_them(tmp_path):
    """Before: a text file gave numpy's 'contains pickled data' advice, a directory IsADirectoryError,
    a list meta AttributeError (tracebacks from every CLI), and float expert ids or offsets were
    truncated to integers silently."""
    from predictors.traces import load_trace

    for name, (path, message) in _bad_trace_files(tmp_path).items():
        with pytest.raises(ValueError, match=f"trace {re.escape(str(path))}: .*{message}") as info:
            load_trace(path)
        assert info.type is ValueError, name
