"""The monitor thread owns the up socket; shutdown used to close it after a 2 s join that could time out while the
monitor was still polling it (judging a rank's WorkerError, which reads the socket for up to 3 heartbeats): a
socket closed under the thread using it (ZeroMQ sockets are not thread-safe), the monitor dying of a ZMQError."""
import threading
import time

from moe_serve.distributed.launcher import WorkerGroup
from moe_serve.distributed.worker import WorkerSpec
from tests.distributed.test_control import _plan


def test_shutdown_while_the_monitor_judges_a_failure_never_closes_its_socket_under_it(monkeypatch):
    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_value))
    # heartbeat 1.5 s: a WorkerError is judged for up to 4.5 s, past the 2 s the old shutdown gave the monitor
    spec = WorkerSpec(rank=0, tp=1, ep=2, up="", down="", dist_init="", runner="moe_serve.distributed.probe:build",
                      heartbeat_s=1.5, dist_timeout_s=20)
    group = WorkerGroup(spec, world_size=2, startup_timeout_s=60, heartbeat_timeout_s=30,
                        faults={1: "raise_at_step:0"})
    try:
        group.broadcast(_plan(0, [[3], [4]]))
        time.sleep(0.8)  # rank 1's WorkerError is in; the monitor is reading the socket to find the root cause
        t = time.monotonic()
        group.shutdown(grace_s=0.5)
        took = time.monotonic() - t
        group._monitor.join(10)
        assert not group._monitor.is_alive()
        assert crashed == [], crashed  # old code: zmq.ZMQError in the monitor, its socket closed under its poll
        assert group.up.closed and group.ctx.closed  # closed all the same, by the thread that used it
        assert took < 0.5 + 2 + 2.5, took
    finally:
        for p in group.procs:
            if p.poll() is None:
                p.kill()


def test_a_message_naming_no_rank_of_the_group_is_dropped_and_the_monitor_serves_on(monkeypatch):
    """An ipc frame (not signed: a directory only this user opens) that decodes as a rank's message but names a rank
    outside the group (another engine's rank on a reused path, a tool of this user) indexed the monitor's per-rank
    table: IndexError, the monitor thread died, every later step waited out parallel.step_timeout_s."""
    import zmq

    from moe_serve.distributed import messages as m
    from tests.distributed.test_control import _spec

    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_value))
    group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20)
    ctx = zmq.Context()
    stranger = ctx.socket(zmq.PUSH)
    try:
        stranger.connect(group.endpoints.up)
        stranger.send(m.encode(m.Heartbeat(7, 0, time.time(), "serving")))
        time.sleep(0.5)
        assert crashed == [] and group._monitor.is_alive() and group.error is None, crashed
        group.broadcast(_plan(0, [[3], [4]]))  # and the ranks' steps still come back
        assert len(group.collect(0, 2, timeout_s=20)) == 2
    finally:
        stranger.close(linger=0)
        ctx.term()
        group.shutdown(grace_s=1)
