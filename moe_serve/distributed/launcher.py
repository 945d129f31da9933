"""The frontend's side of a worker group: start the ranks, wait for them, watch them, stop them.

`WorkerGroup` starts W rank processes on this machine (no extra command for the user), waits
for every rank's Ready with a timeout (the error names the ranks that did not come up and why),
then a monitor thread owns the up socket (monitor.py): it routes StepOutputs to a queue, records
heartbeats, and turns a dead process, a silent rank or a WorkerError into `WorkerFailure`, which
every waiting caller receives at once. Nothing waits without a timeout.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import replace

import msgspec
import zmq

from moe_serve.distributed import messages as m
from moe_serve.distributed.endpoints import ControlEndpoints, bind_sockets
from moe_serve.distributed.monitor import _FAILED, RankMonitor, WorkerFailure
from moe_serve.distributed.signing import KEY_ENV, Signer, key_from_env, new_key, over_tcp
from moe_serve.distributed.sizes import rank_device
from moe_serve.distributed.spawner import Spawner
from moe_serve.distributed.teardown import GroupTeardown
from moe_serve.distributed.worker import SPEC_ENV, WorkerSpec


log = logging.getLogger(__name__)
__all__ = ["STARTUP_GRACE_S", "WorkerFailure", "WorkerGroup"]  # WorkerFailure lives in monitor.py

# Seconds ranks that have not all come up get to exit on their own (then SIGTERM): one still loading or in the
# rendezvous never reads the Shutdown, so a longer grace only delays the error (or the close) that stops them.
STARTUP_GRACE_S = 0.5


class WorkerGroup(RankMonitor, GroupTeardown):  # the monitor thread's half: monitor.py; shutdown: teardown.py
    def __init__(self, base: WorkerSpec, world_size: int, startup_timeout_s: float = 120.0,
                 heartbeat_timeout_s: float = 10.0, transport: str = "ipc", faults: dict[int, str] | None = None,
                 extra_env: dict[str, str] | None = None, external: str | None = None,
                 cancel: threading.Event | None = None):
        """external: tcp://host:port to bind for ranks started elsewhere (torchrun); None: start them here.
        cancel: set by another thread (the frontend closed while its ranks start): stop them and raise."""
        self._cancel = cancel
        self.world_size, self.heartbeat_timeout_s = world_size, heartbeat_timeout_s
        self.heartbeat_s = base.heartbeat_s
        # on tcp every control frame is signed with a key only this group and its ranks hold (signing.py): anything
        # else on the machine may connect to a tcp port. Ranks started here get a fresh key; torchrun's, the one it
        # was given. ipc frames (a directory only this user opens) are not signed
        key = new_key() if external is None else key_from_env()
        if key is None:
            raise ValueError(f"parallel.worker_endpoint: set {KEY_ENV} (hex, e.g. from secrets.token_hex(32)) for the "
                             "frontend and for the ranks torchrun starts: control frames are signed with it")
        Signer(key)  # the key's length check, before any socket exists
        if external is not None:
            host, port = external.removeprefix("tcp://").rsplit(":", 1)
            self.endpoints = ControlEndpoints(up=f"tcp://{host}:{port}",
                                              down=[f"tcp://{host}:{int(port) + 1 + r}" for r in range(world_size)],
                                              store="env://")
        else:
            self.endpoints = ControlEndpoints.create(world_size, transport)
        self.ctx = zmq.Context()
        self.signer = Signer(key, signs=over_tcp(self.endpoints.up))
        self.up, self.down = bind_sockets(self.ctx, self.endpoints, external is not None, key)
        up_addr = self.up.getsockopt_string(zmq.LAST_ENDPOINT)
        self.outputs: queue.Queue = queue.Queue()
        self.error: WorkerFailure | None = None
        self.last_seen = [time.monotonic()] * world_size
        self.procs: list[subprocess.Popen] = []
        self._spawner = Spawner() if external is None else None  # PDEATHSIG follows the forking thread
        self.ready: dict[int, m.Ready] = {}
        self.phase: dict[int, str] = {}  # startup phase each rank last reported in a heartbeat
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._answers: dict[int, list[m.CommandDone]] = {}  # command id -> the ranks' answers so far (command())
        self._answered = threading.Condition()
        self._command_ids = itertools.count(1)
        self._broadcasting = threading.Lock()  # see broadcast
        self._init_teardown()
        faults = faults or {}
        deadline = time.monotonic() + startup_timeout_s
        try:
            for r in range(world_size):
                spec = replace(base, rank=r, device=rank_device(base.device, r), up=up_addr,
                               down=self.down[r].getsockopt_string(zmq.LAST_ENDPOINT),
                               dist_init=self.endpoints.store, fault=faults.get(r, ""))
                if external is not None:  # the rank exists already: it waits for its spec on down[r]
                    self._send(r, self.signer.sign(m.encode(m.Configure(spec.to_json()))), deadline,
                               f"did not connect to parallel.worker_endpoint={external} (it pulls its spec from "
                               f"{spec.down}) within parallel.startup_timeout_s={startup_timeout_s:g} s")
                    continue
                env = dict(os.environ, **(extra_env or {}), **{SPEC_ENV: spec.to_json(), KEY_ENV: key.hex(),
                                                               "OMP_NUM_THREADS": str(spec.threads)})
                self.procs.append(self._spawner.popen([sys.executable, "-m", "moe_serve.distributed.worker"], env=env))
            self._wait_ready(startup_timeout_s)
        except BaseException:
            self.shutdown(grace_s=STARTUP_GRACE_S)
            raise
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="moe-serve-monitor")
        self._monitor.start()

    # ---- startup ------------------------------------------------------------------------------
    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.ready) < self.world_size:
            if self._cancel is not None and self._cancel.is_set():
                missing = [r for r in range(self.world_size) if r not in self.ready]
                raise WorkerFailure(f"closed while rank(s) {missing} were still starting")
            for r, p in enumerate(self.procs):
                if p.poll() is not None and r not in self.ready:
                    raise WorkerFailure(f"rank {r} (pid {p.pid}) exited with code {p.returncode} before it was ready"
                                        + self._drain_errors())
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(self.world_size) if r not in self.ready]
                why = {"starting": "stuck before joining the process group",
                       "rendezvous": "waiting in the rendezvous for the other ranks",
                       "loading": "still loading its shard"}
                state = [f"rank {r}: " + (why.get(self.phase[r], self.phase[r]) if r in self.phase
                                          else "process alive, never sent a heartbeat") for r in missing]
                raise WorkerFailure(
                    f"rank(s) {missing} did not come up within parallel.startup_timeout_s={timeout_s:g} s "
                    f"({'; '.join(state)})" + self._drain_errors())
            if self.up.poll(int(min(left, 0.2) * 1000)):
                msg = self._recv()
                if isinstance(msg, m.Ready):
                    self.ready[msg.rank] = msg
                elif isinstance(msg, m.Heartbeat):
                    self.phase[msg.rank] = msg.phase
                elif isinstance(msg, m.WorkerError):
                    raise WorkerFailure(f"rank {msg.rank} failed while starting:\n{msg.error}")

    def _recv(self):
        """The next frame from the ranks, decoded; None for one that is no rank's message: one not signed with this
        group's key (a stranger on a tcp port: its StepOutput was taken for a rank's, its WorkerError failed every
        request), dropped before it is decoded; or a signed one that does not decode (another version's rank),
        whose DecodeError used to end the monitor thread (each forward then waited out parallel.step_timeout_s)."""
        frame = self.up.recv()
        payload = self.signer.verify(frame)
        if payload is None:
            log.warning("control: dropped a %d-byte frame whose signature does not verify (not from a rank of this "
                        "engine); not executed", len(frame))
            return None
        try:
            msg = m.decode_from_worker(payload)
        except msgspec.DecodeError as exc:  # ValidationError too (a subclass)
            log.warning("control: dropped a %d-byte frame that is no rank's message (%s)", len(frame), exc)
            return None
        if not 0 <= msg.rank < self.world_size:  # it indexed the per-rank tables: an IndexError ended the monitor
            log.warning("control: dropped a %s from rank %d, no rank of this group of %d", type(msg).__name__,
                        msg.rank, self.world_size)
            return None
        return msg

    def _drain_errors(self) -> str:
        text = ""
        while self.up.poll(0):
            msg = self._recv()
            if isinstance(msg, m.WorkerError):
                text += f"\nrank {msg.rank} reported:\n{msg.error}"
        return text

    # ---- use ----------------------------------------------------------------------------------
    def broadcast(self, msg) -> None:
        """Send one message to every rank (encoded once)."""
        if self.error is not None:
            raise self.error
        frame = self.signer.sign(m.encode(msg))
        # one broadcast at a time, all its sends together: a command from a user thread (switch_placement)
        # interleaved with the step thread's step plan reached the ranks in different orders, so one rank switched
        # plans before a step that another ran on the old one (and ZeroMQ sockets are not thread-safe)
        self._broadcasting.acquire()
        try:
            deadline = time.monotonic() + self.heartbeat_timeout_s
            for r in range(len(self.down)):
                self._send(r, frame, deadline, f"has taken no message for parallel.heartbeat_timeout_s="
                                               f"{self.heartbeat_timeout_s:g} s")
        finally:
            self._release_broadcast()  # teardown.py: a shutdown may have left the sockets to this thread

    def abort(self, reason: str) -> None:
        """Fail the group now, from any thread: a step or command waiting on the ranks raises WorkerFailure(reason)
        at once, and the monitor stops the ranks (the caller's thread closes the group, which kills what is left)."""
        self._fail(reason)

    def command(self, msg, timeout_s: float) -> list[m.CommandDone]:
        """Send a command (PlacementCommand, CacheCommand) to every rank and wait until each has answered (their
        answers, by rank); a ValueError with the rank's reason (it names the field) when they refused it, and
        serve on as before.
        Ranks disagreeing would leave them running different plans: the group is failed (WorkerFailure)."""
        cid = next(self._command_ids)
        with self._answered:
            self._answers[cid] = []
        try:
            self.broadcast(msgspec.structs.replace(msg, command_id=cid))
            deadline = time.monotonic() + timeout_s
            with self._answered:
                while len(got := self._answers[cid]) < self.world_size:
                    if self.error is not None:
                        raise self.error
                    if time.monotonic() >= deadline:
                        self._fail(f"{type(msg).__name__}: {len(got)} of {self.world_size} ranks answered within "
                                   f"parallel.step_timeout_s={timeout_s:g} s")
                        raise self.error
                    self._answered.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        finally:
            with self._answered:
                self._answers.pop(cid, None)
        refused = sorted((a.rank, a.error) for a in got if a.error)
        if refused and len(refused) < self.world_size:
            self._fail(f"{type(msg).__name__}: rank(s) {[r for r, _ in refused]} refused it and the others took it: "
                       f"{refused[0][1]}")
            raise self.error
        if refused:
            raise ValueError(f"{refused[0][1]} (refused by ranks {[r for r, _ in refused]}; they serve on as before)")
        return sorted(got, key=lambda a: a.rank)

    def _send(self, r: int, frame: bytes, deadline: float, late: str) -> None:
        """Send `frame` to rank r, or raise WorkerFailure naming it. A PUSH socket whose only peer is gone (a
        rank killed a moment ago, before the monitor saw it; a torchrun rank that never started) blocks in
        send(): so never block, and between tries look for the rank's death, the monitor's verdict, the deadline."""
        while True:
            if self.error is not None:  # failed or shut down meanwhile (teardown.py): never send on
                raise self.error
            try:
                self.down[r].send(frame, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass
            if self.error is not None:
                raise self.error
            if self._cancel is not None and self._cancel.is_set():
                raise WorkerFailure(f"closed while rank {r} was not taking messages")
            p = self.procs[r] if r < len(self.procs) else None
            if p is not None and p.poll() is not None:
                self._fail(f"rank {r} (pid {p.pid}) exited with code {p.returncode}")
                raise self.error
            if time.monotonic() >= deadline:
                self._fail(f"rank {r} {late}")
                raise self.error
            self.down[r].poll(50, zmq.POLLOUT)

    def collect(self, step: int, count: int, timeout_s: float) -> list[m.StepOutput]:
        """The StepOutputs of `step` from `count` ranks; WorkerFailure when a rank fails or time runs out."""
        got: list[m.StepOutput] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < count:
            if self.error is not None:
                raise self.error
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"step {step} got {len(got)} of {count} outputs within "
                           f"parallel.step_timeout_s={timeout_s:g} s")
                raise self.error
            try:
                item = self.outputs.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if item is _FAILED:
                raise self.error
            if item.step == step:
                got.append(item)
        return got

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]
