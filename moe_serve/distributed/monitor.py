"""The monitor half of a worker group: route the ranks' messages, and turn a dead process, a silent rank
or a WorkerError into `WorkerFailure`, which every waiting caller receives at once.

`RankMonitor` is a mixin of `launcher.WorkerGroup` (it uses the group's up socket, processes, ready
ranks, outputs queue and command answers); its thread starts once every rank is ready and ends at shutdown.
"""
from __future__ import annotations

import time

from moe_serve.distributed import messages as m


class WorkerFailure(RuntimeError):
    """A rank died, went silent, or reported an error: requests in flight fail with this."""


_FAILED = object()  # queue sentinel: wake the waiters


class RankMonitor:
    def _fail(self, text: str) -> None:
        if self.error is None:
            self.error = WorkerFailure(text)
        self.outputs.put(_FAILED)
        with self._answered:  # a command's issuer waits too
            self._answered.notify_all()

    def _root_cause(self, msg: m.WorkerError, wait_s: float = 1.0) -> str:
        """A collective fails on every rank when one rank dies: name the dead rank first, if any. A rank this
        process started is seen dead by its exit code, unless it reported an error of its own (then it died of
        that, a consequence, e.g. of `msg`'s rank failing); one started elsewhere (torchrun) by its silence:
        after a few heartbeat intervals, a rank that sent nothing since the failure is the one that died."""
        start, reported = time.monotonic(), {msg.rank}
        window = max(wait_s, 3 * self.heartbeat_s)
        last = msg.error.strip().splitlines()[-1][:300]
        while time.monotonic() - start < window and not self._stop.is_set():  # shut down: no verdict needed
            if self.up.poll(50):  # read what is queued before judging: a dead rank's own report may be there
                got = self._recv()
                if isinstance(got, (m.Heartbeat, m.StepOutput)):
                    self.last_seen[got.rank] = time.monotonic()
                elif isinstance(got, m.WorkerError):
                    reported.add(got.rank)
                continue
            dead = [(r, p) for r, p in enumerate(self.procs) if p.poll() is not None and r not in reported]
            if dead:
                r, p = dead[0]
                return (f"rank {r} (pid {p.pid}) exited with code {p.returncode}; "
                        f"rank {msg.rank} then failed at step {msg.step}: {last}")
            if not self.procs and time.monotonic() - start > 3 * self.heartbeat_s:
                silent = [r for r in range(self.world_size) if r not in reported and self.last_seen[r] < start]
                if silent:
                    return (f"rank {silent[0]} sent no heartbeat since rank {msg.rank} failed at step {msg.step} "
                            f"(it died or hangs): {last}")
        return f"rank {msg.rank} failed at step {msg.step}:\n{msg.error}"

    def _watch(self) -> None:
        """The monitor thread: it alone uses the up socket once the ranks are ready, so it closes it when it ends
        (shutdown, which used to close it after a join that could time out, left it closed under a poll)."""
        try:
            self._watch_until_stopped()
        except Exception as exc:  # a dead monitor hears no rank: every step would wait out step_timeout_s
            self._fail(f"the frontend's rank monitor failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            with self._handoff:  # teardown.py: whoever closes the last side ends the context
                self._close_side([self.up])

    def _watch_until_stopped(self) -> None:
        self.last_seen = [time.monotonic()] * self.world_size
        stopped, tick = False, time.monotonic()
        while not self._stop.is_set():  # (checked again here: shutdown() may have set it during the poll)
            if self.error is not None and not stopped and not self._stop.is_set():
                # the group is failed for good (every later call raises its error): the ranks still alive would
                # otherwise sit idle, holding their shard's memory and a core, until the next request or close()
                for p in self.procs:
                    if p.poll() is None:
                        p.terminate()
                stopped = True
            if self.up.poll(100):
                msg = self._recv()
                now = time.monotonic()
                if isinstance(msg, m.StepOutput):
                    self.last_seen[msg.rank] = now
                    self.outputs.put(msg)
                elif isinstance(msg, m.Heartbeat):
                    self.last_seen[msg.rank] = now
                elif isinstance(msg, m.CommandDone):
                    self.last_seen[msg.rank] = now
                    with self._answered:  # kept only for a command someone waits on (launcher.command)
                        if msg.command_id in self._answers:
                            self._answers[msg.command_id].append(msg)
                            self._answered.notify_all()
                elif isinstance(msg, m.WorkerError):
                    self._fail(self._root_cause(msg))
            if (gap := time.monotonic() - tick) > 1.0:  # a loop takes 0.1 s: the frontend itself was stopped
                # (Ctrl-Z then fg stops every process of the job; a frozen container): no rank could be heard
                self.last_seen = [t + gap for t in self.last_seen]
            tick = time.monotonic()
            if self.error is not None:
                continue
            for r in range(self.world_size):  # every rank: one torchrun started has no process here to poll
                p = self.procs[r] if r < len(self.procs) else None
                if p is not None and p.poll() is not None:
                    self._fail(f"rank {r} (pid {p.pid}) exited with code {p.returncode}")
                    break
                silent = time.monotonic() - self.last_seen[r]
                if silent > self.heartbeat_timeout_s:
                    ready = self.ready[r]
                    who = f"rank {r} (pid {ready.pid})" if p is not None else f"rank {r} ({ready.host} pid {ready.pid})"
                    self._fail(f"{who} sent no heartbeat for {silent:.1f} s "
                               f"(parallel.heartbeat_timeout_s={self.heartbeat_timeout_s:g})")
                    break
