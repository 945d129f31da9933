"""`moe-serve serve` flags: one per config field of every section, server section included."""
from __future__ import annotations

import pytest

from moe_serve.cli.flags import config_kwargs
from moe_serve.cli.main import build_parser
from moe_serve.cli.serve import section_classes
from moe_serve.config import EngineConfig


def test_serve_flags_build_the_config_tree():
    args = build_parser().parse_args(["serve", "--model", "/m", "--port", "9001", "--max-num-seqs", "3",
                                      "--max-pending-requests", "7", "--request-timeout-s", "2.5",
                                      "--api-key", "k", "--no-expert-load-stats"])
    cfg = EngineConfig.from_flat(**config_kwargs(args, *section_classes()))
    assert cfg.model.model == "/m" and cfg.kv_cache.max_num_seqs == 3
    assert (cfg.server.port, cfg.server.max_pending_requests, cfg.server.request_timeout_s, cfg.server.api_key) == (
        9001, 7, 2.5, "k")
    assert cfg.trace.expert_load_stats is False
    assert cfg.server.host == "127.0.0.1"  # loopback unless told otherwise


def test_every_config_section_has_flags():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    dests = {a.dest for a in serve._actions}
    for cls in section_classes():
        for name in cls.__dataclass_fields__:
            assert name in dests, f"{cls.__name__}.{name} has no serve flag"


def test_port_0_prints_the_port_it_listens_on(tiny_model, tmp_path):
    """`--port 0` (any free port) must say which port the OS chose: it used to print port 0, so the
    server was unreachable for anyone who did not go and read the socket table."""
    import os
    import re
    import subprocess
    import sys
    import time

    import httpx

    from tests.server.conftest import REPO, wait_healthy

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moe_serve.server", "--model", str(tiny_model), "--port", "0",
                                 "--cpu-threads", "1", "--trace-dir", str(tmp_path)], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "serving" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        m = re.search(r"on (http://127\.0\.0\.1:(\d+))", log.read_text())
        assert m and int(m.group(2)) != 0, log.read_text()
        wait_healthy(proc, m.group(1), log)
        assert httpx.get(m.group(1) + "/v1/models", timeout=10).json()["data"][0]["id"] == tiny_model.name
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("argv, field, want", [
    (["place", "--trace", "a.npz", "--trace", "b.npz"], "trace", ["a.npz", "b.npz"]),
    (["predict", "fit", "--predictor", "mlp", "--out", "p.safetensors", "--trace", "a.npz", "b.npz", "--trace", "c.npz"],
     "trace", ["a.npz", "b.npz", "c.npz"]),
    (["predict", "eval", "--train", "a.npz", "--train", "b.npz", "--test", "c.npz", "--test", "d.npz"],
     "train", ["a.npz", "b.npz"]),
    (["predict", "eval", "--train", "a.npz", "--test", "c.npz", "--test", "d.npz"], "test", ["c.npz", "d.npz"]),
    (["generate", "--stop-token-ids", "1", "2", "--stop-token-ids", "3"], "stop_token_ids", [1, 2, 3]),
])
def test_a_repeated_list_flag_adds_to_the_list(argv, field, want):
    # argparse's nargs="+" kept only the last occurrence: `--trace a --trace b` silently dropped a
    # (cache-sim's flags were fixed in cbee7c1; these were left)
    assert getattr(build_parser().parse_args(argv), field) == want
