"""A ring of expert buffers for misses that are copied, computed once and dropped (CPU only).

The offloading store streams a miss it does not cache (see `admit` in offload.py) through these
buffers instead of a cache slot: they are rewritten every few experts, so they stay in the CPU
cache, and the copy thread fills the next one while the compute thread reads this one.
"""
from __future__ import annotations

import torch

from moe_serve.experts.copy_failures import CheckedPairs

STAGING_BUFFERS = 2  # the ring streamed misses go through: one computed from while the next is filled


def resolve_admission(admit: str, device: torch.device) -> str:
    """cache_admission auto -> reuse on a CPU device, always elsewhere (see `admit` in offload.py)."""
    return ("reuse" if device.type == "cpu" else "always") if admit == "auto" else admit


def staging_buffers(device, cpu_experts: str, admit: str) -> int:
    """Staging buffers the offloading store allocates on `device` besides its slots: the ring of
    admit=reuse, unless every miss is computed in place (a CPU device with cpu_experts not off).
    The factory pays them from expert_cache_gb, so it must know before the store exists (a store
    with a slot for every expert allocates none: nothing streams; the factory then charges none)."""
    device = torch.device(device)
    in_place_only = device.type == "cpu" and cpu_experts != "off"
    return STAGING_BUFFERS if resolve_admission(admit, device) == "reuse" and not in_place_only else 0


class StagingRing:
    """`n` expert buffers outside the cache, for misses that are copied, computed once and dropped
    (the store's streamed experts; CPU only: a buffer is refilled as soon as the forward that read
    it returns). Their copies are demand copies through the store's copier, into copier slots
    `first_slot + b`, so the worker fills the next buffer while the compute thread reads this one,
    and a copy it has not started runs in the waiting thread. Works for any compute order: an
    expert whose copy was not started ahead takes a free buffer (or one whose expert is not
    computed yet, which is then copied again when its turn comes)."""

    def __init__(self, copier, first_slot: int, n: int, gu: torch.Tensor, dn: torch.Tensor, on_copies=None):
        self.copier, self.first, self.n = copier, first_slot, n
        # on_copies(delta): copies submitted (+1) or cancelled before they started (-1), as they happen
        self.on_copies = on_copies or (lambda delta: None)
        self.gu = torch.zeros((n, *gu.shape), dtype=gu.dtype, device=gu.device)  # [n, 2I, H]
        self.dn = torch.zeros((n, *dn.shape), dtype=dn.dtype, device=dn.device)  # [n, H, I]
        self.ticket = [0] * n
        self.owner = [-1] * n  # queue position each buffer holds (or is filling), -1 free
        self.queue: list[tuple] = []  # this layer's (gu, dn, check) host weights, in the order they will run
        self.where: dict[int, int] = {}  # queue position -> buffer holding (or filling) it
        self.computed: set[int] = set()  # queue positions done this layer
        self.next = 0  # scan start for the next position in line

    def start(self, sources: list[tuple]) -> None:
        """A new layer: `sources` [(host gu, host dn[, check])] of its streamed experts (a check
        runs right before each copy, see `CheckedPairs`); fill what fits."""
        # a layer that failed left copies of experts it never computed: those not started are dropped
        # (the new copies into their buffers would supersede them), and never counted as copies made
        for b in range(self.n):
            if self.owner[b] >= 0 and self.copier.cancel(self.ticket[b], self.first + b):
                self.on_copies(-1)
        self.queue, self.where, self.next, self.owner, self.computed = sources, {}, 0, [-1] * self.n, set()
        for b in range(self.n):
            j = self._next_waiting()
            if j is None:
                break
            self._fill(b, j)

    def _next_waiting(self) -> int | None:
        while self.next < len(self.queue) and (self.next in self.where or self.next in self.computed):
            self.next += 1
        return self.next if self.next < len(self.queue) else None

    def _fill(self, b: int, j: int) -> None:
        old = self.owner[b]
        if old >= 0:  # not computed yet: copied again when it runs
            if self.copier.cancel(self.ticket[b], self.first + b):
                self.on_copies(-1)
            del self.where[old]
        self.owner[b], self.where[j] = j, b
        gu, dn, *check = self.queue[j]  # the check is optional
        self.ticket[b] = self.copier.submit(CheckedPairs([(self.gu[b], gu), (self.dn[b], dn)], *check), self.first + b)
        self.on_copies(1)

    def get(self, j: int, wait=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers of queue position `j`, once its copy has landed (may run the copy here), waited
        for by `wait(ticket, copier slot)` (the copier's own by default; the store's times it)."""
        if j not in self.where:  # out of line: a free buffer, else the one whose expert runs last
            b = min(range(self.n), key=lambda b: (self.owner[b] >= 0, -self.owner[b]))
            self._fill(b, j)
        b = self.where[j]
        (wait or self.copier.wait)(self.ticket[b], self.first + b)
        return self.gu[b], self.dn[b]

    def done(self, j: int) -> None:
        """Position `j` is computed: its buffer takes the next expert in line, if any."""
        self.computed.add(j)
        b = self.where.pop(j)
        self.owner[b] = -1
        nxt = self._next_waiting()
        if nxt is not None:
            self._fill(b, nxt)
