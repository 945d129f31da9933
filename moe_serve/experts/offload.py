"""The offloading expert store: a bounded set of expert slots on the compute device, the rest on the host.

Behind the `ExpertStore` interface (the model never knows): per MoE layer and step the experts stage
calls `begin_layer` (the experts this step needs), `get`/`compute_expert` per expert, `end_layer`.

- Host tier: every expert in host memory (`host="copy"`: stacked per layer, pinned when the compute
  device is CUDA), or read on demand from the memory-mapped checkpoint (`host="mmap"`, when host
  memory is short).
- Device tier: `capacity` slots (gate_up [C, 2I, H], down [C, H, I]), shared across layers or split
  per layer; `SlotCache` + a `CachePolicy` decide residency; an expert in use by the current step is
  never evicted.
- Copies go through a copier (`copier.py`): a side CUDA stream with events; on CPU real buffer
  copies by a worker thread (demand first), and `get` runs a copy the worker has not started
  itself. `get` waits only for that expert's copy; `run` computes the experts already in place
  first (`compute_order`), so pending copies have time to land. The store's side of each copy
  (ticket, counters, stall time, a failed copy's slot) is in `slot_copies.py`.
- Admission (`admit`; auto = "reuse" on a CPU device, "always" elsewhere): with "reuse" a demand
  miss takes a slot if one is free (keeping it evicts no one) or its expert was used within the last
  `admit_window` tokens (default 1: the previous token; 1, 2 and 4 measured on the e2e bench, 1 best
  by a few %); the others stream
  through a ring of two staging buffers (`StagingRing`): copied (by the copy thread, one buffer
  ahead of the compute), computed, dropped. Why, on CPU: the staging buffers stay in the CPU cache,
  while a copy into an evicted slot writes memory that left the cache long ago (measured, 4.3 MB
  expert, 128 slots: 0.77 ms vs 0.50 ms, and the forward after it 0.34 ms vs 0.20 ms), so caching
  an expert that is not used again costs more than streaming it; one-off experts no longer evict
  the ones that recur; and a copy into a cached buffer overlaps the forward of the previous one
  (a copy into cold memory and a forward from cold memory only share the memory bus).
- Misses: copied in on demand, or (cold experts on the CPU, Fiddler-style) computed where the
  weights lie when the start-up cost model (`cost.py`) says that is cheaper. When the compute device
  is the CPU itself and cpu_experts is not off, every miss runs in place and nothing is copied or
  prefetched: there a copy is pure overhead (measured: benches/results/expert_cache_e2e.txt).
- Prefetch: after each router, the policy may name experts of later layers (and of the next token)
  from the predictor; they are copied in behind the demand copies, by the clock they are needed at
  (on CUDA too: issued from a host queue at most 2 ahead), at most `max_queued` waiting. A queued
  prefetch whose expert is evicted is cancelled; one needed before its copy started is a miss and
  becomes a demand copy (the same rules as `replay.py`'s demand-first copy order).
  With `prefetch_when="idle"` a hint is copied only while the copier has nothing running or queued:
  where the link is slower than the compute (a GPU fed over PCIe), a prefetch in flight delays the
  next demand copies by a whole expert, and a wrong one is pure loss.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

from moe_serve.experts.cache import CacheFull, SlotCache
from moe_serve.experts.copier import make_copier
from moe_serve.experts.cost import ExpertCosts, measure_costs
from moe_serve.experts.learner import BackgroundLearner
from moe_serve.experts.offload_options import check_options
from moe_serve.experts.policy_rollback import PolicySnapshot
from moe_serve.experts.prefetch import RoutingHook
from moe_serve.experts.prefetch_auto import AutoPrefetchFrom
from moe_serve.experts.slot_copies import SlotCopies
from moe_serve.experts.store_metrics import StoreMetrics
from moe_serve.experts.staging import StagingRing, resolve_admission, staging_buffers
from moe_serve.experts.store import ExpertStore, expert_forward, stack_experts


class OffloadExpertStore(StoreMetrics, SlotCopies, ExpertStore):
    def __init__(self, source, dtype: torch.dtype, device, capacity: int, policy, *, top_k: int,
                 per_layer: bool = False, host: str = "copy", cpu_experts: str = "auto", max_queued: int = 12,
                 learn_every: int = 64, learning: str = "background", admit: str = "auto", admit_window: int = 1,
                 prefetch_when: str = "always", prefetch_from_auto: bool = False):
        check_options(host=host, cpu_experts=cpu_experts, learning=learning, prefetch_when=prefetch_when,
                      admit=admit, admit_window=admit_window)
        self.source, self.dtype, self.device = source, dtype, torch.device(device)
        self.num_moe_layers, self.num_experts = L, E = source.num_moe_layers, source.num_experts
        gu0, dn0 = source.get(0, 0)
        self.host = host
        if host == "copy":  # one stacked host copy per layer; pinned only where a GPU copies from it
            self.host_gu, self.host_dn = stack_experts(source, dtype, pin_memory=self.device.type == "cuda")
        self.cache = SlotCache(policy, L, E, capacity, per_layer=per_layer)
        self.policy, self.capacity = policy, capacity
        self._policy_before = PolicySnapshot(policy)  # after SlotCache bound it: the plan reads its arrays
        # the compute device is the host: a copy can never beat computing where the weights lie (same
        # memory, same cores, plus the copy), so every miss runs in place and nothing is prefetched:
        # no slot is ever filled, and none is allocated (they took the whole budget of RAM for nothing)
        self.in_place_only = self.device.type == "cpu" and cpu_experts != "off"
        # zeros, not empty: on a CPU device the pages are faulted in here, at start-up, rather than by
        # the first copy into each slot on the hot path
        n = 0 if self.in_place_only else capacity
        self.slot_gu = torch.zeros((n, *gu0.shape), dtype=dtype, device=self.device)
        self.slot_dn = torch.zeros((n, *dn0.shape), dtype=dtype, device=self.device)
        self.expert_bytes = (gu0.numel() + dn0.numel()) * self.slot_gu.element_size()
        # admission (see module doc): on a CPU device a demand miss is copied into a slot only when its
        # expert was used within the last `admit_window` tokens; the others stream through `ring`
        self.admit = resolve_admission(admit, self.device)
        if self.admit == "reuse" and self.device.type != "cpu":
            raise ValueError("OffloadExpertStore: admit=reuse needs a CPU device (its staging buffers are "
                             "refilled as soon as a forward returns, which only synchronous compute allows)")
        # expert_cache_gb pays for them (factory.py); none when every expert has a slot: nothing ever streams
        stage = staging_buffers(self.device, cpu_experts, admit) if capacity < L * E else 0
        self.copier = make_copier(self.device, capacity + stage)  # copier slots >= capacity: staging buffers
        # the copier's worker thread stops with the store: at close(), or when a store nobody closed
        # (the engine drops its model) is collected; the copier never refers back to the store
        self._close_copier = weakref.finalize(self, self.copier.close)
        # the ring counts its copies as it submits or cancels them (a weak method: the store stays collectable)
        count = weakref.WeakMethod(self._count_streamed_copies)
        self.ring = StagingRing(self.copier, capacity, stage, self.slot_gu[0], self.slot_dn[0],
                                lambda delta: count()(delta)) if stage else None
        self.ticket = np.zeros(capacity, dtype=np.int64)  # copy each slot waits on
        self.prefetched = np.zeros(L * E, dtype=bool)  # prefetched, not used yet
        self.costs: ExpertCosts | None = None
        self.cpu_mode = cpu_experts
        # the predictor reads each token's routing so far: only kept when there is a predictor to prefetch
        wants = getattr(policy, "predictor", None) is not None and not self.in_place_only
        predictor = getattr(policy, "predictor", None)
        learner = predictor if learn_every > 0 and getattr(predictor, "adapts", False) and wants else None  # keeps adapting
        if learner is not None and learning == "background":  # off the decode step, see learner.py
            learner = BackgroundLearner(predictor)
        self.learner = learner
        # the worker thread stops with the store, as the copier's does
        self._close_learner = weakref.finalize(self, learner.close) if isinstance(learner, BackgroundLearner) else None
        self.routing_hook = RoutingHook(L, top_k, learner, max(learn_every, 1)) if wants else None
        if (cpu_experts != "off" or prefetch_from_auto) and not self.in_place_only:  # in place only: nothing to decide
            self.costs = measure_costs(*self.host_expert(0, 0), self.slot_gu[0], self.slot_dn[0])
        # prefetch_from=auto, for a policy that prefetches predicted layers: set once layer steps are timed
        self._auto_from = AutoPrefetchFrom(policy, self.costs, self.device, policy.lookahead) if (
            prefetch_from_auto and self.routing_hook is not None and hasattr(policy, "prefetch_from")) else None
        self.clock, self.layer, self.max_queued = 0, 0, max_queued
        self.prefetch_when = prefetch_when
        self._window = admit_window * L  # in clock ticks (layer steps)
        self._last_use = np.full(L * E, -(2**40), dtype=np.int64)  # [L*E] clock of each expert's last use
        self._streamed: dict[int, int] = {}  # expert of the current layer streamed -> its place in the ring's line
        self._on_host: set[int] = set()  # experts of the current layer computed in place
        self._overflow: set[int] = set()  # those of them that found no slot (a subset of _on_host)
        self._used_slots: list[int] = []
        self.reset_metrics()
        if hasattr(policy, "warm_set") and not self.in_place_only:  # a static hot set is loaded up front
            for g in policy.warm_set().tolist():
                self._copy_in(int(g))
            self.reset_metrics()

    # -- tiers ---------------------------------------------------------------------------------
    def host_expert(self, l: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.host == "copy":
            return self.host_gu[l][e], self.host_dn[l][e]
        return self.source.get(l, e)

    def _admits(self, g: int) -> bool:
        """admit="reuse": does demand miss `g` take a slot? Only if it was used within the window."""
        return self.clock - self._last_use[g] <= self._window

    def _computes_in_place(self, rows: int) -> bool:
        if self.cpu_mode == "on" or self.in_place_only:
            return True
        return self.cpu_mode == "auto" and self.costs is not None and self.costs.compute_on_cpu(rows)

    # -- the ExpertStore contract ----------------------------------------------------------------
    def begin_layer(self, moe_layer: int, expert_ids: list[int], rows: list[int] | None = None) -> None:
        E = self.num_experts
        self._used_slots = []  # a begin_layer that fails below left no compute to release (see end_layer)
        ids = np.asarray(expert_ids, dtype=np.int64)
        gids = moe_layer * E + ids
        self.cache.begin_step(gids)
        if self._auto_from is not None and self._auto_from.resolved is None:  # before the rollback snapshot:
            self._auto_from.mark(self, moe_layer)  # a failed layer must not undo the setting
        if not self.in_place_only:  # nothing is ever copied in: the policy has nothing to decide
            self._policy_before.take(moe_layer)  # put back by abort_layer if this layer fails
            self.policy.on_access(moe_layer, ids, self.clock)
        self.layer = moe_layer
        self._on_host.clear()
        self._overflow.clear()
        self._streamed.clear()
        glist = gids.tolist()
        for i, g in enumerate(glist):
            if self.cache.resident(g):
                slot = int(self.cache.slot_of[g])
                if self.prefetched[g] and self.copier.promote(int(self.ticket[slot]), slot):
                    self.prefetched[g] = False  # its prefetch had not started: a miss, now a demand copy
                    self.stats["misses"] += 1
                    self.stats["prefetch_late"] += 1
                    continue
                self.stats["hits"] += 1
                if self.prefetched[g]:
                    self.stats["prefetch_used"] += 1
                    self.prefetched[g] = False
                continue
            self.stats["misses"] += 1
            if self._computes_in_place(1 if rows is None else rows[i]):
                self._on_host.add(g)
                continue
            # not used lately: copied and computed, not kept, unless a slot is free (keeping it then
            # evicts nobody, and its next use is a hit instead of a second copy)
            if self.admit == "reuse" and not self._admits(g) and not self.cache.has_free_slot(g):
                self._streamed[g] = len(self._streamed)
                continue
            try:
                self._copy_in(g)
            except CacheFull:  # more experts in this step than slots: the rest run from the host
                self._on_host.add(g)
                self._overflow.add(g)
        self._last_use[gids] = self.clock
        if self._streamed:
            self.ring.start([self.host_copy_source(g) for g in self._streamed])
            self.stats["streamed"] += len(self._streamed)  # their copies: counted by the ring as it makes them
        self._used_slots = [int(self.cache.slot_of[g]) for g in glist
                            if g not in self._on_host and g not in self._streamed]
        if self.in_place_only:
            return
        if self._auto_from is not None and self._auto_from.resolved is None:
            self._auto_from.note_in_place(self)
        state = self.routing_hook.state(moe_layer) if self.routing_hook is not None else None
        for g in self.policy.on_route(moe_layer, state, self.clock).tolist():
            self._prefetch_one(g)

    def compute_order(self, moe_layer: int, active: list[int]) -> list[int]:
        """The experts whose weights are in place first, then those whose slot copy is pending (in
        the order they were queued: the copier works on them meanwhile), then the streamed ones (in
        the staging ring's order), then the host-computed ones."""
        base = moe_layer * self.num_experts

        def rank(i: int) -> tuple[int, int]:
            g = base + active[i]
            if g in self._streamed:
                return 2, self._streamed[g]  # in the ring's order
            if g in self._on_host:
                return 3, i
            slot = int(self.cache.slot_of[g])
            ticket = int(self.ticket[slot])
            return (0, i) if self.copier.ready(ticket, slot) else (1, ticket)

        return sorted(range(len(active)), key=rank)

    def _prefetch_one(self, g: int) -> None:
        if self.in_place_only or self.cache.resident(g) or self.copier.queued_prefetches() >= self.max_queued:
            return
        if self.prefetch_when == "idle" and self.copier.busy():  # it would delay the demand copies behind it
            self.stats["prefetch_deferred"] += 1
            return
        need = self.clock + (g // self.num_experts - self.layer - 1) % self.num_moe_layers + 1
        if self._copy_in(g, need):
            self.prefetched[g] = True
            self.stats["prefetch_issued"] += 1

    def prefetch(self, moe_layer: int, expert_ids) -> None:
        for e in torch.as_tensor(expert_ids).reshape(-1).tolist():
            self._prefetch_one(moe_layer * self.num_experts + int(e))

    def get(self, moe_layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        slot = int(self.cache.slot_of[moe_layer * self.num_experts + e])
        if slot < 0:
            raise KeyError(f"expert ({moe_layer}, {e}) is not resident: begin_layer must name it first")
        self._wait(int(self.ticket[slot]), slot)
        return self.slot_gu[slot], self.slot_dn[slot]

    def compute_expert(self, moe_layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        if moe_layer * self.num_experts + e in self._on_host:
            self.stats["cpu_overflow" if moe_layer * self.num_experts + e in self._overflow else "cpu_computed"] += 1
            # in the compute dtype: host=mmap hands out the checkpoint's own dtype, and the resident
            # store computes with weights converted to `dtype` (a no-op for the stacked host copy)
            gu, dn = (t.to(self.dtype) for t in self.host_expert(moe_layer, e))
            return expert_forward(x.to("cpu", gu.dtype), gu, dn).to(x.device, x.dtype)
        j = self._streamed.get(moe_layer * self.num_experts + e)
        if j is not None:  # through the staging ring: a real copy, as on-demand offloading makes
            gu, dn = self.ring.get(j, self._wait)
            y = expert_forward(x, gu, dn)
            self.ring.done(j)  # the buffer is free (CPU compute is synchronous): refill it
            return y
        gu, dn = self.get(moe_layer, e)
        return expert_forward(x, gu, dn)

    def abort_layer(self, moe_layer: int) -> None:
        self._policy_before.restore()  # the retry counts these accesses: the failed attempt must not

    def _count_streamed_copies(self, delta: int) -> None:
        self.stats["copies"] += delta
        self.stats["bytes_moved"] += delta * self.expert_bytes

    def end_layer(self, moe_layer: int) -> None:
        self._policy_before.discard()
        self.copier.release(self._used_slots)
        self.cache.end_step()
        self.clock += 1

    def nbytes(self) -> int:  # the slots, and the staging buffers when there are any
        return (self.slot_gu.shape[0] + (self.ring.n if self.ring is not None else 0)) * self.expert_bytes

    def close(self) -> None:
        self._close_copier()  # once: a finalizer runs its callback at most once
        if self._close_learner is not None:
            self._close_learner()
