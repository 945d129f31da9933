"""The server on worker ranks: once a rank dies, every request fails with its error, so /health must say so
(a load balancer then stops sending traffic); it kept answering 200 'ok'. Real server, real ranks, real HTTP."""
import os
import signal
import time

import httpx
import psutil
import pytest

from tests.server.conftest import Server, launch, stop_server, wait_healthy


@pytest.mark.limit(240)
def test_health_turns_503_when_a_rank_dies(tiny_dir, tmp_path):
    proc, url = launch(tiny_dir, tmp_path, "--ep", "2", "--threads-per-rank", "1", "--allreduce", "gloo",
                       "--max-num-seqs", "2", "--heartbeat-timeout-s", "20")
    server = Server(url, proc, tiny_dir.name, tmp_path, {})
    try:
        wait_healthy(proc, url, tmp_path / "server.log")
        body = dict(model=tiny_dir.name, prompt="hello", max_tokens=3, temperature=0)
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "moe_serve.distributed.worker" in " ".join(p.cmdline())]
        assert len(ranks) == 2
        os.kill(ranks[1].pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health", timeout=5).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)  # the monitor sees the exit within a poll (0.1 s)
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "engine dead"
        # and why: which rank, how it died (old code: the status alone)
        assert health.json()["reason"] == f"rank 1 (pid {ranks[1].pid}) exited with code -9", health.text
        failed = httpx.post(url + "/v1/completions", json=body, timeout=60)  # and requests fail, as /health says
        assert failed.status_code == 500 and "rank 1" in failed.json()["error"]["message"], failed.text
    finally:
        stop_server(server)
