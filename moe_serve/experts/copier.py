"""Copy engines: move one expert's weights from the host tier into a device slot, asynchronously.

`make_copier(device)` picks by the device the store computes on, at construction (never at import):

- `StreamCopier` (CUDA): copies run on a side stream, ordered after the compute stream has released
  the slot (an event recorded when the layer that last read it ended), and each copy records an
  event; `wait` makes the compute stream wait on it, so nothing blocks the host.
- `ThreadCopier` (CPU, or any device without streams): one worker thread does the copies one at a
  time (like one copy engine), demand copies first, then prefetches by the clock they are needed at
  (the replay's `copy_order="demand-first"`), so prefetches overlap the model's compute without
  delaying a demand fetch by more than the copy in flight; `wait` blocks until that copy is done.

Both copy into preallocated slot buffers (`dst.copy_(src)`), never allocate on the hot path.
"""
from __future__ import annotations

import heapq
import threading

import torch


class ThreadCopier:
    """One worker thread, one copy at a time, in priority order: demand copies first (in submission
    order), then prefetches by the clock they are needed at (`need`), so a demand fetch waits at
    most for the one copy already running. A queued copy can be cancelled (its expert was evicted)
    or promoted to demand (its expert is needed before the copy started)."""

    def __init__(self, num_slots: int):
        self._cv = threading.Condition()
        self._heap: list = []  # (key, seq, ticket, slot, pairs); key -1 = demand, else need clock
        self._queued: dict[int, tuple[int, int, bool]] = {}  # slot -> (ticket, seq, is prefetch) not started
        self._slot_done = [0] * num_slots  # last ticket finished per slot (a slot's copies finish in order)
        self._issued = self._seq = 0
        self._running: tuple[int, int] | None = None  # (slot, ticket) being copied
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="expert-copier", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    while not self._heap and not self._closed:
                        self._cv.wait()
                    if not self._heap:
                        return
                    _, seq, ticket, slot, pairs = heapq.heappop(self._heap)
                    if self._queued.get(slot, (0, -1))[1] == seq:  # else superseded, cancelled or promoted
                        del self._queued[slot]
                        self._running = (slot, ticket)
                        break
            try:
                with torch.no_grad():
                    for dst, src in pairs:
                        dst.copy_(src)
            except BaseException as exc:  # surfaced to the waiter, never lost
                self._error = exc
            with self._cv:
                self._slot_done[slot] = ticket
                self._running = None
                self._cv.notify_all()

    def _push(self, key: int, ticket: int, slot: int, pairs, prefetch: bool) -> None:
        self._seq += 1
        self._queued[slot] = (ticket, self._seq, prefetch)  # supersedes a queued copy into the slot
        heapq.heappush(self._heap, (key, self._seq, ticket, slot, pairs))
        self._cv.notify_all()

    def submit(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], slot: int, need: int | None = None) -> int:
        """Queue copies (dst, src) into `slot`: a demand copy (`need` None) or a prefetch needed at
        clock `need`. Returns a ticket to `wait` on."""
        with self._cv:
            if self._closed:
                raise RuntimeError("expert copier is closed")
            self._issued += 1
            self._push(-1 if need is None else need, self._issued, slot, pairs, need is not None)
            return self._issued

    def cancel(self, ticket: int, slot: int) -> bool:
        """Drop a copy that has not started (True), e.g. its expert was evicted before it ran."""
        with self._cv:
            if self._queued.get(slot, (0,))[0] != ticket:
                return False
            del self._queued[slot]
            return True

    def promote(self, ticket: int, slot: int) -> bool:
        """A queued prefetch is needed now: move it to the demand queue. False if it already started."""
        with self._cv:
            q = self._queued.get(slot)
            if q is None or q[0] != ticket or not q[2]:
                return False
            pairs = next(h[4] for h in self._heap if h[1] == q[1])
            self._push(-1, ticket, slot, pairs, False)
            return True

    def queued_prefetches(self) -> int:
        return sum(q[2] for q in self._queued.values())

    def ready(self, ticket: int, slot: int) -> bool:
        return self._slot_done[slot] >= ticket

    def wait(self, ticket: int, slot: int) -> None:
        with self._cv:
            while self._slot_done[slot] < ticket:
                if self._queued.get(slot, (0,))[0] != ticket and self._running != (slot, ticket):
                    raise RuntimeError(f"expert copy {ticket} into slot {slot} was cancelled: nothing to wait for")
                self._cv.wait()
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"expert copy failed: {err}") from err

    def release(self, slots) -> None:
        """The compute that read `slots` is done (CPU compute is synchronous: nothing to record)."""

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)


class StreamCopier:
    def __init__(self, device: torch.device, num_slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._released: list[torch.cuda.Event | None] = [None] * num_slots  # last reader's end, per slot
        self._landed: list[torch.cuda.Event | None] = [None] * num_slots  # latest copy into each slot
        self._issued = 0

    def submit(self, pairs, slot: int, need: int | None = None) -> int:
        """FIFO on the side stream (`need` is not used: no demand-first order on CUDA yet)."""
        with torch.cuda.stream(self.stream):
            if self._released[slot] is not None:
                self.stream.wait_event(self._released[slot])  # never overwrite weights still being read
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self._landed[slot] = ev
        self._issued += 1
        return self._issued

    def cancel(self, ticket: int, slot: int) -> bool:
        return False  # already on the stream

    def promote(self, ticket: int, slot: int) -> bool:
        return False

    def queued_prefetches(self) -> int:
        return 0

    def ready(self, ticket: int, slot: int) -> bool:
        ev = self._landed[slot]
        return ev is None or ev.query()

    def wait(self, ticket: int, slot: int) -> None:
        ev = self._landed[slot]
        if ev is not None:  # the compute stream waits; the host does not
            torch.cuda.current_stream(self.device).wait_event(ev)

    def release(self, slots) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        for s in slots:
            self._released[s] = ev

    def close(self) -> None:
        self.stream.synchronize()


def make_copier(device: torch.device, num_slots: int):
    return StreamCopier(device, num_slots) if device.type == "cuda" else ThreadCopier(num_slots)
