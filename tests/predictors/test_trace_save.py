"""RoutingTrace.save replaces a trace file whole or not at all."""
from __future__ import annotations

import contextlib
import resource
import signal

import numpy as np
import pytest

from predictors.traces import RoutingTrace, load_trace
from tests.predictors.synth import layer_map_trace


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` of a file fail with OSError (EFBIG), as on a full disk: a real short write,
    not a stand-in for the writer. SIGXFSZ is ignored meanwhile, else the kernel would kill the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _with_hidden(trace: RoutingTrace, size: int) -> RoutingTrace:
    hidden = np.random.default_rng(0).standard_normal((trace.num_tokens, trace.num_layers, size)).astype(np.float32)
    return RoutingTrace(trace.experts, trace.weights, trace.seq_offsets, trace.num_experts, hidden=hidden,
                        meta=dict(trace.meta))


def test_a_failed_save_leaves_the_old_trace_whole(tmp_path):
    """save opened the target with "wb" and wrote into it: a write that failed midway (disk full,
    Ctrl-C) left a truncated archive where a good trace had been. Now it writes beside the target
    and renames over it."""
    path = tmp_path / "t.npz"
    old = layer_map_trace(tokens=40, L=3, E=8, K=2, seqs=2)
    old.save(path)
    before = path.read_bytes()
    big = _with_hidden(layer_map_trace(tokens=200, L=3, E=8, K=2, seqs=4), 256)  # ~300 KB of hidden states
    with file_size_limit(len(before) + 64 * 1024), pytest.raises(OSError):
        big.save(path)
    assert path.read_bytes() == before and load_trace(path).num_tokens == 40
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temporary file left behind
    big.save(path)  # and without the limit the new trace replaces the old one
    assert load_trace(path).num_tokens == 200 and [p.name for p in tmp_path.iterdir()] == ["t.npz"]


def test_save_to_a_missing_directory_names_the_directory(tmp_path):
    """The error names the trace asked for, not the temporary file written first."""
    with pytest.raises(FileNotFoundError, match="no-such-dir/t.npz: directory .*no-such-dir does not exist"):
        layer_map_trace(tokens=10, L=2, E=4, K=2, seqs=1).save(tmp_path / "no-such-dir" / "t.npz")
