"""Start rank processes from a thread that lives as long as they should.

A rank asks Linux for SIGTERM when its parent dies (`PR_SET_PDEATHSIG`, worker.py), so that no orphan
keeps a port or a core. The kernel ties that to the *thread* that forked the rank, not the process:
a rank started from a short-lived thread (an `LLM` built in `asyncio.to_thread` or a thread pool) died
as soon as that thread returned. `Spawner` forks from its own thread, which ends only when the group
is shut down (or with the process).
"""
from __future__ import annotations

import queue
import subprocess
import threading
from concurrent.futures import Future


class Spawner:
    def __init__(self, name: str = "moe-serve-spawner"):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            args, kwargs, done = job
            try:
                done.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller of popen
                done.set_exception(exc)

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        """subprocess.Popen(*args, **kwargs), forked from the spawner's thread."""
        done: Future = Future()
        self._jobs.put((args, kwargs, done))
        return done.result()

    def stop(self) -> None:
        """End the thread: call once the ranks it started have exited (it would SIGTERM them)."""
        self._jobs.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
