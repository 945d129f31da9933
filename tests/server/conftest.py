"""Real servers on loopback: `python -m moe_serve.server` (= `moe-serve serve`) in a subprocess.

Two servers on a tiny random Mixtral checkpoint with a real BPE tokenizer, each on a free port
chosen at runtime: `server` (2 KV slots, at most 3 requests in flight: the OpenAI client, bad
requests, disconnects, queue full, metrics, traces) and `strict_server` (1 KV slot, a 0.3 s
timeout, an API key, an offloading expert store of 4 slots) for cache metrics, timeouts, auth and the schema fuzz, whose requests the timeout keeps short.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.engine.tiny_checkpoint import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
CONTEXT = 4096


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    model: str
    trace_dir: Path
    headers: dict

    def metrics(self) -> dict[str, float]:
        """Prometheus samples without labels' quotes: {'name{label="v"}': value}."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir: Path, trace_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    log = open(trace_dir / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moe_serve.server", "--model", str(model_dir), "--port", str(port),
                             "--trace-dir", str(trace_dir), *flags], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become healthy in {timeout} s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@contextmanager
def started_servers(model_dir: Path, tmp_path_factory, specs: dict) -> Iterator[dict[str, Server]]:
    """A server per spec (name -> (headers, flags)) on `model_dir`, started at once so that their
    start-ups overlap; all stopped on exit."""
    started = {}
    try:
        for name, (headers, flags) in specs.items():
            trace_dir = tmp_path_factory.mktemp(f"{name}_traces")
            proc, url = launch(model_dir, trace_dir, *flags)
            started[name] = Server(url, proc, model_dir.name, trace_dir, dict(headers))
        for s in started.values():
            wait_healthy(s.proc, s.url, s.trace_dir / "server.log")
        yield started
    finally:
        for s in started.values():
            stop_server(s)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The engine tests' tiny Mixtral, with a 4096-token context so that long requests outlast the
    disconnects and timeouts the tests provoke even on a fast machine."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("srv") / "tiny-mixtral")
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def servers(tiny_model, tmp_path_factory):
    """Both servers, started at once so that their start-ups overlap."""
    specs = {
        "server": ((), ("--max-num-seqs", "2", "--max-pending-requests", "3")),
        "strict": ({"Authorization": f"Bearer {API_KEY}"},
                   ("--max-num-seqs", "1", "--request-timeout-s", "0.3", "--expert-cache-slots", "4",
                    "--cache-policy", "lru", "--api-key", API_KEY)),
    }
    with started_servers(tiny_model, tmp_path_factory, specs) as started:
        yield started


@pytest.fixture(scope="session")
def server(servers) -> Server:
    return servers["server"]


@pytest.fixture(scope="session")
def strict_server(servers) -> Server:
    return servers["strict"]
