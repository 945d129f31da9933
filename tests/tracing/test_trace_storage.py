"""How trace members are stored: float16 when the values fit, float32 when they do not (no silent inf)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_serve.models.batch import ForwardBatch
from moe_serve.tracing.recorder import TraceRecorder
from predictors.traces import RoutingTrace, load_trace

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces"


def _trace(hidden, weights=None):
    T = hidden.shape[0]
    experts = np.broadcast_to(np.arange(2, dtype=np.int16), (T, 1, 2)).copy()
    w = np.full((T, 1, 2), 0.5, np.float32) if weights is None else weights
    return RoutingTrace(experts=experts, weights=w, seq_offsets=np.array([0, T]), num_experts=4, hidden=hidden)


def test_values_past_float16_range_are_saved_as_float32(tmp_path):
    """float16 tops out at 65504: a hidden state with large activations (or a large weight) became inf on
    save, silently, and a weight of inf then made the file unloadable."""
    hidden = np.array([[[1.0, -7e4, 3e5]], [[0.5, 65504.0, -2.0]]], np.float32)  # [T=2, L=1, H=3]
    weights = np.array([[[9e4, 1.0]], [[0.75, 0.25]]], np.float32)
    _trace(hidden, weights).save(tmp_path / "big.npz")
    back = load_trace(tmp_path / "big.npz")
    assert back.hidden.dtype == np.float32 and back.weights.dtype == np.float32
    assert np.array_equal(back.hidden, hidden) and np.array_equal(back.weights, weights)

    small = hidden.clip(-6e4, 6e4)  # fits: stays float16, half the bytes
    _trace(small).save(tmp_path / "small.npz")
    back = load_trace(tmp_path / "small.npz")
    assert back.hidden.dtype == np.float16 and back.weights.dtype == np.float16
    np.testing.assert_allclose(back.hidden.astype(np.float32), small, rtol=1e-3)


def test_recorder_keeps_large_hidden_states_finite(tmp_path):
    """The recorder cast each router's input to float16 as it copied it: 1e5 was recorded as inf."""
    rec = TraceRecorder(num_layers=1, num_experts=4, top_k=2, record_hidden=True)
    batch = ForwardBatch.single([3, 4])
    hidden = torch.tensor([[1.0, 1e5], [-2e5, 0.25]], dtype=torch.bfloat16)  # a bf16 model's range is float32's
    rec.begin_step(batch)
    rec.route(0, hidden, torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0.6, 0.4], [0.7, 0.3]]))
    rec.end_step(batch)
    rec.save(tmp_path / "rec.npz")
    back = load_trace(tmp_path / "rec.npz")
    assert np.array_equal(back.hidden[:, 0], hidden.float().numpy())
    assert back.weights.dtype == np.float16  # weights in range keep the compact dtype


@pytest.mark.parametrize("name", ["dsv2lite_intent.npz", "dsv2lite_summary.npz"])
def test_shared_traces_load_unchanged(name):
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"shared trace {path} is absent")
    trace = load_trace(path)
    with np.load(path, allow_pickle=False) as z:
        assert trace.weights.dtype == z["weights"].dtype == np.float16
        assert np.array_equal(trace.weights, z["weights"]) and np.array_equal(trace.experts, z["experts"])
        assert np.array_equal(trace.seq_offsets, z["seq_offsets"])
