"""Stopping a worker group while another thread may be sending to its ranks.

`GroupTeardown` is a mixin of `launcher.WorkerGroup`. ZeroMQ sockets are not thread-safe, and a broadcast (the
step thread's plan, a user thread's command) holds the group's broadcast lock across its sends to the ranks'
down sockets. `shutdown` used to send its Shutdown frames on those sockets, then close them, without the lock,
so that a send stuck on a dead rank could never hold it up: two threads then used one socket at once, and the
broadcaster, resumed, sent on a closed socket (zmq.ZMQError 'not a socket', not the WorkerFailure the engine
handles) or, its frame sent after the monitor had stopped, waited parallel.step_timeout_s for outputs.

Now shutdown first fails the group (every broadcast, command and collect in flight raises WorkerFailure at its
next check, a broadcast within one 50 ms poll), then takes the lock for at most BROADCAST_WAIT_S. If it gets
it, it sends the Shutdowns and closes the sockets as before; if not (the holder is descheduled), it leaves the
down sockets alone and the holder closes them when it lets go of the lock. The ranks are stopped either way
(without a Shutdown, by SIGTERM after the grace): no hang comes back. The up socket is the monitor thread's: it
closes it itself when it stops (monitor.py), so no join timing out can leave it closed under the monitor's poll.
"""
from __future__ import annotations

import logging
import subprocess
import threading
import time

import zmq

from moe_serve.distributed import messages as m

log = logging.getLogger(__name__)

BROADCAST_WAIT_S = 1.0  # longest a shutdown waits for a broadcast in flight to give up the down sockets


class GroupTeardown:
    def _init_teardown(self) -> None:
        self._handoff = threading.Lock()  # between shutdown giving up on the lock and its holder letting go
        self._orphaned = False  # shutdown left the down sockets to the broadcast holding the lock
        self._open_sides = 2  # up (shutdown closes it) and down: whoever closes the last one ends the context

    def _release_broadcast(self) -> None:
        """Let go of the broadcast lock; close the down sockets first if shutdown left them to this thread."""
        with self._handoff:
            if self._orphaned:
                self._orphaned = False
                self._close_side(self.down)
            self._broadcasting.release()

    def _close_side(self, sockets) -> None:
        for s in sockets:
            s.close()
        self._open_sides -= 1
        if self._open_sides == 0:
            self.ctx.term()

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Ask every rank to stop, then terminate and kill what is left; remove the temp dir."""
        # the monitor first: a rank exiting on the Shutdown is no failure, whose handling would SIGTERM the others
        self._stop.set()
        self._fail("the worker group was shut down")  # a send, command or collect in another thread stops now
        owned = self._broadcasting.acquire(timeout=min(grace_s, BROADCAST_WAIT_S))
        if not owned:
            with self._handoff:  # the holder lets go inside _handoff: either it has, or it will see _orphaned
                owned = self._broadcasting.acquire(blocking=False)
                self._orphaned = not owned
        if owned:
            for s in self.down:
                try:
                    s.send(self.signer.sign(m.encode(m.Shutdown("frontend shutdown"))), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        else:
            log.warning("shutdown: a broadcast still holds the ranks' sockets after %.1f s; stopping the ranks "
                        "without a Shutdown (the broadcast closes the sockets when it returns)",
                        min(grace_s, BROADCAST_WAIT_S))
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=2)
        if getattr(self, "_spawner", None) is not None:  # the ranks are gone (a failed bind never made one)
            self._spawner.stop()
        monitor = self._monitor
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout=2)  # it sees _stop within a poll (0.1 s); a late one closes the up socket itself
        with self._handoff:
            if monitor is None:  # never started (a failed start-up): the up socket is this thread's
                self._close_side([self.up])
            if owned:
                self._close_side(self.down)
                self._broadcasting.release()  # later broadcasts raise the group's error before touching a socket
        self.endpoints.cleanup()
