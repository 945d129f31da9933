"""load_trace(keys=...): a caller that needs expert ids only never reads the hidden states (float16
[T, L, H]: ~850 MB for a DeepSeek-shaped trace), and place, cache-sim and the replay ask for none."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from moe_serve.cli.main import main
from moe_serve.tracing.replay import load_replay
from predictors.traces import RoutingTrace, load_trace
from tests.predictors.synth import layer_map_trace


def _with_hidden(path, H=512):
    """A 2000-token trace with token ids and hidden states float16 [2000, 4, H] (8 MiB at H=512)."""
    t = layer_map_trace(tokens=2000, L=4, E=8, K=2, seqs=5)
    rng = np.random.default_rng(0)
    RoutingTrace(t.experts, t.weights, t.seq_offsets, t.num_experts, token_ids=np.arange(2000),
                 hidden=rng.standard_normal((2000, 4, H)).astype(np.float16), meta={"family": "x"}).save(path)


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_keys_leave_the_hidden_states_unread_and_the_ids_identical(tmp_path):
    path = tmp_path / "t.npz"
    _with_hidden(path)
    full, full_peak = _peak_bytes(lambda: load_trace(path))
    ids_only, ids_peak = _peak_bytes(lambda: load_trace(path, keys=()))
    assert full.hidden is not None and full_peak > 8 * 2**20  # the 8 MiB of hidden states were read
    assert ids_only.hidden is None and ids_only.token_ids is None
    assert ids_peak < 2**20, ids_peak  # ids and weights: 32 KiB each; the hidden member never left the archive
    for name in ("experts", "weights", "seq_offsets"):
        got, want = getattr(ids_only, name), getattr(full, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert (ids_only.num_experts, ids_only.meta) == (full.num_experts, full.meta)
    with_tokens = load_trace(path, keys=["token_ids"])
    assert with_tokens.hidden is None and np.array_equal(with_tokens.token_ids, full.token_ids)
    with pytest.raises(ValueError, match="keys may name token_ids, hidden .* got 'hiden'"):
        load_trace(path, keys=("hiden",))


def test_place_cache_sim_and_replay_do_not_read_hidden_states(tmp_path, capsys):
    """A trace whose hidden member cannot be read (here: strings) is refused by a full load; commands that
    need only expert ids now never read that member, so they run (the old code refused the trace)."""
    t = layer_map_trace(tokens=200, L=3, E=8, K=2, seqs=3)
    path = tmp_path / "t.npz"
    np.savez(path, experts=t.experts, weights=t.weights, seq_offsets=t.seq_offsets,
             meta=np.array('{"num_experts": 8}'), hidden=np.array(["not", "numbers"]))
    with pytest.raises(ValueError, match="'hidden' must hold numbers"):
        load_trace(path)
    plan = tmp_path / "plan.json"
    assert main(["place", "--trace", str(path), "--ep", "2", "--algorithm", "eplb", "--out", str(plan)]) == 0
    assert main(["place", "eval", "--plan", str(plan), "--trace", str(path)]) == 0
    assert main(["cache-sim", "--trace", str(path), "--policy", "lru", "--capacity", "0.5"]) == 0
    assert "hidden" not in capsys.readouterr().err
    replay = load_replay(path, 3, 8, 2)
    assert np.array_equal(replay.experts.numpy(), t.experts)
