"""Trace files at the edges: paths the recorder is given, malformed archives the loader is given."""
import numpy as np
import pytest

from moe_serve import LLM, SamplingParams
from predictors.traces import load_trace

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def test_record_trace_writes_the_path_given_and_checks_it_before_the_run(tiny_dir, tmp_path):
    rec = tmp_path / "rec"  # no .npz suffix: numpy would write rec.npz, and the user looks for rec
    with LLM(model=str(tiny_dir), record_trace=str(rec)) as llm:
        llm.generate(["hi there"], GREEDY)
    assert rec.is_file() and not (tmp_path / "rec.npz").exists()
    assert load_trace(rec).num_sequences == 1

    folder = tmp_path / "adir"  # was silently written to adir.npz beside it, after the whole run
    folder.mkdir()
    with pytest.raises(ValueError, match=r"trace\.record_trace .*adir: is a directory"):
        LLM(model=str(tiny_dir), record_trace=str(folder))
    blocker = tmp_path / "file"  # a parent that is a file: was a bare FileNotFoundError at close, after the run
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"trace\.record_trace .*cannot create its directory"):
        LLM(model=str(tiny_dir), record_trace=str(blocker / "x.npz"))


def _npy(array) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _npz(path, **arrays):
    base = dict(experts=np.broadcast_to(np.arange(2, dtype=np.int16), (3, 2, 2)), weights=np.full((3, 2, 2), 0.5, np.float16),
                seq_offsets=np.array([0, 1, 3]), meta=np.array('{"num_experts": 4, "top_k": 2}'))
    base.update(arrays)
    with open(path, "wb") as f:
        np.savez(f, **{k: v for k, v in base.items() if v is not None})
    return path


@pytest.mark.parametrize("key, value, message", [
    # were loaded as they were: a str or bool weight failed later deep in numpy, a NaN replayed as NaN logits
    ("weights", np.full((3, 2, 2), "a"), r"'weights' must hold numbers, got dtype <U1"),
    ("weights", np.ones((3, 2, 2), bool), r"'weights' must hold numbers, got dtype bool"),
    ("weights", np.full((3, 2, 2), np.nan, np.float16), r"'weights' must be finite"),
    # a float token id was truncated by save's int cast; a hidden state without H was taken
    ("token_ids", np.array([1.5, 2.0, 3.0]), r"'token_ids' must hold integers, got dtype float64"),
    ("hidden", np.zeros((3, 2), np.float16), r"hidden must be \[T, L, H\]"),
    ("hidden", np.full((3, 2, 4), "x"), r"'hidden' must hold numbers, got dtype <U1"),
])
def test_load_trace_refuses_arrays_of_the_wrong_kind(tmp_path, key, value, message):
    path = _npz(tmp_path / "t.npz", **{key: value})
    with pytest.raises(ValueError, match=rf"trace {path}: .*{message}"):
        load_trace(path)


def test_load_trace_names_a_member_that_is_not_a_numpy_array(tmp_path):
    import zipfile

    path = _npz(tmp_path / "t.npz")
    with zipfile.ZipFile(path, "a") as z:  # a member that is no .npy: was a bare AttributeError
        z.writestr("token_ids.npy", b"hello")
    with pytest.raises(ValueError, match=rf"trace {path}: 'token_ids' is not a numpy array"):
        load_trace(path)
    cut = tmp_path / "cut.npz"  # a truncated member: numpy's EOF message did not say which
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(cut, "w") as z:
        for name in ("weights.npy", "seq_offsets.npy", "meta.npy"):
            z.writestr(name, src.read(name))
        z.writestr("experts.npy", _npy(np.zeros((3, 2, 2), np.int16))[:-4])
    with pytest.raises(ValueError, match=rf"trace {cut}: 'experts': EOF"):
        load_trace(cut)
    bad = tmp_path / "meta.npz"  # the JSON error alone did not say which key
    _npz(bad, meta=np.array("{bad"))
    with pytest.raises(ValueError, match=rf"trace {bad}: 'meta' is not valid JSON"):
        load_trace(bad)


def test_select_sequences_refuses_ids_out_of_range():
    from predictors.traces import RoutingTrace

    t = RoutingTrace(experts=np.zeros((3, 1, 1), np.int16), weights=np.ones((3, 1, 1), np.float16),
                     seq_offsets=np.array([0, 1, 3]), num_experts=2)
    assert t.select_sequences([1, 0]).seq_offsets.tolist() == [0, 2, 3]
    # -1 was an empty sequence, silently (seq_offsets[-1] .. seq_offsets[0]); 2 a bare IndexError
    for bad in ([-1], [0, 2]):
        with pytest.raises(ValueError, match=r"select_sequences: sequence ids must lie in \[0, 2\), got"):
            t.select_sequences(bad)
    assert t.sequence(1) == slice(1, 3)
    with pytest.raises(ValueError, match=r"sequence: sequence ids must lie in \[0, 2\), got \[-1\]"):
        t.sequence(-1)  # was slice(3, 0): no rows, silently


def test_replay_of_an_empty_trace_names_the_file(tiny_dir, tmp_path):
    from predictors.traces import RoutingTrace

    path = tmp_path / "empty.npz"
    RoutingTrace(experts=np.zeros((0, 2, 2), np.int16), weights=np.zeros((0, 2, 2), np.float16),
                 seq_offsets=np.array([0]), num_experts=4).save(path)
    with pytest.raises(ValueError, match=rf"trace\.replay_trace {path}: the trace has no tokens"):  # named no file
        LLM(model=str(tiny_dir), replay_trace=str(path))


def test_saved_meta_counts_are_the_saved_trace_s(tmp_path):
    """The shared traces' meta carries tokens and sequences: a selection saved kept the whole file's
    counts (8,222 tokens in a file of 64)."""
    import json

    from predictors.traces import RoutingTrace

    t = RoutingTrace(experts=np.zeros((3, 1, 1), np.int16), weights=np.ones((3, 1, 1), np.float16),
                     seq_offsets=np.array([0, 1, 3]), num_experts=2, meta={"tokens": 3, "sequences": 2, "model": "m"})
    t.select_sequences([1]).save(tmp_path / "one.npz")
    with np.load(tmp_path / "one.npz") as z:
        meta = json.loads(str(z["meta"]))
    assert meta == {"tokens": 2, "sequences": 1, "model": "m", "num_experts": 2, "top_k": 1}
    assert load_trace(tmp_path / "one.npz").meta["tokens"] == 2


def test_record_hidden_without_record_trace_is_refused():
    """It recorded nothing, silently (`moe-serve generate --record-hidden` without --record-trace)."""
    from moe_serve.config import TraceConfig

    with pytest.raises(ValueError, match=r"trace\.record_hidden must be .*trace\.record_trace"):
        TraceConfig(record_hidden=True)
    assert TraceConfig(record_hidden=True, record_trace="t.npz").record_hidden


def test_fit_routing_keeps_the_highest_weights_of_an_unsorted_row():
    """The rule keeps the trace's highest-weight top_k; it kept the first ones, which are those only
    when the row is sorted (the loader does not require it of other producers' files)."""
    from moe_serve.tracing.replay import fit_routing

    experts = np.array([[[3, 1, 2]]], dtype=np.int16)
    weights = np.array([[[0.1, 0.6, 0.3]]], dtype=np.float16)
    ids, w = fit_routing(experts, weights, num_experts=4, top_k=2)
    assert ids.tolist() == [[[1, 2]]]
    np.testing.assert_allclose(w[0, 0], np.array([0.6, 0.3]) / 0.9, rtol=1e-3)


def test_load_trace_refuses_a_row_that_repeats_an_expert(tmp_path):
    """A router's top-k are distinct experts: a row with one twice was loaded and counted twice."""
    experts = np.zeros((3, 2, 2), np.int16)
    experts[..., 1] = 1
    experts[2, 1] = [3, 3]
    path = _npz(tmp_path / "dup.npz", experts=experts)
    with pytest.raises(ValueError, match=rf"trace {path}: 'experts' row 2, MoE layer 1 holds expert 3 twice"):
        load_trace(path)


def test_num_experts_beyond_the_int16_ids_is_refused(tmp_path):
    """Ids are stored as int16: an id past 32767 was saved wrapped negative (a file that then failed to
    load), and meta num_experts=10**12 loaded and made the predictors allocate [L, E] arrays of it."""
    from predictors.traces import RoutingTrace

    path = _npz(tmp_path / "huge.npz", meta=np.array('{"num_experts": 1000000000000}'))
    with pytest.raises(ValueError, match=rf"trace {path}: .*num_experts=1000000000000 .*at most 32768"):
        load_trace(path)
    with pytest.raises(ValueError, match=r"num_experts=40000 .*at most 32768"):
        RoutingTrace(experts=np.full((1, 1, 1), 39999), weights=np.ones((1, 1, 1)), seq_offsets=np.array([0, 1]),
                     num_experts=40000)
