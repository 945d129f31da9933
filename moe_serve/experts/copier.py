"""Copy engines: move one expert's weights from the host tier into a device slot, asynchronously.

`make_copier(device)` picks by the device the store computes on, at construction (never at import):

- `StreamCopier` (CUDA): copies run on a side stream, ordered after the compute stream has released
  the slot (an event recorded when the layer that last read it ended), and each copy records an
  event; `wait` makes the compute stream wait on it, so nothing blocks the host. Demand copies are
  issued at once, prefetches from a host queue by need clock, at most `depth` ahead (the same
  `CopyQueue` as on CPU), so a demand copy never queues behind every prefetch.
- `ThreadCopier` (CPU, or any device without streams): one worker thread runs copies one at a time,
  demand copies first, then prefetches by the clock they are needed at (the replay's
  `copy_order="demand-first"`); a copy the worker has not started when someone waits for it runs
  in the waiting thread instead (no hand-off latency on the critical path).

Both copy into preallocated slot buffers (`dst.copy_(src)`), never allocate on the hot path, and
report a failed copy the same way (`FailedCopies`, in `copy_failures.py`): a `CopyError` naming the
slot, raised by the next `wait`, never by the call that started the copy.
"""
from __future__ import annotations

import threading

import torch

from moe_serve.experts.copy_failures import CopyError  # noqa: F401 (re-exported)
from moe_serve.experts.copy_failures import FailedCopies, cancelled, copy_pairs
from moe_serve.experts.copy_queue import CopyQueue


_IDLE = (0, None, None)  # a slot's entry in ThreadCopier._running when nothing is copied into it


class ThreadCopier:
    """One worker thread, one copy at a time: demand copies first (in submission order), then
    prefetches by the clock they are needed at (`need`). `wait` on a copy the worker has not
    started runs it in the waiting thread: no wake-up and GIL hand-back on the critical path, and
    the weights are in this core's cache for the forward that follows. (Measured on the 2-core
    CPU: a copy in one thread and an expert forward in another both run at about half speed, the
    memory bus is shared, so the worker overlaps a copy with the Python and attention work around
    the experts more than with the experts themselves.) With `worker_demand=False` the worker runs
    prefetches only and every demand copy waits for its waiter.

    A queued copy can be cancelled (its expert was evicted) or a queued prefetch promoted to demand
    (its expert is needed before the copy started); a copy into a slot never starts while an
    earlier copy into that slot is still running."""

    def __init__(self, num_slots: int, worker_demand: bool = True):
        self.worker_demand = worker_demand  # the worker also runs demand copies (first) unless a waiter took them
        self._cv = threading.Condition()
        self._q = CopyQueue()  # not started yet (under _cv)
        self._slot_done = [0] * num_slots  # last ticket finished per slot (a slot's copies finish in order)
        # slot -> (ticket, thread id, pairs) being copied: by the worker (thread id None) or by a waiting thread
        self._running: dict[int, tuple] = {}
        self._issued = 0
        self._failed = FailedCopies(self._cv)
        self._closed = False
        self.wakeups = 0  # times the idle worker was woken (a submit, promote, finished copy or close; no timeout)
        self._thread = threading.Thread(target=self._loop, name="expert-copier", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    job = self._q.pop(self._running)
                    if job is not None:
                        slot, ticket, pairs = job
                        self._running[slot] = (ticket, None, pairs)
                        break
                    if self._closed:
                        return
                    self._cv.wait()  # no timeout: an idle worker sleeps until submit, promote or close
                    self.wakeups += 1
            err = copy_pairs(pairs, BaseException)  # a dying worker would leave its waiters hanging
            with self._cv:
                self._finished(slot, ticket, err)

    def _finished(self, slot: int, ticket: int, err: BaseException | None) -> None:  # under _cv
        if err is not None:  # before the waiters wake
            self._failed.add(slot, ticket, err)
        self._slot_done[slot] = ticket
        self._q.resume(slot)  # a copy into the slot that had to wait for this one
        del self._running[slot]  # last: until here a waiter interrupted midway still finds its claim (_drop_claim)
        self._cv.notify_all()

    def submit(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], slot: int, need: int | None = None) -> int:
        """Queue copies (dst, src) into `slot`: a demand copy (`need` None: runs when waited for) or
        a prefetch needed at clock `need` (the worker's). Returns a ticket to `wait` on. A new copy
        into a slot supersedes one queued there."""
        with self._cv:
            if self._closed:
                raise RuntimeError("expert copier is closed")
            self._issued += 1
            self._q.push(self._issued, slot, pairs, need, need is not None or self.worker_demand)
            self._cv.notify()
            return self._issued

    def cancel(self, ticket: int, slot: int) -> bool:
        """Drop a copy that has not started (True), e.g. its expert was evicted before it ran."""
        with self._cv:
            return self._q.take(ticket, slot) is not None

    def promote(self, ticket: int, slot: int) -> bool:
        """A queued prefetch is needed now: it becomes a demand copy. False if it already started
        (or is not a queued prefetch)."""
        with self._cv:
            if not self._q.promote(ticket, slot, self.worker_demand):
                return False
            self._cv.notify()
            return True

    def queued_prefetches(self) -> int:
        with self._cv:  # the worker pops from the queue meanwhile
            return self._q.prefetches()

    def busy(self) -> bool:
        """A copy is running or waiting to run."""
        with self._cv:
            return bool(self._running or self._q.queued)

    def ready(self, ticket: int, slot: int) -> bool:
        return self._slot_done[slot] >= ticket

    def wait(self, ticket: int, slot: int) -> None:
        """Return once copy `ticket` into `slot` has landed: run it here if it has not started.

        Ctrl-C (KeyboardInterrupt; LLM.generate aborts and serves on) may surface at any instruction:
        a copy run here is claimed by one store into `_running` holding its pairs (peeked, then taken
        off the queue), so the handler always finds the claim (by thread id) and puts the copy back
        (`_drop_claim`); one a second Ctrl-C leaves in the handler, this thread's next wait drops."""
        me = threading.get_ident()
        try:
            with self._cv:
                if self._running.get(slot, _IDLE)[1] == me:  # abandoned by an interrupted handler: not running
                    self._drop_claim(slot)
                while self._slot_done[slot] < ticket:
                    if self._q.has(ticket, slot):
                        if slot not in self._running:  # ours to run now: claimed, then taken off the queue
                            self._running[slot] = (ticket, me, self._q.peek(ticket, slot))
                            self._q.take(ticket, slot)
                            break
                    elif self._running.get(slot, _IDLE)[0] != ticket:
                        raise cancelled(ticket, slot)
                    self._cv.wait()  # running in the worker, or an earlier copy into the slot still is
                claim = self._running.get(slot, _IDLE)
            if claim[:2] == (ticket, me):
                err = copy_pairs(claim[2])
                with self._cv:
                    self._finished(slot, ticket, err)
        except BaseException:
            with self._cv:
                if self._running.get(slot, _IDLE)[1] == me:
                    self._drop_claim(slot)
            raise
        self._failed.report(ticket, slot)

    def _drop_claim(self, slot: int) -> None:  # under _cv
        """This thread's copy into `slot` was interrupted somewhere between its claim and its end
        (Ctrl-C): put the copy back. Landed: only the claim goes. Not landed: queued again as a
        demand copy if it is not still queued (the slot may hold part of the weights, so it is not
        marked done); unless a newer copy into the slot is queued, which overwrites the slot before
        anyone reads it. Each step leaves a state this accepts again, so it may be interrupted too."""
        ticket, _, pairs = self._running[slot]
        if self._slot_done[slot] < ticket and not self._q.has(ticket, slot):
            if slot in self._q.queued:
                self._slot_done[slot] = ticket
            else:
                self._q.push(ticket, slot, pairs, None, self.worker_demand)
        self._q.resume(slot)
        del self._running[slot]
        self._cv.notify_all()

    def release(self, slots) -> None:
        """The compute that read `slots` is done (CPU compute is synchronous: nothing to record)."""

    def close(self) -> None:
        """Stop the worker after the copy it is running and join it. Copies not started are dropped:
        nobody will read them (a store closes at shutdown), and running every queued prefetch kept
        shutdown waiting on a slow host tier (past the join's timeout, the thread leaked); a waiter
        of a dropped copy gets `cancelled`. Idempotent; safe from a finalizer, even one the garbage
        collector happens to run in the worker itself."""
        with self._cv:
            self._closed = True
            self._q = CopyQueue()
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)


class StreamCopier:
    """CUDA: copies run on one side stream. Demand copies are issued at once; prefetches wait in a
    host-side `CopyQueue` (by need clock) and are issued at most `depth` ahead of their completion,
    so a demand copy queues on the stream behind at most `depth` prefetches, and a prefetch still on
    the host can be cancelled or promoted (issued at once) like on CPU. Each copy waits (on the side
    stream) for the compute that last read its slot (`release`), and records an event that `wait`
    makes the compute stream wait on: the host never blocks."""

    def __init__(self, device: torch.device, num_slots: int, depth: int = 2):
        self.device, self.depth = torch.device(device), depth
        # torch.cuda on a GPU; on a CPU, torch.cpu's stand-ins for device-agnostic code (copies run at
        # once, events are always done): the same host-side logic then runs, and is tested, without a GPU
        self._rt = torch.get_device_module(self.device)
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else self._rt.Stream()
        self._released: list = [None] * num_slots  # per slot: event at the end of its last reader, or None
        self._landed: list = [None] * num_slots  # per slot: event after the latest copy issued into it
        self._in_flight: list = []  # events of issued prefetches not known to be done
        self._last = None  # event of the copy issued last
        self._issued_to = [0] * num_slots  # per slot: ticket of the latest copy issued into it
        self._q = CopyQueue()  # prefetches not issued yet
        self._issued = 0
        self._failed = FailedCopies()

    def _issue(self, pairs, slot: int, ticket: int):
        """Put copy `ticket` on the side stream. One that fails to issue is kept for the next `wait`
        (as a worker's failure on CPU); the event still marks whatever of it did reach the stream."""
        with self._rt.stream(self.stream):
            if self._released[slot] is not None:
                self.stream.wait_event(self._released[slot])  # never overwrite weights still being read
            err = copy_pairs(pairs, non_blocking=True)
            ev = self._rt.Event()
            ev.record(self.stream)
        self._landed[slot] = self._last = ev
        self._issued_to[slot] = max(self._issued_to[slot], ticket)
        if err is not None:
            self._failed.add(slot, ticket, err)
        return ev

    def _pump(self) -> None:
        """Issue queued prefetches, nearest need first, while fewer than `depth` are unfinished."""
        self._in_flight = [ev for ev in self._in_flight if not ev.query()]
        while len(self._in_flight) < self.depth:
            job = self._q.pop()
            if job is None:
                return
            slot, ticket, pairs = job
            self._in_flight.append(self._issue(pairs, slot, ticket))

    def submit(self, pairs, slot: int, need: int | None = None) -> int:
        """A demand copy (`need` None) goes on the stream now; a prefetch joins the host queue."""
        self._issued += 1
        if need is None:
            self._q.drop(slot)  # a queued prefetch into the slot is superseded
            self._issue(pairs, slot, self._issued)
        else:
            self._q.push(self._issued, slot, pairs, need)
        self._pump()
        return self._issued

    def cancel(self, ticket: int, slot: int) -> bool:
        return self._q.take(ticket, slot) is not None  # False: already on the stream

    def promote(self, ticket: int, slot: int) -> bool:
        pairs = self._q.take(ticket, slot)
        if pairs is None:
            return False
        self._issue(pairs, slot, ticket)
        return True

    def queued_prefetches(self) -> int:
        return self._q.prefetches()

    def busy(self) -> bool:
        """A copy is on the stream and not landed, or waits on the host (the stream runs in order:
        the last copy issued lands last)."""
        return bool(self._q.queued) or (self._last is not None and not self._last.query())

    def ready(self, ticket: int, slot: int) -> bool:
        if self._q.has(ticket, slot):
            return False
        ev = self._landed[slot]
        return ev is None or ev.query()

    def wait(self, ticket: int, slot: int) -> None:
        pairs = self._q.take(ticket, slot)
        if pairs is not None:  # still on the host: needed now
            self._issue(pairs, slot, ticket)
        elif self._issued_to[slot] < ticket:  # neither queued nor issued (a later copy supersedes: fine)
            raise cancelled(ticket, slot)
        ev = self._landed[slot]
        if ev is not None:  # the compute stream waits; the host does not
            self._rt.current_stream(self.device).wait_event(ev)
        self._failed.report(ticket, slot)

    def release(self, slots) -> None:
        ev = self._rt.Event()
        ev.record(self._rt.current_stream(self.device))
        for s in slots:
            self._released[s] = ev
        self._pump()

    def close(self) -> None:  # every issued copy has landed (as stream.synchronize(), which torch.cpu lacks)
        self._q = CopyQueue()  # prefetches never issued: nobody will read them (as ThreadCopier.close)
        ev = self._rt.Event()
        ev.record(self.stream)
        ev.synchronize()


def make_copier(device: torch.device, num_slots: int, **options):
    return StreamCopier(device, num_slots) if device.type == "cuda" else ThreadCopier(num_slots, **options)
