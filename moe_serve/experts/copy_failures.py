"""How a failed expert copy is reported, the same way by both copiers (`copier.py`).

Split out of copier.py, which keeps the two copy engines: this file holds what they share around a
copy that goes wrong: `copy_pairs` runs one expert's copies and returns the error rather than raise
it, `FailedCopies` keeps each failure until the next `wait` raises it as a `CopyError` naming the
slot and the copy, and `cancelled` is what waiting on a copy that never started raises. The store
(offload.py, slot_copies.py) catches `CopyError` to forget the slot's expert.
"""
from __future__ import annotations

import threading

import torch


class CopyError(RuntimeError):
    """A copy into `slot` (ticket `ticket`) failed: the slot holds no valid weights."""

    def __init__(self, slot: int, ticket: int, exc: BaseException):
        super().__init__(f"expert copy failed (slot {slot}, copy {ticket}): {type(exc).__name__}: {exc}")
        self.slot, self.ticket = slot, ticket
        self.__cause__ = exc


class CheckedPairs(list):
    """One expert's copies [(dst, src)] and `check()`, run right before them by whichever thread
    runs the copy: with host=mmap the sources are views of the memory-mapped checkpoint, and the
    check (the file's size and mtime, see SafetensorsCheckpoint.check_unchanged) turns a file
    truncated while the copy waited in a queue into this copy's failure instead of a SIGBUS."""

    def __init__(self, pairs, check=None):
        super().__init__(pairs)
        self.check = check


def copy_pairs(pairs, catch=Exception, **copy_kw) -> BaseException | None:
    """Run one expert's copies (dst, src), after their check if any (`CheckedPairs`); the error
    instead of raising it (the caller decides who sees it)."""
    try:
        if getattr(pairs, "check", None) is not None:
            pairs.check()
        with torch.no_grad():
            for dst, src in pairs:
                dst.copy_(src, **copy_kw)
    except catch as exc:
        return exc
    return None


def cancelled(ticket: int, slot: int) -> RuntimeError:
    """What waiting on a copy that was cancelled before it started raises (both copiers)."""
    return RuntimeError(f"expert copy {ticket} into slot {slot} was cancelled: nothing to wait for")


class FailedCopies:
    """The failure contract both copiers keep: a copy that fails never raises where it was started
    (`submit`, `promote`, `release`, the CPU worker); it becomes a `CopyError` (slot, ticket) that
    the next `wait` raises, once: the waiter's own copy's failure first, else the oldest one not
    reported yet (a failed prefetch nobody waits for is never lost). The store then forgets the
    slot's expert (slot_copies.py)."""

    def __init__(self, lock=None):
        self._lock = lock if lock is not None else threading.Lock()  # a worker thread may add meanwhile
        self._errors: list[CopyError] = []

    def add(self, slot: int, ticket: int, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(CopyError(slot, ticket, exc))

    def report(self, ticket: int, slot: int) -> None:
        """Raise the failure the waiter of copy `ticket` into `slot` should see, if any."""
        if not self._errors:
            return
        with self._lock:
            mine = [e for e in self._errors if (e.slot, e.ticket) == (slot, ticket)]
            err = (mine or self._errors)[0] if self._errors else None
            if err is not None:
                self._errors.remove(err)
        if err is not None:
            raise err

