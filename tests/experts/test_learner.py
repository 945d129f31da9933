"""The predictor learning online on a worker thread (`BackgroundLearner`) learns exactly what it learns
inline, swaps whole nets in, stops with its store, and never stops serving when learning fails."""
import threading

import numpy as np
import pytest
import torch

from moe_serve.experts.learner import BackgroundLearner
from moe_serve.experts.replay import TracePredictions
from predictors.base import RoutingState, trace_tensors
from predictors.online import OnlineMLPPredictor
from predictors.traces import RoutingTrace

L, E, K = 3, 8, 2


def routing(T: int, seed: int) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    ex = np.stack([rng.permutation(E)[:K] for _ in range(T * L)]).reshape(T, L, K).astype(np.int16)
    w = rng.uniform(0.1, 1.0, ex.shape).astype(np.float16)
    return RoutingTrace(experts=ex, weights=w, seq_offsets=np.array([0, T // 2, T]), num_experts=E)


def fitted(seed: int = 0) -> OnlineMLPPredictor:
    return OnlineMLPPredictor(L, E, K, lookahead=2, epochs=1, dim=16, online_steps=3, seed=seed).fit([routing(120, 0)])


def chunks(trace: RoutingTrace, size: int):
    tensors = trace_tensors(trace)  # experts, weights, prev experts, prev weights [T, L, K]
    for start in range(0, trace.num_tokens, size):
        yield [t[start : start + size] for t in tensors]


def predictions(p, trace) -> torch.Tensor:
    rows = np.arange(trace.num_tokens)
    return torch.stack([p.predict(RoutingState.from_trace(trace, layer, rows), layer) for layer in range(L)])


def test_background_learning_gives_the_inline_weights_and_predictions():
    served = routing(96, 1)
    inline, background = fitted(), fitted()
    learner = BackgroundLearner(background)
    for chunk in chunks(served, 32):
        inline.observe(*chunk)
        learner.observe(*chunk)
        assert learner.flush(timeout=30)
    learner.close()
    assert learner.rounds == 3 and learner.rows_learned == 96 and learner.failed is None
    for a, b in zip(inline.net.parameters(), background.net.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(predictions(inline, served), predictions(background, served))
    before = fitted()  # and learning did change them: the check above is not trivially true
    assert not torch.equal(predictions(before, served), predictions(background, served))


def test_rows_queued_while_busy_are_learned_together_and_none_is_lost():
    served = routing(96, 2)
    p = fitted()
    learner = BackgroundLearner(p)
    for chunk in chunks(served, 8):  # 12 chunks, faster than the worker learns them
        learner.observe(*chunk)
    assert learner.flush(timeout=60)
    assert learner.rows_learned == 96 and 1 <= learner.rounds <= 12
    assert learner.trainer.observed == 96
    # the serving predictor has the trainer's weights, in a net of its own
    for a, b in zip(p.net.parameters(), learner.trainer.net.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    learner.close()


def test_predict_while_learning_runs_and_close_stops_the_thread():
    served = routing(64, 3)
    p = fitted()
    learner = BackgroundLearner(p)
    state = RoutingState.from_trace(served, 1, np.arange(16))
    for chunk in chunks(served, 16):
        learner.observe(*chunk)
        for _ in range(20):  # the serving thread predicts while the worker swaps nets in
            out = p.predict(state, 1)
            assert out.shape == (16, 2, E) and torch.isfinite(out).all()
    learner.close()
    assert not any(t.name == "moe-serve-predictor-learner" for t in threading.enumerate())
    rounds = learner.rounds
    learner.observe(*next(chunks(served, 16)))  # after close: ignored, no new thread
    assert learner.rounds == rounds and learner.flush(timeout=1)
    assert not any(t.name == "moe-serve-predictor-learner" for t in threading.enumerate())


def test_a_failing_round_stops_learning_and_keeps_the_last_weights(caplog):
    p = fitted()
    learner = BackgroundLearner(p)
    good = next(chunks(routing(32, 4), 32))
    learner.observe(*good)
    assert learner.flush(timeout=30)
    kept = [t.clone() for t in p.net.parameters()]
    learner.observe(good[0][:, :2], *good[1:])  # 2 layers, not 3: observe() refuses it on the worker
    assert learner.flush(timeout=30)
    assert learner.failed is not None and "observe() experts must be" in learner.failed
    assert "stopped learning online" in caplog.text
    learner.observe(*good)  # refused quietly from now on; the predictor serves with what it had
    assert learner.flush(timeout=5) and learner.rounds == 1
    assert all(torch.equal(a, b) for a, b in zip(kept, p.net.parameters()))
    learner.close()


def test_refuses_a_predictor_that_cannot_learn():
    with pytest.raises(TypeError, match="cannot learn online"):
        BackgroundLearner(object())


def test_trace_predictions_learn_lag_delays_learning_by_whole_chunks():
    """learn_lag=1: chunk c is predicted with what chunks < c - 1 taught (a background round in flight)."""
    trace = routing(192, 5)  # 3 chunks of 64
    lag0 = TracePredictions(fitted(), trace).scores
    lag1 = TracePredictions(fitted(), trace, learn_lag=1).scores
    assert np.array_equal(lag0[:64], lag1[:64])  # nothing learned yet either way
    assert np.array_equal(lag0[64:128], TracePredictions(fitted(), trace, learn_lag=0).scores[64:128])
    assert not np.array_equal(lag0[64:128], lag1[64:128])  # lag 0 learned chunk 0 by then, lag 1 did not
    # chunk 1 under lag 1 is predicted by the fitted weights, as chunk 0 is
    fresh = fitted()
    rows = np.arange(64, 128)
    ref = torch.stack([fresh.predict(RoutingState.from_trace(trace, layer, rows), layer) for layer in range(L)], 1)
    assert np.allclose(lag1[64:128], ref.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="learn_lag must be >= 0"):
        TracePredictions(fitted(), trace, learn_lag=-1)


def test_predictor_learning_is_checked():
    from moe_serve.config import ExpertCacheConfig
    from moe_serve.experts.offload import OffloadExpertStore
    from moe_serve.experts.policies import LRUPolicy
    from tests.experts.sources import TinySource

    with pytest.raises(ValueError, match="expert_cache.predictor_learning must be background or inline"):
        OffloadExpertStore(TinySource(), torch.float32, "cpu", 4, LRUPolicy(), top_k=2, learning="later")
    with pytest.raises(ValueError, match="predictor_learning.*one of background, inline"):
        ExpertCacheConfig(expert_cache_slots=4, predictor_learning="later")
