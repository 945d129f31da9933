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
