"""When the compiled decode step (models/compiled.py) runs and when a step stays eager: what it does
not take, a compile failure, a bad token, the last cache row, and the max batch timed at start-up
(the outputs still the eager model's)."""
from __future__ import annotations

import logging

import pytest
import torch

from moe_serve.models import ForwardBatch, load_model
from moe_serve.models.compiled import TUNED_SIZES, pick_max_batch
from moe_serve.tracing.load import ExpertLoadCounter
from tests.models.decode_steps import PROMPTS, RecordIds, decodes, run
from tests.models.helpers import RecordRoutes


def test_what_stays_eager(tiny_checkpoint):
    assert "latent" in load_model(tiny_checkpoint("deepseek_v2")).enable_compiled_decode(4)
    with pytest.raises(RuntimeError, match="allocate_kv_cache"):  # warm-up needs the cache it writes to
        load_model(tiny_checkpoint("qwen3_moe")).enable_compiled_decode(4, warm_up=True)
    with pytest.raises(ValueError, match="compile_max_batch must be >= 1"):
        load_model(tiny_checkpoint("qwen3_moe")).enable_compiled_decode(0)
    model = load_model(tiny_checkpoint("qwen3_moe"))
    model.allocate_kv_cache(4, 64)
    model.enable_compiled_decode(max_batch=2)
    model(ForwardBatch.single(PROMPTS[0], slot=0))
    model(ForwardBatch.single(PROMPTS[1], slot=1))
    model(ForwardBatch.single(PROMPTS[2], slot=2))
    model(decodes([5, 6, 7], (0, 1, 2), (6, 13, 9)))  # more than max_batch
    model(ForwardBatch.single([5, 6], slot=3))  # a prefill
    model.hooks = RecordRoutes()  # not declared ids-only (it could read hidden states): eager
    model(decodes([8], (0,), (7,)))
    assert model.compiled.steps == 0
    model.hooks = ExpertLoadCounter(model.spec.num_moe_layers, model.spec.num_experts)  # ids only: compiled
    model(decodes([9], (0,), (8,)))
    assert model.compiled.steps == 1 and int(model.hooks.counts.sum()) == model.spec.num_moe_layers * model.spec.top_k


def eager_and_compiled(path):
    """Two copies of a checkpoint, each after the same prefill in slot 0; the second may compile decodes."""
    eager, model = load_model(path), load_model(path)
    for m in (eager, model):
        m.allocate_kv_cache(2, 32)
        m(ForwardBatch.single(PROMPTS[0], slot=0))
    model.enable_compiled_decode(max_batch=2)
    return eager, model


def test_compile_failure_falls_back_to_eager(tiny_checkpoint, caplog):
    eager, model = eager_and_compiled(tiny_checkpoint("qwen3_moe"))

    def no_compiler(*args):  # what torch.compile raises on a machine without a C++ compiler
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    model.compiled._step = no_compiler
    with caplog.at_level(logging.WARNING, logger="moe_serve.models.compiled"):
        got = model(decodes([5], (0,), (6,)))
    torch.testing.assert_close(got, eager(decodes([5], (0,), (6,))), rtol=0, atol=0)
    assert "C++ compiler" in model.compiled.failed and "compiled decode disabled" in caplog.text
    assert not model.compiled.accepts(decodes([6], (0,), (7,)))


def test_a_bad_token_fails_its_step_not_the_compiled_step(tiny_checkpoint):
    """A decode fed a token id past the vocabulary (a request that slipped past validation) raises
    the eager step's IndexError, for the engine to pin on that request; the compiled step was not at
    fault and keeps serving the next decodes (it used to switch itself off for good)."""
    eager, model = eager_and_compiled(tiny_checkpoint("qwen3_moe"))
    model(decodes([5], (0,), (6,)))
    eager(decodes([5], (0,), (6,)))
    with pytest.raises(IndexError):
        model(decodes([model.spec.vocab_size + 3], (0,), (7,)))
    assert model.compiled.failed is None
    torch.testing.assert_close(model(decodes([6], (0,), (7,))), eager(decodes([6], (0,), (7,))), rtol=1e-4, atol=1e-4)
    assert model.compiled.steps == 2


def test_pick_max_batch_keeps_the_compiled_step_up_to_where_eager_wins():
    assert pick_max_batch({2: (1.0, 2.0), 4: (1.5, 2.0), 8: (3.0, 2.5), 16: (1.0, 9.0)}) == 4
    assert pick_max_batch({2: (2.0, 1.0), 4: (1.0, 2.0)}) == 1
    assert pick_max_batch({b: (1.0, 2.0) for b in TUNED_SIZES}) == 16
    assert pick_max_batch({}) == 1


def test_max_batch_is_timed_after_the_warm_up(tiny_checkpoint):
    """No max batch: the warm-up times both steps at each size (no hook sees those steps) and keeps
    the size pick_max_batch chooses from them; outputs still match the eager model."""
    path = tiny_checkpoint("qwen3_moe")
    eager, model = load_model(path), load_model(path)
    for m in (eager, model):
        m.allocate_kv_cache(4, 64)
    routes = RecordIds()
    model.hooks = routes
    assert model.enable_compiled_decode(None, warm_up=True) is None
    c = model.compiled
    assert set(c.tuned) <= {2, 4}  # only sizes the 4 cache slots can hold
    assert c.max_batch == pick_max_batch({b: (t["compiled_s"], t["eager_s"]) for b, t in c.tuned.items()})
    assert not routes.ids and model.hooks is routes
    want_logits, _ = run(eager, 3)
    got_logits, _ = run(model, 3)
    for want, got in zip(want_logits, got_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="compile_max_batch: unset"):
        load_model(path).enable_compiled_decode(None)


def test_decoding_into_the_last_cache_row_keeps_the_compiled_step(tiny_checkpoint):
    """A decode that attends over every cache row (context max_len - 1) runs eagerly: compiled, the
    symbolic key length would have to become max_len, which dynamo refuses, and that failure used to
    switch the compiled step off for good. Later decodes, at batch 1 and 2, still run compiled."""
    path = tiny_checkpoint("qwen3_moe")
    eager, model = load_model(path), load_model(path)
    for m in (eager, model):
        m.allocate_kv_cache(2, 12)
    assert model.enable_compiled_decode(2, warm_up=True) is None
    toks = [int(model(ForwardBatch.single([5, 6, 7], slot=s)).argmax()) for s in (0, 1)]
    for s in (0, 1):
        eager(ForwardBatch.single([5, 6, 7], slot=s))
    for pos in range(3, 12):  # both sequences together up to the last row (position 11 of 12)
        batch = decodes(toks, (0, 1), (pos, pos))
        got, want = model(batch), eager(batch)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        toks = got.argmax(-1).tolist()
    assert model.compiled.failed is None and model.compiled.steps == 8  # positions 3..10; 11 ran eagerly
    for m in (model, eager):
        m(ForwardBatch.single([9, 9], slot=0))
    for slots in ((0,), (0, 1)):
        batch = decodes([4] * len(slots), slots, (2,) * len(slots))
        torch.testing.assert_close(model(batch), eager(batch), rtol=1e-4, atol=1e-4)
    assert model.compiled.failed is None and model.compiled.steps == 10
