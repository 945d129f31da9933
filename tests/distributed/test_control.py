"""Control plane: typed messages round trip; ranks start, answer, fail loudly and never hang."""
import os
import signal
import time

import msgspec
import pytest
import torch

from moe_serve.distributed import messages as m
from moe_serve.distributed.launcher import WorkerFailure, WorkerGroup
from moe_serve.distributed.groups import ParallelLayout
from moe_serve.distributed.probe import expected_probe_logits
from moe_serve.distributed.worker import WorkerSpec


def _blob(t):
    return m.TensorBlob.from_tensor(t)


def test_messages_round_trip():
    plan = m.StepPlan(step=7, token_ids=_blob(torch.tensor([5, 6, 7])), positions=_blob(torch.tensor([0, 1, 4])),
                      slot_ids=[0, 3], query_lens=[2, 1], context_lens=[0, 4], seq_ids=[10, 11], freed_slots=[2])
    for msg in (plan, m.PlacementCommand(at_step=9, plan_json="{}"), m.CacheCommand("prefetch", 1, [2, 3]),
                m.Shutdown("bye")):
        back = m.decode_to_worker(m.encode(msg))
        assert type(back) is type(msg)
        assert m.encode(back) == m.encode(msg)
    assert torch.equal(m.decode_to_worker(m.encode(plan)).token_ids.to_tensor(), torch.tensor([5, 6, 7]))
    logits = torch.randn(2, 5).to(torch.bfloat16)
    out = m.StepOutput(step=7, rank=0, seq_index=[0, 1], logits=_blob(logits), compute_s=0.1, stats={"copies": 3.0})
    back = m.decode_from_worker(m.encode(out))
    assert torch.equal(back.logits.to_tensor(), logits) and back.stats == {"copies": 3.0}
    for msg in (m.Ready(1, 2, "h", 0.5), m.Heartbeat(1, 3, 1.0), m.WorkerError(1, 3, "boom")):
        assert m.decode_from_worker(m.encode(msg)) == msg


def test_bad_frames_are_rejected_not_executed():
    with pytest.raises(msgspec.DecodeError):
        m.decode_to_worker(b"\x93garbage")
    with pytest.raises(msgspec.ValidationError):  # a worker->frontend message is not a command
        m.decode_to_worker(m.encode(m.Heartbeat(0, 0, 0.0)))


def _spec(tp, ep, **kw):
    return WorkerSpec(rank=0, tp=tp, ep=ep, up="", down="", dist_init="", runner="moe_serve.distributed.probe:build",
                      heartbeat_s=0.2, dist_timeout_s=20, **kw)


def _plan(step, seqs):
    ids = [t for s in seqs for t in s]
    return m.StepPlan(step=step, token_ids=_blob(torch.tensor(ids)), positions=_blob(torch.zeros(len(ids), dtype=torch.long)),
                      slot_ids=list(range(len(seqs))), query_lens=[len(s) for s in seqs], context_lens=[0] * len(seqs))


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 2)])
def test_probe_steps_exact(tp, ep):
    group = WorkerGroup(_spec(tp, ep), world_size=max(tp, ep), startup_timeout_s=60, heartbeat_timeout_s=20)
    try:
        layout = ParallelLayout(tp, ep)
        for step, seqs in enumerate([[[1, 2, 3], [9]], [[4], [10]], [[5], [11]]]):
            group.broadcast(_plan(step, seqs))
            outs = group.collect(step, len(layout.output_ranks()), timeout_s=30)
            for out in outs:
                want = expected_probe_logits([s[-1] for s in seqs], out.rank, layout.tp_groups(), layout.ep_groups())
                assert torch.equal(out.logits.to_tensor(), want), (out.rank, step)
    finally:
        group.shutdown()
    assert all(p.returncode == 0 for p in group.procs)


def test_rank_that_hangs_at_startup_is_named():
    t = time.monotonic()
    # 15 s: long enough for rank 0 to import torch and reach the rendezvous on a busy 2-core machine
    with pytest.raises(WorkerFailure, match=r"did not come up within parallel.startup_timeout_s=15 s") as err:
        WorkerGroup(_spec(2, 1), world_size=2, startup_timeout_s=15, faults={1: "hang_before_ready"})
    assert "rank 1: stuck before joining the process group" in str(err.value)
    assert "rank 0: waiting in the rendezvous" in str(err.value)
    assert time.monotonic() - t < 30


def test_rank_that_exits_at_startup_is_named():
    with pytest.raises(WorkerFailure, match=r"rank 0 \(pid \d+\) exited with code 3 before it was ready"):
        WorkerGroup(_spec(2, 1), world_size=2, startup_timeout_s=60, faults={0: "exit_before_ready"})


def test_rank_dying_mid_run_fails_the_step(how="exit_at_step"):  # SIGKILL: test_engine_parallel
    faults = {1: "exit_at_step:2"} if how == "exit_at_step" else {}
    group = WorkerGroup(_spec(2, 1), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20, faults=faults)
    try:
        for step in range(4):
            if how == "sigkill" and step == 2:
                os.kill(group.pids()[1], signal.SIGKILL)
            t = time.monotonic()
            try:
                group.broadcast(_plan(step, [[step]]))
                group.collect(step, 1, timeout_s=30)
            except WorkerFailure as exc:
                assert step == 2 and "rank 1" in str(exc) and "exited with code" in str(exc)
                assert time.monotonic() - t < 10
                break
        else:
            pytest.fail("a dead rank went unnoticed")
    finally:
        group.shutdown()
    assert all(p.returncode is not None for p in group.procs)


def _keeps_serving_then_stops_cleanly(group: WorkerGroup) -> None:
    """Two ep=2 steps answered by both ranks half a second after a blow that must not kill them."""
    try:
        time.sleep(0.5)  # a rank the blow killed would be gone by now
        layout = ParallelLayout(1, 2)
        for step in range(2):
            group.broadcast(_plan(step, [[3], [4]]))
            assert len(group.collect(step, len(layout.output_ranks()), timeout_s=30)) == 2
        assert all(p.poll() is None for p in group.procs)
    finally:
        group.shutdown()
    assert all(p.returncode == 0 for p in group.procs)


def test_ctrl_c_is_the_frontends_to_handle_not_the_ranks():
    # a terminal's Ctrl-C reaches every process of the foreground group: the ranks must keep serving
    # (the frontend stops them with Shutdown, e.g. after uvicorn's graceful shutdown), not die at once
    group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20)
    for pid in group.pids():
        os.kill(pid, signal.SIGINT)
    _keeps_serving_then_stops_cleanly(group)


def test_ranks_outlive_the_thread_that_started_them():
    # Linux ties a rank's die-with-parent signal to the thread that forked it: a group built in a
    # short-lived thread (an LLM made in asyncio.to_thread) must keep serving once that thread is gone
    import threading

    made = []
    starter = threading.Thread(target=lambda: made.append(
        WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20)))
    starter.start()
    starter.join()
    _keeps_serving_then_stops_cleanly(made[0])


def test_worker_endpoint_in_use_is_named():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=rf"parallel.worker_endpoint: cannot bind tcp://127.0.0.1:{port} "
                                             r"\(Address already in use\)"):
            WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=5, external=f"tcp://127.0.0.1:{port}")
        # PORT + 1 + r are the ranks' sockets: one of them taken is named too
        with pytest.raises(ValueError, match=r"parallel.worker_endpoint: cannot bind tcp://127.0.0.1:\d+ \(Address already in use\)"):
            WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=5, external=f"tcp://127.0.0.1:{port - 1}")


def test_a_stray_frame_on_the_up_socket_does_not_stop_the_monitor(caplog):
    # a peer on the up socket (a process of the same user on the ipc path; tcp takes CURVE peers only): its frame
    # failed to decode inside the monitor thread, which ended, and every later step waited out its timeout (600 s
    # by default) for outputs never routed
    import zmq

    group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20)
    ctx = zmq.Context()
    stray = ctx.socket(zmq.PUSH)
    stray.setsockopt(zmq.LINGER, 0)
    try:
        stray.connect(group.up.getsockopt_string(zmq.LAST_ENDPOINT))
        stray.send(b"\x93garbage")
        stray.send(m.encode(m.Shutdown("a command is no rank's message")))
        time.sleep(0.5)  # the monitor has read them
        layout = ParallelLayout(1, 2)
        for step in range(2):
            group.broadcast(_plan(step, [[3], [4]]))
            assert len(group.collect(step, len(layout.output_ranks()), timeout_s=5)) == 2
        assert group.error is None and caplog.text.count("dropped a") == 2, caplog.text
    finally:
        stray.close()
        ctx.term()
        group.shutdown()


_PAUSED_FRONTEND = """
import sys
from moe_serve.distributed.launcher import WorkerGroup
from tests.distributed.test_control import _plan, _spec
group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=30, heartbeat_timeout_s=1)
print(*group.pids(), flush=True)
sys.stdin.readline()
try:
    group.broadcast(_plan(0, [[3], [4]]))
    print("answered", len(group.collect(0, 2, timeout_s=10)), flush=True)
except Exception as exc:
    print("failed:", exc, flush=True)
group.shutdown()
"""


def test_a_stopped_and_resumed_job_is_no_rank_failure():
    # Ctrl-Z then fg stops and resumes the frontend and its ranks together: on resuming, the monitor found every
    # rank silent for longer than heartbeat_timeout_s (it could hear none while itself stopped) and failed them
    import subprocess
    import sys
    from pathlib import Path

    front = subprocess.Popen([sys.executable, "-c", _PAUSED_FRONTEND], cwd=Path(__file__).resolve().parents[2],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        job = [front.pid, *map(int, front.stdout.readline().split())]
        for pid in job:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(2)  # twice heartbeat_timeout_s
        for pid in reversed(job):
            os.kill(pid, signal.SIGCONT)
        front.stdin.write("go\n")
        front.stdin.flush()
        assert front.stdout.readline().strip() == "answered 2"
        assert front.wait(timeout=20) == 0
    finally:
        if front.poll() is None:
            front.kill()
            front.wait()


def test_a_command_the_ranks_refuse_does_not_end_them(capfd):
    # messages.CacheCommand (and a Configure after start-up) reach runner.command, which refuses what it does not
    # support with a ValueError: that ended every rank and failed every request in flight
    group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20)
    group.broadcast(m.CacheCommand("prefetch", 0, [1, 2]))
    _keeps_serving_then_stops_cleanly(group)
    assert capfd.readouterr().err.count("refused CacheCommand: probe runner: command CacheCommand is not supported") == 2


def test_a_rank_that_reports_its_own_error_is_not_blamed_on_the_others():
    # rank 1 fails in its step and reports it; rank 0, in a collective with it, fails and exits as a consequence:
    # the error named rank 0 as the rank that died first ("rank 0 exited with code 1; rank 1 then failed")
    group = WorkerGroup(_spec(2, 1), world_size=2, startup_timeout_s=60, heartbeat_timeout_s=20,
                        faults={1: "raise_at_step:1"})
    try:
        group.broadcast(_plan(0, [[1]]))
        group.collect(0, 1, timeout_s=30)
        with pytest.raises(WorkerFailure) as err:
            group.broadcast(_plan(1, [[2]]))
            group.collect(1, 1, timeout_s=30)
        assert str(err.value).startswith("rank 1 failed at step 1:") and "injected fault at step 1" in str(err.value)
    finally:
        group.shutdown()
