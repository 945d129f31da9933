"""Ranks that die or never come, at the moments the other tests do not reach: each waiting caller gets a
WorkerFailure naming the rank within a bounded time (never a bare zmq error after minutes), and no rank
process or temp dir is left behind."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_serve.distributed import messages as m
from moe_serve.distributed.endpoints import free_tcp_port, free_tcp_port_run
from moe_serve.distributed.launcher import WorkerFailure, WorkerGroup
from moe_serve.distributed.worker import WorkerSpec

ROOT = Path(__file__).resolve().parents[2]


def _spec(tp, ep):
    return WorkerSpec(rank=0, tp=tp, ep=ep, up="", down="", dist_init="", runner="moe_serve.distributed.probe:build",
                      heartbeat_s=0.2, dist_timeout_s=20)


def _plan(step):
    blob = m.TensorBlob.from_tensor
    return m.StepPlan(step=step, token_ids=blob(torch.tensor([step + 1])), positions=blob(torch.zeros(1, dtype=torch.long)),
                      slot_ids=[0], query_lens=[1], context_lens=[0])


def _external_ranks(world: int, port: int) -> list[subprocess.Popen]:
    """Ranks started as torchrun starts them (RANK, WORLD_SIZE, MASTER_*): the frontend has no process to watch."""
    master = free_tcp_port()
    base = dict(os.environ, OMP_NUM_THREADS="1", MOE_SERVE_FRONTEND=f"127.0.0.1:{port}", WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master),
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return [subprocess.Popen([sys.executable, "-m", "moe_serve.distributed.worker"],
                             env=dict(base, RANK=str(r), LOCAL_RANK=str(r))) for r in range(world)]


def test_external_ranks_that_never_connect_are_named():
    # before: the Configure send blocked for startup_timeout_s, then raised a bare zmq.error.Again
    port = free_tcp_port_run(3)
    t = time.monotonic()
    with pytest.raises(WorkerFailure, match=rf"rank 0 did not connect to parallel.worker_endpoint=tcp://127.0.0.1:{port} "
                                            r".* within parallel.startup_timeout_s=2 s"):
        WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=2, external=f"tcp://127.0.0.1:{port}")
    assert time.monotonic() - t < 6


@pytest.mark.parametrize("pause", [0.2, 3.0], ids=["step-at-once", "idle-past-heartbeat-timeout"])
def test_step_sent_to_a_killed_external_rank_fails_naming_it(pause):
    # a PUSH socket whose one peer is gone blocks in send(): before, broadcast() sat there for
    # startup_timeout_s (180 s by default) and raised zmq.error.Again, which no caller turned into a request
    # error. A torchrun rank has no process here to poll, so its death shows only as silence, which the
    # monitor did not check for such ranks, and the survivor's gloo error did not name it.
    port = free_tcp_port_run(3)
    ranks = _external_ranks(2, port)
    group = None
    try:
        group = WorkerGroup(_spec(2, 1), world_size=2, startup_timeout_s=20, heartbeat_timeout_s=2,
                            external=f"tcp://127.0.0.1:{port}")
        group.broadcast(_plan(0))
        assert len(group.collect(0, 1, timeout_s=20)) == 1
        ranks[1].kill()
        ranks[1].wait()
        time.sleep(pause)  # 0.2: zmq has seen the disconnect, the next send finds no peer for rank 1
        if pause > 2:  # idle: the monitor alone declares it dead
            assert f"rank 1 ({os.uname().nodename} pid {ranks[1].pid}) sent no heartbeat for" in str(group.error), group.error
        t = time.monotonic()
        with pytest.raises(WorkerFailure, match=r"rank 1 .*sent no heartbeat"):
            group.broadcast(_plan(1))
            group.collect(1, 1, timeout_s=20)
        assert time.monotonic() - t < 8
    finally:
        if group is not None:
            group.shutdown()
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.wait()
