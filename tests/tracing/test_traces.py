"""Routing traces: record through the engine, reload with predictors' reader, replay, same tokens."""
from pathlib import Path

import numpy as np
import torch
import pytest

from moe_serve import LLM, SamplingParams
from moe_serve.tracing.replay import fit_routing
from predictors.traces import RoutingTrace, load_trace

PROMPTS = ["The quick brown fox jumps", "Once upon a time", "def add(a, b):\n    return"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces" / "dsv2lite_intent.npz"


def test_record_reload_replay_same_tokens(tiny_dir, tmp_path):
    rec = tmp_path / "rec.npz"
    opts = dict(max_num_seqs=2, prefill_chunk=3, max_num_batched_tokens=4)  # chunks and joins mixed
    with LLM(model=str(tiny_dir), record_trace=str(rec), record_hidden=True, **opts) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
    trace = load_trace(rec)
    assert trace.num_sequences == 3 and trace.top_k == 2 and trace.num_layers == 2 and trace.num_experts == 4
    for s, out in enumerate(outs):
        rows = trace.sequence(s)
        fed = out.prompt_token_ids + out.token_ids[:-1]  # the last sampled token never enters the model
        assert trace.token_ids[rows].tolist() == fed
    assert trace.hidden.shape == (trace.num_tokens, 2, 64)
    assert np.all(np.diff(trace.weights.astype(np.float32), axis=-1) <= 1e-3)  # highest weight first

    rec2 = tmp_path / "rec2.npz"
    with LLM(model=str(tiny_dir), replay_trace=str(rec), record_trace=str(rec2), **opts) as llm:
        replayed = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in replayed] == [o.token_ids for o in outs]
    again = load_trace(rec2)
    assert np.array_equal(again.experts, trace.experts)
    np.testing.assert_allclose(again.weights.astype(np.float32), trace.weights.astype(np.float32), atol=2e-3)


def test_fit_routing_rules():
    experts = np.array([[[9, 1, 5]]], dtype=np.int16)  # [T=1, L=1, K=3], E_trace >= 10
    weights = np.array([[[0.5, 0.3, 0.2]]], dtype=np.float16)
    ids, w = fit_routing(experts, weights, num_experts=4, top_k=2)  # 9 % 4 = 1, 1 collides -> 2
    assert ids.tolist() == [[[1, 2]]]
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-3)  # the row's total gate weight is kept
    ids, w = fit_routing(experts, weights, num_experts=8, top_k=5)  # pad: (first + j) % 8, next free id
    assert ids.tolist() == [[[1, 2, 5, 3, 4]]]  # [1, 1, 5] + pads [2, 3], duplicates moved up
    np.testing.assert_allclose(w[0, 0], np.array([0.5, 0.3, 0.2, 0.2, 0.2]) / 1.4, rtol=1e-3)
    with pytest.raises(ValueError, match="top_k=5 must be <= num_experts=4"):
        fit_routing(experts, weights, num_experts=4, top_k=5)


def test_replay_real_trace_into_another_shape(tiny_dir, tmp_path):
    if not SHARED.exists():
        pytest.skip(f"shared traces not present at {SHARED}")
    real = load_trace(SHARED).select_sequences([0])  # 26 layers, 64 experts, top-6
    n = int(real.seq_offsets[1])
    path = tmp_path / "real.npz"
    real.save(path)
    with LLM(model=str(tiny_dir), replay_trace=str(path)) as llm:
        ids = list(range(5, 5 + min(n - 1, 20)))
        llm.generate(ids, SamplingParams(temperature=0, max_tokens=1))
        load = llm.expert_load()
    fitted, _ = fit_routing(real.experts, real.weights, num_experts=4, top_k=2)  # [T, 26, 2]
    for layer in range(2):  # model layer l replays trace layer l % 26 = l
        expect = np.bincount(fitted[: len(ids), layer].ravel(), minlength=4)
        assert load[layer].tolist() == expect.tolist()


def test_trace_format_is_the_shared_one(tmp_path):
    t = RoutingTrace(experts=np.zeros((3, 2, 2), np.int16), weights=np.ones((3, 2, 2), np.float16),
                     seq_offsets=np.array([0, 1, 3]), num_experts=4, token_ids=np.arange(3))
    t.save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz", allow_pickle=False) as z:
        assert {"experts", "weights", "seq_offsets", "meta", "token_ids"} <= set(z.files)
        assert z["experts"].dtype == np.int16 and z["weights"].dtype == np.float16


def test_expert_load_counter_counts_every_step_whenever_read():
    """Steps are set aside and counted every `fold_every` steps or when read: whenever the counts are
    read they equal a plain count of every routed (layer, expert) so far; reset drops the pending."""
    from moe_serve.tracing.load import ExpertLoadCounter

    rng = np.random.default_rng(0)
    L, E, K = 3, 5, 2
    counter = ExpertLoadCounter(L, E, fold_every=3)
    want = np.zeros((L, E), dtype=np.int64)
    for step in range(8):
        counter.begin_step(None)
        n = int(rng.integers(1, 5))  # tokens this step
        for layer in (0, 2):  # layer 1 dense: never routed
            ids = torch.from_numpy(rng.integers(0, E, size=(n, K)))
            counter.route(layer, None, ids, None)
            np.add.at(want[layer], ids.numpy().ravel(), 1)
        counter.end_step(None)
        if step in (1, 5, 7):  # read mid-fold and on a fold boundary
            assert counter.snapshot().tolist() == want.tolist()
    assert counter.counts[1].sum() == 0 and int(counter.counts.sum()) == int(want.sum())
    counter.begin_step(None)
    counter.route(0, None, torch.tensor([[1, 2]]), None)
    counter.end_step(None)
    counter.reset()
    assert counter.snapshot().sum() == 0
    with pytest.raises(ValueError, match="fold_every must be >= 1"):
        ExpertLoadCounter(L, E, fold_every=0)


def test_expert_load_counter_loses_nothing_to_a_reader_thread():
    """The server's /metrics reads the counts from another thread while the engine steps: every routed
    token is still counted exactly once (a smoke test: the interleavings the lock guards against are
    rare under the GIL, so this does not prove their absence)."""
    import threading

    from moe_serve.tracing.load import ExpertLoadCounter

    counter = ExpertLoadCounter(2, 4, fold_every=2)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])  # 3 tokens, top-2: each step adds 6 per layer
    steps, done = 3000, threading.Event()

    def read():
        while not done.is_set():
            counter.snapshot()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(steps):
            counter.begin_step(None)
            counter.route(0, None, ids, None)
            counter.route(1, None, ids, None)
            counter.end_step(None)
    finally:
        done.set()
        reader.join()
    assert counter.snapshot().tolist() == [[steps, 2 * steps, 2 * steps, steps]] * 2
