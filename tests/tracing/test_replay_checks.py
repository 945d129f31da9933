"""serve/generate --replay-trace: a bad trace is refused before any weight is read."""
import shutil

import numpy as np
import pytest

from moe_serve import LLM
from predictors.traces import RoutingTrace


@pytest.fixture
def weightless(tiny_dir, tmp_path):
    """The tiny checkpoint's config.json and tokenizer without its weights: loading the model fails,
    so an error about the trace proves the trace was checked before any weight was read."""
    out = tmp_path / "no_weights"
    shutil.copytree(tiny_dir, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    return out


def _save(path, T=4):
    RoutingTrace(experts=np.broadcast_to(np.arange(2, dtype=np.int16), (T, 2, 2)).copy(),
                 weights=np.full((T, 2, 2), 0.5, np.float16), seq_offsets=np.array([0, T]), num_experts=4).save(path)
    return path


def test_bad_replay_trace_is_refused_before_the_weights_load(weightless, tmp_path):
    """A missing, corrupt or empty trace was found only after the model had loaded (minutes for a big one)."""
    missing = tmp_path / "missing.npz"
    with pytest.raises(FileNotFoundError, match=rf"trace\.replay_trace: trace file {missing} does not exist"):
        LLM(model=str(weightless), replay_trace=str(missing))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=rf"trace\.replay_trace {corrupt}: not an \.npz archive"):
        LLM(model=str(weightless), replay_trace=str(corrupt))
    empty = _save(tmp_path / "empty.npz", T=0)
    with pytest.raises(ValueError, match=rf"trace\.replay_trace {empty}: the trace has no tokens"):
        LLM(model=str(weightless), replay_trace=str(empty))
    good = _save(tmp_path / "good.npz")  # a good trace passes; then the missing weights stop the start
    with pytest.raises(Exception) as err:
        LLM(model=str(weightless), replay_trace=str(good))
    assert "trace.replay_trace" not in str(err.value) and "no *.safetensors file" in str(err.value)


def test_replay_state_does_not_grow_with_requests_served(tiny_dir, tmp_path):
    """serve --replay-trace kept one (sequence -> trace sequence) entry per request ever served: memory
    grew with uptime. The state is per KV slot now; the cycling order (request i replays trace sequence
    i mod S, whatever slot it lands in) is unchanged."""
    from moe_serve import SamplingParams

    rng = np.random.default_rng(0)
    lens = [5, 9, 7]
    T = sum(lens)
    experts = np.stack([rng.permutation(4)[:2] for _ in range(T * 2)]).reshape(T, 2, 2).astype(np.int16)
    weights = np.broadcast_to(np.array([0.7, 0.3], np.float16), (T, 2, 2)).copy()  # distinct: a fixed order
    src = tmp_path / "src.npz"
    RoutingTrace(experts=experts, weights=weights, seq_offsets=np.concatenate([[0], np.cumsum(lens)]),
                 num_experts=4).save(src)
    rec = tmp_path / "rec.npz"
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with LLM(model=str(tiny_dir), replay_trace=str(src), record_trace=str(rec), max_num_seqs=2) as llm:
        replay = llm.engine.hooks.replay
        held = []
        for n in (3, 10):  # more requests than slots, joining the running batch as others finish
            llm.generate([[5 + i, 6, 7, 8] for i in range(n)], params)
            held.append(len(replay.assigned))
        assert held[0] == held[1] <= 2  # was 3, then 13
    from predictors.traces import load_trace

    got = load_trace(rec)
    assert got.num_sequences == 13
    for i in range(13):  # position p of request i took row p mod len of trace sequence i mod 3
        s = i % 3
        rows = got.experts[got.sequence(i)]
        want = experts[[int(np.sum(lens[:s])) + p % lens[s] for p in range(len(rows))]]
        assert np.array_equal(rows, want), i


def test_replay_holds_ids_in_the_file_s_width():
    """The replay held every row's ids as int64: 4x the trace file's int16, for a server's whole uptime
    (a million-token trace of a 60-layer top-8 model is ~1 GB as int16). The ids it routes are still
    the router's long ones."""
    import torch

    from moe_serve.models.batch import ForwardBatch
    from moe_serve.tracing.replay import TraceReplay

    T = 6
    experts = np.broadcast_to(np.array([2, 0], np.int16), (T, 2, 2)).copy()
    trace = RoutingTrace(experts=experts, weights=np.full((T, 2, 2), 0.5, np.float16),
                         seq_offsets=np.array([0, T]), num_experts=4)
    replay = TraceReplay(trace, num_layers=2, num_experts=4, top_k=2)
    assert replay.experts.element_size() == 2 and replay.experts.shape == (T, 2, 2)
    batch = ForwardBatch.single([3, 4, 5])
    replay.begin_step(batch)
    ids, w = replay.route(1, None, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))
    assert ids.dtype == torch.long and ids.tolist() == [[2, 0]] * 3 and w.tolist() == [[0.5, 0.5]] * 3
