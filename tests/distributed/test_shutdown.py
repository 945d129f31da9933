"""AsyncEngine.shutdown() with a rank hung in the step in flight: bounded by parallel.shutdown_grace_s, after
which the ranks are killed; it waited for the monitor to find the rank silent (heartbeat_timeout_s)."""
import asyncio
import os
import signal
import threading
import time

from moe_serve.config import EngineConfig
from moe_serve.engine import SamplingParams
from moe_serve.engine.async_engine import AsyncEngine
from tests.models.tiny_checkpoints import make_tiny_checkpoint


def test_shutdown_with_a_hung_rank_is_bounded_by_the_grace(tmp_path):
    import psutil

    ckpt = str(make_tiny_checkpoint("mixtral", tmp_path / "mixtral"))
    engine = AsyncEngine.from_config(EngineConfig.from_flat(
        model=ckpt, max_num_seqs=2, ep=2, allreduce="gloo", threads_per_rank=1, heartbeat_timeout_s=30,
        shutdown_grace_s=1))
    pids = engine.engine.model.group.pids()
    first = threading.Event()

    async def consume():
        params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        try:
            async for _ in engine.generate([5, 6, 7], params, request_id="r"):
                first.set()
        except Exception:  # noqa: BLE001 - the engine shut down under it
            pass

    client = threading.Thread(target=asyncio.run, args=(consume(),))
    client.start()
    try:
        assert first.wait(30)
        os.kill(pids[1], signal.SIGSTOP)  # hung: neither computing nor beating, the step in flight waits for it
        time.sleep(0.5)
        t = time.monotonic()
        engine.shutdown()
        took = time.monotonic() - t
        client.join(timeout=10)
        # grace 1 s for the step, 0.5 s for the ranks, then SIGTERM (a stopped rank ignores it: 2 s) and SIGKILL
        assert took < 1 + 0.5 + 2 * 2 + 1.5, took
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        engine.shutdown()
        client.join(timeout=10)


def test_shutdown_during_a_broadcast_leaves_the_sockets_to_it_and_fails_it_cleanly():
    """shutdown() while another thread's broadcast is between its per-rank sends (a real thread preempted there):
    it sent its Shutdowns on the sockets that thread was using (ZeroMQ sockets are not thread-safe) and closed them
    under it, so the resumed broadcast died of zmq.ZMQError 'not a socket' instead of a WorkerFailure. Now shutdown
    fails the group, leaves the sockets to the broadcast (which closes them when it returns) and stays bounded."""
    import pytest

    from moe_serve.distributed.launcher import WorkerFailure, WorkerGroup
    from tests.distributed.test_control import _plan, _spec

    group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20)
    at_rank0, go, raised = threading.Event(), threading.Event(), []
    send = group._send

    def paused_send(r, frame, deadline, late):
        send(r, frame, deadline, late)
        if r == 0:
            at_rank0.set()
            go.wait(30)

    group._send = paused_send

    def step():
        try:
            group.broadcast(_plan(0, [[3], [4]]))
        except BaseException as exc:  # noqa: BLE001 - checked below
            raised.append(exc)

    sender = threading.Thread(target=step, name="step")
    sender.start()
    try:
        assert at_rank0.wait(30)
        t = time.monotonic()
        group.shutdown(grace_s=1)
        took = time.monotonic() - t
        go.set()
        sender.join(10)
        assert not sender.is_alive()
        # waited 1 s for the broadcast's lock, 1 s for the ranks (rank 0 is in a step that waits for rank 1), SIGTERM
        assert took < 1 + 1 + 2 + 1.5, took
        assert len(raised) == 1 and isinstance(raised[0], WorkerFailure), raised
        assert "shut down" in str(raised[0])
        assert all(s.closed for s in [group.up, *group.down]) and group.ctx.closed  # closed by the broadcast
        assert all(p.poll() is not None for p in group.procs)
        with pytest.raises(WorkerFailure, match="shut down"):  # and nothing is sent after
            group.broadcast(_plan(1, [[3], [4]]))
    finally:
        go.set()
        for p in group.procs:
            if p.poll() is None:
                p.kill()
