"""Copy engines: move one expert's weights from the host tier into a device slot, asynchronously.

`make_copier(device)` picks by the device the store computes on, at construction (never at import):

- `StreamCopier` (CUDA): copies run on a side stream, ordered after the compute stream has released
  the slot (an event recorded when the layer that last read it ended), and each copy records an
  event; `wait` makes the compute stream wait on it, so nothing blocks the host.
- `ThreadCopier` (CPU, or any device without streams): one worker thread does the copies in
  submission order (one FIFO, like one copy engine), so prefetches overlap the model's compute;
  `wait` blocks until that copy is done.

Both copy into preallocated slot buffers (`dst.copy_(src)`), never allocate on the hot path.
"""
from __future__ import annotations

import threading
from collections import deque

import torch


class ThreadCopier:
    def __init__(self):
        self._cv = threading.Condition()
        self._queue: deque = deque()
        self._done = 0  # copies finished (tickets are handed out in order)
        self._issued = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="expert-copier", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                pairs = self._queue[0]
            try:
                with torch.no_grad():
                    for dst, src in pairs:
                        dst.copy_(src)
            except BaseException as exc:  # surfaced to the waiter, never lost
                self._error = exc
            with self._cv:
                self._queue.popleft()
                self._done += 1
                self._cv.notify_all()

    def submit(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], slot: int) -> int:
        """Queue copies (dst, src); returns a ticket to `wait` on."""
        with self._cv:
            if self._closed:
                raise RuntimeError("expert copier is closed")
            self._queue.append(pairs)
            self._issued += 1
            self._cv.notify_all()
            return self._issued

    def ready(self, ticket: int, slot: int) -> bool:
        return self._done >= ticket

    def wait(self, ticket: int, slot: int) -> None:
        with self._cv:
            while self._done < ticket:
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

    def submit(self, pairs, slot: int) -> int:
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
    return StreamCopier(device, num_slots) if device.type == "cuda" else ThreadCopier()
