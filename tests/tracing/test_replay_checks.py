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
