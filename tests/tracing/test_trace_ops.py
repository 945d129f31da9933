"""RoutingTrace operations at their edges: selections, empty traces."""
import numpy as np
import pytest

from predictors.traces import RoutingTrace


def _trace():
    return RoutingTrace(experts=np.zeros((3, 1, 1), np.int16), weights=np.ones((3, 1, 1), np.float16),
                        seq_offsets=np.array([0, 1, 3]), num_experts=2)


def test_select_sequences_refuses_a_mask_or_float_ids():
    """A boolean mask (the numpy idiom `trace.select_sequences(lens > 1)`) was read as ids 0 and 1,
    every sequence, silently; a float id 0.9 was truncated to sequence 0."""
    t = _trace()
    lens = np.diff(t.seq_offsets)
    with pytest.raises(ValueError, match=r"select_sequences: sequence ids must be integers, got bool .*flatnonzero"):
        t.select_sequences(lens > 1)
    with pytest.raises(ValueError, match=r"select_sequences: sequence ids must be integers, got float"):
        t.select_sequences([0.9])
    assert t.select_sequences(np.flatnonzero(lens > 1)).seq_offsets.tolist() == [0, 2]
    assert t.select_sequences(range(2)).num_tokens == 3 and t.select_sequences(s for s in [1]).num_tokens == 2 and t.select_sequences(np.array([1], np.int64)).num_tokens == 2
