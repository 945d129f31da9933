"""A batched forward that fails is retried one sequence at a time (LLMEngine._forward): the expert-load
counter and the routing trace must hold what the model served, not also the failed batch's layers,
nor a request that failed alone. The failure is raised from a router hook placed after the counter
and the recorder in the engine's own hook chain, so both have seen the layer it fails in."""
import numpy as np
import pytest

from moe_serve.config import EngineConfig
from moe_serve.engine import LLMEngine, SamplingParams
from moe_serve.models.hooks import RouterHooks

PARAMS = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
PROMPTS = {"a": "The quick brown fox", "b": "Once upon a time there was"}


class FailAtLayer1(RouterHooks):
    """Raises at MoE layer 1 (layer 0 is routed and counted by then) for the steps `fails(batch)` picks."""
    active = True

    def __init__(self, fails):
        self.fails, self.failing, self.raised = fails, False, 0

    def begin_step(self, batch):
        self.failing = self.fails(batch)

    def route(self, moe_layer, hidden, expert_ids, weights):
        if self.failing and moe_layer == 1:
            self.raised += 1
            raise RuntimeError("injected failure at MoE layer 1")


def serve(model_dir, trace_path, requests, fault=None):
    """(expert load [L, E], trace experts per request id, final outputs) of serving `requests` together."""
    eng = LLMEngine(EngineConfig.from_flat(model=str(model_dir), record_trace=str(trace_path)))
    assert eng.hooks.counter is not None and eng.hooks.recorder is not None
    seq_ids = {}
    if fault is not None:
        eng.hooks.hooks.append(fault(seq_ids))
    for rid in requests:
        seq = eng.make_sequence(PROMPTS[rid], PARAMS, rid)
        seq_ids[rid] = seq.seq_id
        eng.submit(seq)
    done = {}
    while eng.has_unfinished():
        done.update((out.request_id, out) for out in eng.step() if out.finished)
    chunks = eng.hooks.recorder.chunks
    traced = {rid: np.concatenate([c[1] for c in chunks[sid]]) for rid, sid in seq_ids.items() if sid in chunks}
    return eng.expert_load(), traced, done


@pytest.fixture(scope="module")
def clean(tiny_dir, tmp_path_factory):
    return serve(tiny_dir, tmp_path_factory.mktemp("clean") / "t.npz", ["a", "b"])


def test_a_batch_that_fails_and_is_retried_is_counted_once(tiny_dir, tmp_path, clean):
    hooks = []

    def first_batch_fails(seq_ids):  # the first step holding both sequences fails; alone they pass
        hooks.append(FailAtLayer1(lambda batch: len(batch.seq_ids) > 1 and not hooks[0].raised))
        return hooks[0]

    load, traced, done = serve(tiny_dir, tmp_path / "t.npz", ["a", "b"], first_batch_fails)
    assert hooks[0].raised == 1 and all(out.finish_reason == "length" for out in done.values())
    want_load, want_traced, want_done = clean
    assert [done[r].token_ids for r in "ab"] == [want_done[r].token_ids for r in "ab"]
    assert np.array_equal(load, want_load)
    assert traced.keys() == want_traced.keys() and all(np.array_equal(traced[r], want_traced[r]) for r in traced)


def test_a_request_that_fails_alone_is_not_counted(tiny_dir, tmp_path, clean):
    def b_always_fails(seq_ids):  # any step holding b fails, alone too: b ends with an error, a goes on
        return FailAtLayer1(lambda batch: seq_ids["b"] in batch.seq_ids)

    load, traced, done = serve(tiny_dir, tmp_path / "t.npz", ["a", "b"], b_always_fails)
    assert done["b"].finish_reason == "error" and "injected" in done["b"].error
    alone_load, alone_traced, alone_done = serve(tiny_dir, tmp_path / "alone.npz", ["a"])
    assert done["a"].token_ids == alone_done["a"].token_ids == clean[2]["a"].token_ids
    assert np.array_equal(load, alone_load)
    assert list(traced) == ["a"] and np.array_equal(traced["a"], alone_traced["a"])
