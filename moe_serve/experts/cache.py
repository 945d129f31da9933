"""Slot bookkeeping for an expert cache: which expert sits in which slot, and who gets evicted.

Pure bookkeeping (numpy, no tensors), so the trace replay and the offloading store run the very same
residency logic. Experts are global ids `g = layer * E + expert` (one cache shared across layers) or,
with `per_layer=True`, every layer gets `capacity // L` slots of its own.

Invariant: an expert marked in use (`begin_step`) is never chosen as a victim.
"""
from __future__ import annotations

import numpy as np

from moe_serve.experts.policies.base import CachePolicy


class CacheFull(RuntimeError):
    """Every slot holds an expert in use by the current step: nothing may be evicted."""


class SlotCache:
    def __init__(self, policy: CachePolicy, num_layers: int, num_experts: int, capacity: int,
                 per_layer: bool = False):
        total = num_layers * num_experts
        if not 1 <= capacity <= total:
            raise ValueError(f"expert cache capacity must lie in [1, {total}] slots, got {capacity}")
        if per_layer and capacity < num_layers:
            raise ValueError(f"per-layer expert cache needs capacity >= num_layers={num_layers}, got {capacity}")
        self.policy, self.L, self.E, self.capacity, self.per_layer = policy, num_layers, num_experts, capacity, per_layer
        policy.bind(num_layers, num_experts, capacity)
        self.slot_of = np.full(total, -1, dtype=np.int64)  # [L*E] slot holding expert g, -1 if absent
        self.gid_of = np.full(capacity, -1, dtype=np.int64)  # [capacity] expert held by each slot
        self.in_use = np.zeros(total, dtype=bool)  # [L*E] experts the current step computes with
        if per_layer:  # slots [bounds[l], bounds[l+1]) are layer l's: capacity // L each, leftovers spread over them
            bounds = np.linspace(0, capacity, num_layers + 1).astype(np.int64)
            self._free = [list(range(bounds[l + 1] - 1, bounds[l] - 1, -1)) for l in range(num_layers)]
        else:
            self._free = [list(range(capacity - 1, -1, -1))]

    def _pool(self, g: int) -> int:
        return g // self.E if self.per_layer else 0

    def resident(self, g: int) -> bool:
        return self.slot_of[g] >= 0

    def has_free_slot(self, g: int) -> bool:
        """Could `g` take a slot without evicting anyone (a free slot in its pool)?"""
        return bool(self._free[self._pool(g)])

    def begin_step(self, gids) -> None:
        """Mark `gids` as in use by the current step (clearing the previous step's marks)."""
        self.in_use[:] = False
        self.in_use[np.asarray(gids, dtype=np.int64)] = True

    def end_step(self) -> None:
        """The current step's experts are done with: any of them may be evicted again."""
        self.in_use[:] = False

    def _candidates(self, g: int) -> np.ndarray:
        held = self.gid_of[self.gid_of >= 0]
        if self.per_layer:
            held = held[held // self.E == g // self.E]
        return held[~self.in_use[held]]

    def insert(self, g: int, prefetch: bool = False) -> tuple[int, int] | None:
        """Give `g` a slot: (slot, evicted gid or -1). A prefetch is refused (None) when every slot is
        in use or the policy does not admit it over the victim; a demand insert always happens."""
        if self.slot_of[g] >= 0:
            return int(self.slot_of[g]), -1
        free = self._free[self._pool(g)]
        evicted = -1
        if free:
            slot = free.pop()
        else:
            cand = self._candidates(g)
            if cand.size == 0:
                if prefetch:
                    return None
                raise CacheFull(f"expert cache: all {self.capacity} slots hold experts in use; "
                                f"raise the capacity above the experts one step needs")
            victim = self.policy.victim(cand)
            if prefetch and not self.policy.admits(g, victim):
                return None
            slot = int(self.slot_of[victim])
            self.slot_of[victim] = -1
            evicted = victim
        self.slot_of[g] = slot
        self.gid_of[slot] = g
        return slot, evicted

    def remove(self, g: int) -> None:
        slot = int(self.slot_of[g])
        if slot >= 0:
            self.slot_of[g] = -1
            self.gid_of[slot] = -1
            self._free[self._pool(g)].append(slot)
