"""The order expert copies run in: demand copies first, then prefetches by the clock they are needed at.

Both copiers (`copier.py`) keep the copies they have not started in a `CopyQueue`, so the CPU
worker and the CUDA host queue follow the same rules as the replay's `copy_order="demand-first"`.
"""
from __future__ import annotations

import heapq


class CopyQueue:
    """Copies not started yet, in the order a copy engine should run them: demand copies first (in
    submission order), then prefetches by the clock they are needed at. At most one queued copy per
    slot (a new one supersedes it). A queued copy can be cancelled (its expert was evicted), a
    queued prefetch promoted to demand (needed before it started), or taken out by whoever must
    run it now. Shared by both copiers; not thread-safe (the owner locks)."""

    def __init__(self):
        self.heap: list = []  # (need or -1 for demand, seq, slot); entries whose seq is not queued are stale
        self.queued: dict[int, tuple] = {}  # slot -> (ticket, seq, is prefetch, pairs)
        self.deferred: dict[int, tuple] = {}  # slot -> heap entry popped while the slot was busy
        self.seq = 0

    def push(self, ticket: int, slot: int, pairs, need: int | None, scheduled: bool = True) -> None:
        """Queue a copy (`scheduled` False: not for `pop`, only for `take`)."""
        self.seq += 1
        self.queued[slot] = (ticket, self.seq, need is not None, pairs)
        self.deferred.pop(slot, None)
        if scheduled:
            heapq.heappush(self.heap, (-1 if need is None else need, self.seq, slot))

    def has(self, ticket: int, slot: int) -> bool:
        return self.queued.get(slot, (0,))[0] == ticket

    def peek(self, ticket: int, slot: int):
        """The pairs of queued copy `ticket` into `slot`, left in the queue (None: not queued)."""
        return self.queued[slot][3] if self.has(ticket, slot) else None

    def take(self, ticket: int, slot: int):
        """Remove queued copy `ticket` into `slot` and return its pairs (None: not queued)."""
        if not self.has(ticket, slot):
            return None
        return self.queued.pop(slot)[3]

    def drop(self, slot: int) -> None:
        """Forget whatever is queued for `slot` (a newer copy was issued past the queue)."""
        self.queued.pop(slot, None)

    def promote(self, ticket: int, slot: int, scheduled: bool = True) -> bool:
        q = self.queued.get(slot)
        if q is None or q[0] != ticket or not q[2]:
            return False
        self.push(ticket, slot, q[3], None, scheduled)
        return True

    def pop(self, busy=()):
        """The next copy to run, (slot, ticket, pairs), or None; one whose slot is in `busy` waits
        (`resume(slot)` puts it back)."""
        while self.heap:
            key, seq, slot = heapq.heappop(self.heap)
            q = self.queued.get(slot)
            if q is None or q[1] != seq:
                continue  # stale: cancelled, superseded, promoted or taken
            if slot in busy:
                self.deferred[slot] = (key, seq, slot)
                continue
            del self.queued[slot]
            return slot, q[0], q[3]
        return None

    def resume(self, slot: int) -> None:
        entry = self.deferred.pop(slot, None)
        if entry is not None:
            heapq.heappush(self.heap, entry)

    def prefetches(self) -> int:
        return sum(q[2] for q in self.queued.values())
