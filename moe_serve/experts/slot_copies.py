"""The offloading store's copies into its device slots: queue one, wait for one, forget a failed one.

`SlotCopies` is a mixin of `OffloadExpertStore` (offload.py), split out so that offload.py keeps the
per-step logic (what each step needs, hits and misses, admission, compute order) and this file the
bookkeeping around each copy the copier (`copier.py`) runs: the slot's ticket, the cancelled copy of
an evicted prefetch, the copy and byte counters, the stall a wait costs, and the slot left without
valid weights when a copy fails. It reads the store's `cache`, `copier`, `ticket`, `prefetched`,
`stats`, `copy_counted`, `slot_gu`/`slot_dn`, `expert_bytes`, `capacity`, `num_experts`, `host`, `source` and
`host_expert`.
"""
from __future__ import annotations

import functools
import time

from moe_serve.experts.copier import CopyError
from moe_serve.experts.copy_failures import CheckedPairs


class SlotCopies:
    def _copy_in(self, g: int, need: int | None = None) -> bool:
        """Give `g` a slot and queue its copy: on demand (`need` None) or as a prefetch needed at
        clock `need` (refused, False, when the policy does not admit it over its victim)."""
        # from the moment `g` holds a slot until its copy's ticket is the slot's, anything raised (host=mmap
        # reads the checkpoint here; Ctrl-C lands after any call) takes the slot back: else `g` stays
        # resident with the slot's old ticket, long landed, and its next use computes with the victim's weights
        try:
            placed = self.cache.insert(g, prefetch=need is not None)
            if placed is None:
                return False
            slot, evicted = placed
            if evicted >= 0:
                # a copy of the evicted expert that never started moves no bytes: a prefetch, or a demand
                # copy left queued by a step that failed before computing its expert (the new copy into
                # the slot would supersede it unseen, and `copies` would count a copy that never ran)
                cancelled = self.copier.cancel(int(self.ticket[slot]), slot)
                if cancelled and self.copy_counted[slot]:  # not one counted before reset_metrics()
                    self.stats["copies"] -= 1
                    self.stats["bytes_moved"] -= self.expert_bytes
                if self.prefetched[evicted]:
                    self.prefetched[evicted] = False
                    self.stats["prefetch_cancelled" if cancelled else "prefetch_wasted"] += 1
            gu, dn, check = self.host_copy_source(g)
            pairs = CheckedPairs([(self.slot_gu[slot], gu), (self.slot_dn[slot], dn)], check)
            self.ticket[slot] = self.copier.submit(pairs, slot, need)
        except BaseException:
            self.cache.remove(g)
            raise
        self.stats["copies"] += 1
        self.stats["bytes_moved"] += self.expert_bytes
        self.copy_counted[slot] = True
        return True

    def host_copy_source(self, g: int) -> tuple:
        """(host gate_up, host down, check or None) of expert `g`: with host=mmap the check that its
        checkpoint file is unchanged, which the copy runs again right before reading the mapping."""
        l, e = divmod(g, self.num_experts)
        gu, dn = self.host_expert(l, e)
        check = getattr(self.source, "check_unchanged", None) if self.host == "mmap" else None
        return gu, dn, (functools.partial(check, l, e) if check is not None else None)

    def _wait(self, ticket: int, slot: int) -> None:
        """Wait for copy `ticket` into copier slot `slot` (a cache slot or a staging buffer). Only
        a copy that has not landed is a stall (on CPU it may run here, in this thread); the time is
        the wait alone, whatever it raises."""
        t0 = None if self.copier.ready(ticket, slot) else time.perf_counter()
        try:
            self.copier.wait(ticket, slot)  # a landed copy: only its failure to report, if any
        except CopyError as exc:
            self._forget_failed(exc)
            raise
        finally:
            if t0 is not None:
                self.stats["stall_s"] += time.perf_counter() - t0

    def _forget_failed(self, exc: CopyError) -> None:
        """A copy failed (reported to whichever waiter came next, here or in the staging ring): if it
        was the latest copy into a cache slot, that slot holds no valid weights: forget its expert."""
        if exc.slot < self.capacity and int(self.ticket[exc.slot]) == exc.ticket and self.cache.gid_of[exc.slot] >= 0:
            g = int(self.cache.gid_of[exc.slot])
            self.prefetched[g] = False
            self.cache.remove(g)
