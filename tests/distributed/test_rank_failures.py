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


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> str:
    from tests.models.tiny_checkpoints import make_tiny_checkpoint

    return str(make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("ckpt") / "mixtral"))


def _external_ranks(world: int, port: int, world_env: int | None = None) -> list[subprocess.Popen]:
    """Ranks started as torchrun starts them (RANK, WORLD_SIZE, MASTER_*): the frontend has no process to watch."""
    master = free_tcp_port()
    base = dict(os.environ, OMP_NUM_THREADS="1", MOE_SERVE_FRONTEND=f"127.0.0.1:{port}", WORLD_SIZE=str(world_env or world),
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


def _our_ranks() -> list:
    import psutil

    return [p for p in psutil.Process().children() if "moe_serve.distributed.worker" in " ".join(p.cmdline())]


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _our_temp_dirs() -> list[str]:
    """moe-serve-* dirs whose owner file names this process (other sessions may share the temp dir)."""
    import glob
    import tempfile

    mine = []
    for d in glob.glob(os.path.join(tempfile.gettempdir(), "moe-serve-*")):
        try:
            if open(os.path.join(d, "owner")).read().split()[0] == str(os.getpid()):
                mine.append(d)
        except OSError:
            pass
    return mine


def test_close_while_the_ranks_start_stops_them(mixtral):
    # a server stopped during its start-up closes the model from another thread than the one starting the
    # ranks: close() found no group yet and did nothing, and the ranks came up afterwards and kept running
    import threading

    from moe_serve.config import ModelConfig, ParallelConfig
    from moe_serve.distributed.executor import DistributedModel

    dm = DistributedModel(ModelConfig(model=mixtral), ParallelConfig(ep=2, allreduce="gloo", threads_per_rank=1))
    got = []

    def start():
        try:
            dm.allocate_kv_cache(4, 64)
            got.append("started")
        except Exception as exc:  # noqa: BLE001 - the test checks which
            got.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    try:
        deadline = time.monotonic() + 10
        while len(_our_ranks()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_our_ranks()) == 2 and dm.group is None  # both spawned, not yet ready
        t = time.monotonic()
        dm.close()
        assert time.monotonic() - t < 5
        starter.join(timeout=10)
        assert len(got) == 1 and isinstance(got[0], WorkerFailure) and "closed while" in str(got[0]), got
        assert _our_ranks() == [] and _our_temp_dirs() == []  # close() returned once they were gone
        dm.close()  # twice: nothing left to do, no error
        with pytest.raises(RuntimeError, match="closed"):
            dm.allocate_kv_cache(4, 64)
    finally:
        dm.close()
        starter.join(timeout=10)


def _run(engine, prompts, params, stagger: bool, abort: str | None = None) -> dict:
    """Finished (token ids, finish reason) by request id: one at a time, or one joining every other step
    (mid-decode of the earlier ones, in prefill chunks) with `abort` stopped at step 5."""
    pending, done, k = list(enumerate(prompts)), {}, 0
    while pending or engine.has_unfinished():
        if pending and (k % 2 == 0 if stagger else not engine.has_unfinished()):
            i, p = pending.pop(0)
            engine.add_request(p, params, request_id=f"r{i}")
        if k == 5 and abort:
            engine.abort(abort)
        done.update({o.request_id: (o.token_ids, o.finish_reason) for o in engine.step() if o.finished})
        k += 1
    return done


def test_joining_requests_then_a_rank_dead_while_idle(mixtral):
    # requests joining mid-decode, with prompts split in prefill chunks over the two data-parallel attention
    # ranks and one aborted (its KV slot reused), give exactly what each gives alone in one process (checked,
    # no bug found). Then a rank killed while the engine is idle: the survivor used to stay up (its shard's
    # memory, a core) until the next request or close(); the next request gets the error naming the dead rank
    import random

    from moe_serve.config import EngineConfig
    from moe_serve.engine import SamplingParams
    from moe_serve.engine.llm_engine import LLMEngine

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 120) for _ in range(rng.randrange(2, 14))] for _ in range(8)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    opts = dict(model=mixtral, max_num_seqs=3, prefill_chunk=4, max_num_batched_tokens=8)
    one = LLMEngine(EngineConfig.from_flat(**opts))
    try:
        alone = _run(one, prompts, params, stagger=False)
    finally:
        one.close()
    engine = LLMEngine(EngineConfig.from_flat(**opts, ep=2, allreduce="gloo", threads_per_rank=1))
    try:
        got = _run(engine, prompts, params, stagger=True, abort="r1")
        assert got.pop("r1")[1] == "abort" and got == {k: v for k, v in alone.items() if k != "r1"}
        ranks = _our_ranks()
        assert len(ranks) == 2 and _our_temp_dirs()
        os.kill(engine.model.group.pids()[1], signal.SIGKILL)
        deadline = time.monotonic() + 5  # (psutil.wait_procs would reap them: Popen then reads exit code 0)
        while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in ranks), "the surviving rank outlived the failed group"
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0), request_id="a")
        t, outs = time.monotonic(), []
        while engine.has_unfinished() and time.monotonic() - t < 10:
            outs += [o for o in engine.step() if o.finished]
        assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "error")]
        assert "rank 1" in outs[0].error and "exited with code -9" in outs[0].error, outs[0].error
        assert _our_temp_dirs() == []  # the failed step closed the group: its sockets' dir is gone
    finally:
        engine.close()
        engine.close()
    assert _our_ranks() == [] and _our_temp_dirs() == []


def test_launcher_world_size_other_than_the_layout_is_named():
    # torchrun --nproc-per-node 3 for a tp=2 layout: ranks 0 and 1 formed the group and served, rank 2 waited
    # for a spec nobody sends (600 s), then torchrun stopped every rank in the middle of serving
    port = free_tcp_port_run(3)
    ranks, group = _external_ranks(2, port, world_env=3), None
    try:
        with pytest.raises(WorkerFailure, match=r"failed while starting(.|\n)*the launcher started WORLD_SIZE=3 ranks; "
                                                r"parallel.tp=2, parallel.ep=1 need max\(tp, ep\)=2"):
            group = WorkerGroup(_spec(2, 1), world_size=2, startup_timeout_s=20, external=f"tcp://127.0.0.1:{port}")
    finally:
        if group is not None:
            group.shutdown()
        for p in ranks:
            try:
                p.wait(timeout=10)  # each exits on its own error
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


_FRONTEND = """
import sys, time
from moe_serve.distributed.launcher import WorkerGroup
from tests.distributed.test_rank_failures import _spec
group = WorkerGroup(_spec(1, 2), world_size=2, startup_timeout_s=30, external=sys.argv[1])
print("ready", flush=True)
time.sleep(60)
"""


def test_torchrun_ranks_exit_when_their_frontend_is_killed():
    # ranks from torchrun are not the frontend's children (no die-with-parent signal): a frontend killed with
    # SIGKILL (OOM killer, kill -9) never sends Shutdown, and they served nobody forever
    port = free_tcp_port_run(3)
    ranks = _external_ranks(2, port)
    front = subprocess.Popen([sys.executable, "-c", _FRONTEND, f"tcp://127.0.0.1:{port}"], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert front.stdout.readline().strip() == "ready"
        front.kill()
        front.wait()
        t = time.monotonic()
        for p in ranks:
            p.wait(timeout=10)
        assert [p.returncode for p in ranks] == [1, 1] and time.monotonic() - t < 10
    finally:
        for p in [front, *ranks]:
            if p.poll() is None:
                p.kill()
            p.wait()
