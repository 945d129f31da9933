"""The statistics handed to an algorithm must be of the load's layers and experts."""
import numpy as np
import pytest

from placement.algorithms import ALGORITHMS


@pytest.mark.parametrize("tokens, message", [
    # silently fitted layers 0..2 of a 4-layer trace to a 3-layer load (a trace of all layers with the
    # load of a selection of them: every layer's swaps judged on another layer's tokens)
    (np.zeros((50, 4, 2), np.int64), r"tokens must be \[T, L=3, K\] .*got shape \(50, 4, 2\)"),
    (np.zeros((50, 2, 2), np.int64), r"tokens must be \[T, L=3, K\]"),  # was an IndexError
    (np.zeros((50, 3), np.int64), r"tokens must be \[T, L=3, K\]"),  # was 'not enough values to unpack'
    (np.full((50, 3, 2), 8), r"tokens hold expert id 8, outside \[0, E=8\)"),  # was an IndexError
])
def test_affinity_refuses_tokens_of_another_shape(tokens, message):
    load = np.random.default_rng(0).random((3, 8))
    with pytest.raises(ValueError, match=rf"placement algorithm affinity: {message}"):
        ALGORITHMS["affinity"](load, 2, 5, tokens=tokens)


@pytest.mark.parametrize("shape", [(2, 8, 8), (3, 6, 6), (3, 8)])
def test_affinity_refuses_a_coactivation_of_another_shape(shape):
    load = np.random.default_rng(0).random((3, 8))
    with pytest.raises(ValueError, match=r"placement algorithm affinity: coact must be \[L=3, E=8, E=8\]"):
        ALGORITHMS["affinity"](load, 2, 5, coact=np.ones(shape))


def test_matching_statistics_still_fit():
    rng = np.random.default_rng(0)
    tokens = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(60)])
    load = np.stack([np.bincount(tokens[:, l].ravel(), minlength=8) for l in range(3)]).astype(float)
    ALGORITHMS["affinity"](load, 2, 5, tokens=tokens).validate()
    ALGORITHMS["affinity"](load, 2, 5, coact=np.ones((3, 8, 8))).validate()
