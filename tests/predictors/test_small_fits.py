"""Fits on small or degenerate traces: two experts, a layer that always routes to one expert, empty
traces and batches; each must give right answers (or a clear error), not a traceback or a silent tie."""
import numpy as np
import pytest
import torch

from predictors.base import RoutingState
from predictors.evaluate import evaluate
from predictors.registry import make_predictor
from predictors.traces import RoutingTrace


def flip_trace(tokens=200, L=3, seed=0) -> RoutingTrace:
    """Two experts, top-1: layer l+1 uses the expert layer l did not (a deterministic map)."""
    rng = np.random.default_rng(seed)
    ex = np.zeros((tokens, L, 1), np.int16)
    ex[:, 0, 0] = rng.integers(0, 2, tokens)
    for l in range(1, L):
        ex[:, l] = 1 - ex[:, l - 1]
    return RoutingTrace(ex, np.ones_like(ex, dtype=np.float16), np.array([0, tokens // 2, tokens]), 2)


@pytest.mark.parametrize("name", ["sgd", "logreg"])
def test_linear_models_with_two_experts_tell_them_apart(name):
    # sklearn keeps one coefficient row for a binary problem; sgd wrote it to both experts, so they
    # scored alike (a tie, recall 0.5) however clear the map was
    trace = flip_trace()
    pred = make_predictor(name, 3, 2, 1, 1).fit([trace])
    res = evaluate(pred, [flip_trace(seed=1)], budget=1)
    assert res["lookahead_1"]["recall_at_k"] == 1.0, res


@pytest.mark.parametrize("name", ["logreg", "sgd"])
def test_linear_models_fit_a_layer_that_always_uses_one_expert(name):
    # top-1 with layer 1 collapsed onto expert 2: LogisticRegression refused the single class with a
    # ValueError naming nothing of ours ('needs samples of at least 2 classes')
    rng = np.random.default_rng(0)
    ex = rng.integers(0, 4, (120, 3, 1)).astype(np.int16)
    ex[:, 1] = 2
    trace = RoutingTrace(ex, np.ones_like(ex, dtype=np.float16), np.array([0, 60, 120]), 4)
    pred = make_predictor(name, 3, 4, 1, 1).fit([trace])
    scores = pred.predict(RoutingState.from_trace(trace, 0), 0)  # [T, 1, E]: slot 0 = layer 1
    assert (scores[:, 0].argmax(-1) == 2).all()


def _trace(tokens: int, seed: int = 0, L: int = 3, E: int = 8, K: int = 2) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    ex = np.argsort(rng.random((tokens, L, E)), -1)[..., :K].astype(np.int16)  # K distinct experts per row
    return RoutingTrace(ex, np.full(ex.shape, 0.5, np.float16), np.array([0, tokens], np.int64), E)


FAST = dict(mlp=dict(epochs=1, dim=8), mlp_online=dict(epochs=1, dim=8), logreg=dict(max_iter=5),
            ensemble=dict(members=["prev_token", "mlp"], member_params={"mlp": dict(epochs=1, dim=8)}))


@pytest.mark.parametrize("name", ["popularity", "transition", "prev_token", "logreg", "sgd", "mlp", "mlp_online", "ensemble"])
def test_empty_traces_and_batches(name):
    empty = _trace(0)
    with pytest.raises(ValueError, match=f"^{name}: fit\\(\\) needs at least one token; the 1 trace holds none"):
        make_predictor(name, 3, 8, 2, 1, **FAST.get(name, {})).fit([empty])
    pred = make_predictor(name, 3, 8, 2, 1, **FAST.get(name, {})).fit([_trace(40), empty])  # an empty one beside is fine
    state = RoutingState.from_trace(empty, 1)
    assert pred.predict(state, 1).shape == (0, 1, 8)  # mlp: 'cannot reshape tensor of 0 elements'
    res = evaluate(pred, [_trace(30, seed=1), empty], budget=4)  # an empty test trace scores no rows
    assert res["lookahead_1"]["rows"] == 30 * 2  # layers 0 and 1 have a next layer


@pytest.mark.parametrize("field", ["weights", "hidden"])
def test_fit_refuses_nan_or_inf_naming_the_field(field):
    # one NaN weight (or inf hidden value) made every weight of a fitted mlp NaN, saved without a word
    trace = _trace(40)
    trace.hidden = np.ones((40, 3, 4), np.float32)
    getattr(trace, field)[5, 1, 0] = np.nan if field == "weights" else np.inf
    for name in ("mlp", "transition"):
        with pytest.raises(ValueError, match=f"^{name}: trace 0 has 1 NaN/inf value in '{field}' \\(first at row 5, MoE layer 1\\)"):
            make_predictor(name, 3, 8, 2, 1, **FAST.get(name, {})).fit([trace])


def test_a_slot_with_no_rows_to_score_reports_none_not_zero(tmp_path):
    # next token on test sequences of one token each: nothing to measure, but the table and JSON said
    # recall 0.000, a measured zero
    import json

    from moe_serve.cli.main import main

    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    _trace(40).save(train)
    ones = _trace(5, seed=2)
    RoutingTrace(ones.experts, ones.weights, np.arange(6, dtype=np.int64), 8).save(test)  # 5 sequences of 1 token
    out = tmp_path / "e.json"
    assert main(["predict", "eval", "--train", str(train), "--test", str(test), "--predictors", "popularity",
                 "--lookahead", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["popularity"]
    assert res["next_token"] == dict(recall_at_k=None, precision_at_budget=None, recall_at_budget=None, rows=0)
    assert res["lookahead_1"]["rows"] == 5 * 2 and res["lookahead_1"]["recall_at_k"] is not None


def test_eval_table_orders_slots_by_number_and_aligns_long_names():
    # lookahead_10 sorted before lookahead_2 (string order), and 'hidden_linear' pushed its row's columns right
    from predictors.compare import format_table

    m = dict(recall_at_k=0.5, precision_at_budget=0.25, recall_at_budget=0.75, rows=10)
    res = {f"lookahead_{j}": m for j in range(1, 12)}
    res.update(fit_s=1.0, predict_ms_b64=0.1)
    table = format_table(dict(top_k=2, budget=4, results={"hidden_linear": res, "mlp": res}, skipped={}))
    rows = table.splitlines()[2:]
    assert [r.split()[1] for r in rows[:11]] == [f"lookahead_{j}" for j in range(1, 12)]
    assert len({r.index("0.500") for r in rows}) == 1 and len({len(r) for r in table.splitlines()}) == 1


def test_split_keeps_a_sequence_on_each_side():
    # 0.9 of 2 sequences rounded to 2 test sequences: an empty training part (an ensemble with holdout 0.9
    # then failed: 'fit() needs at least one token'); 1 sequence split into an empty training part too
    from predictors.traces import split_sequences

    two = RoutingTrace(*(lambda t: (t.experts, t.weights))(_trace(20)), np.array([0, 8, 20]), 8)
    train, test = split_sequences(two, 0.9)
    assert (train.num_sequences, test.num_sequences) == (1, 1)
    train, test = split_sequences(two, 0.01)
    assert (train.num_sequences, test.num_sequences) == (1, 1)
    with pytest.raises(ValueError, match="split_sequences: needs at least 2 sequences to split, the trace has 1"):
        split_sequences(_trace(20), 0.5)
    ens = make_predictor("ensemble", 3, 8, 2, 1, members=["prev_token", "transition"], holdout=0.9).fit([two])
    assert ens.predict(RoutingState.from_trace(two, 0), 0).shape == (20, 1, 8)


@pytest.mark.parametrize("members", [["prev_token"], ["transition", "prev_token"]])
def test_ensemble_over_a_single_expert_scores_it_finite(members):
    # with one expert per layer every row's standardization took std() over one element (NaN with
    # Bessel's correction), so every score was NaN: the predicted policy's probabilities were NaN too
    ex = np.zeros((40, 3, 1), np.int16)
    trace = RoutingTrace(ex, np.ones_like(ex, dtype=np.float16), np.array([0, 20, 40]), 1)
    pred = make_predictor("ensemble", 3, 1, 1, 1, members=members).fit([trace])
    scores = pred.predict(RoutingState.from_trace(trace, 0), 0)  # [T, 1, 1]
    assert scores.shape == (40, 1, 1) and torch.isfinite(scores).all(), scores[:3]
    res = evaluate(pred, [trace], budget=1)
    assert res["lookahead_1"]["recall_at_k"] == 1.0, res
