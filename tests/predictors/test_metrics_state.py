"""Metrics on hand-computed cases; states and targets built from a trace; splits keep whole sequences."""
import numpy as np
import pytest
import torch

from predictors.base import RoutingState, multi_hot, next_index
from predictors.dataset import slot_targets
from predictors.metrics import MetricSum, hits_at, routing_metrics
from predictors.traces import RoutingTrace, split_sequences
from tests.predictors.synth import copy_trace


def test_metrics_hand_computed():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.5], [0.0, 0.1, 0.2, 0.3, 0.4]])
    true = torch.tensor([[0, 4], [0, 1]])
    # row 0: top2 = {0, 1} -> 1 hit; top3 = {0, 1, 4} -> 2 hits. row 1: top2 = {4, 3} -> 0; top3 = {4, 3, 2} -> 0
    assert hits_at(scores, true, 2).tolist() == [1, 0]
    m = routing_metrics(scores, true, budget=3)
    assert m["recall_at_k"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["precision_at_budget"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["recall_at_budget"] == pytest.approx((2 / 2 + 0) / 2)
    acc = MetricSum(k=2, budget=3)
    acc.add(scores[:1], true[:1])
    acc.add(scores[1:], true[1:])
    assert acc.result()["recall_at_k"] == pytest.approx(m["recall_at_k"])
    with pytest.raises(ValueError, match="budget"):
        hits_at(scores, true, 6)


def test_multi_hot_ignores_missing():
    mh = multi_hot(torch.tensor([[1, -1], [2, 0]]), 3, torch.tensor([[0.5, 9.0], [1.0, 2.0]]))
    assert mh.tolist() == [[0.0, 0.5, 0.0], [2.0, 0.0, 1.0]]


def _tiny_trace():
    ex = np.arange(5 * 3 * 2).reshape(5, 3, 2) % 8
    w = np.full(ex.shape, 0.5, np.float16)
    return RoutingTrace(ex.astype(np.int16), w, np.array([0, 2, 5]), 8)


def test_state_from_trace_masks_future_and_links_previous_token():
    trace = _tiny_trace()
    st = RoutingState.from_trace(trace, layer=1)
    ex = torch.from_numpy(trace.experts.astype(np.int64))
    assert torch.equal(st.experts[:, :2], ex[:, :2])
    assert (st.experts[:, 2] == -1).all() and (st.weights[:, 2] == 0).all()
    assert (st.prev_experts[[0, 2]] == -1).all()  # sequence starts
    assert torch.equal(st.prev_experts[1], ex[0]) and torch.equal(st.prev_experts[4], ex[3])
    sub = RoutingState.from_trace(trace, layer=0, rows=np.array([4]))
    assert sub.batch_size == 1 and torch.equal(sub.experts[0, 0], ex[4, 0])


def test_slot_targets_layers_and_next_token():
    trace = _tiny_trace()
    ex = torch.from_numpy(trace.experts.astype(np.int64))
    t2 = slot_targets(trace, 2)  # [T, L, 2, K]
    assert torch.equal(t2[:, 0, 0], ex[:, 1]) and torch.equal(t2[:, 0, 1], ex[:, 2])
    assert (t2[:, 2] == -1).all() and (t2[:, 1, 1] == -1).all()
    t0 = slot_targets(trace, 0)[:, :, 0]
    assert next_index(trace).tolist() == [1, -1, 3, 4, -1]
    assert torch.equal(t0[0], ex[1]) and (t0[1] == -1).all() and (t0[4] == -1).all()


def test_split_keeps_whole_sequences():
    trace = copy_trace(tokens=300, seqs=20)  # every sequence has its own constant routing
    train, test = split_sequences(trace, 0.25, seed=1)
    assert train.num_tokens + test.num_tokens == trace.num_tokens
    assert test.num_sequences == 5
    whole = {trace.experts[trace.sequence(s)].tobytes() for s in range(trace.num_sequences)}
    for part in (train, test):
        for s in range(part.num_sequences):
            assert part.experts[part.sequence(s)].tobytes() in whole
