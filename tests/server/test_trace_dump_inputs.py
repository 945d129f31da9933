"""POST /v1/traces/dump may not write over a trace file the server itself uses: the trace it replays
(--replay-trace) or the one it records to and writes at shutdown (--record-trace), when either sits in its
trace_dir under the dump's name."""
from __future__ import annotations

import httpx
import pytest

from tests.predictors.synth import layer_map_trace
from tests.server.conftest import launch, wait_healthy


@pytest.fixture(scope="module")
def replaying_server(tiny_model, tmp_path_factory):
    """A server replaying trace_dir/replay.npz and recording to trace_dir/rec.npz; (url, trace_dir)."""
    trace_dir = tmp_path_factory.mktemp("replaying_traces")
    layer_map_trace(tokens=60, L=2, E=4, K=2, seqs=3).save(trace_dir / "replay.npz")
    proc, url = launch(tiny_model, trace_dir, "--replay-trace", str(trace_dir / "." / "replay.npz"),
                       "--record-trace", str(trace_dir / "rec.npz"))
    try:
        wait_healthy(proc, url, trace_dir / "server.log")
        yield url, trace_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except Exception:
            proc.kill()


def test_a_dump_may_not_replace_the_replayed_or_recorded_trace(replaying_server):
    """The dump named 'replay.npz' was written over the trace the server replays (its next restart replayed
    the dump) and 'rec.npz' was written and then replaced by the server's own recording at shutdown. Both
    are now a 409 naming the file and the flag; the replayed trace is byte-identical and the server serves
    on; another name is dumped as before."""
    url, trace_dir = replaying_server
    replayed = (trace_dir / "replay.npz").read_bytes()
    assert httpx.post(url + "/v1/traces/start", timeout=30).status_code == 200
    done = httpx.post(url + "/v1/completions", json={"prompt": [3, 4, 5], "max_tokens": 3, "ignore_eos": True},
                      timeout=60)
    assert done.status_code == 200
    for name, field in (("replay.npz", "trace.replay_trace"), ("rec.npz", "trace.record_trace")):
        r = httpx.post(url + "/v1/traces/dump", json={"path": name}, timeout=30)
        assert r.status_code == 409, (name, r.text)
        error = r.json()["error"]
        assert error["param"] == "path" and name in error["message"] and field in error["message"], error
    assert (trace_dir / "replay.npz").read_bytes() == replayed
    assert not (trace_dir / "rec.npz").exists()  # written by the server at shutdown only
    r = httpx.post(url + "/v1/traces/dump", json={"path": "live.npz"}, timeout=30)
    assert r.status_code == 200 and r.json()["tokens"] == 3 + 3 - 1, r.text
    assert httpx.get(url + "/health", timeout=10).status_code == 200
