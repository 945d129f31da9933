"""Continuous batching: which sequences run in the next forward step, and how many tokens each feeds.

Every step is built fresh from three groups, in this order, within `max_num_batched_tokens`:
  1. running sequences past their prompt: one decode token each;
  2. running sequences still prefilling: their next chunk (at most `prefill_chunk` tokens);
  3. waiting requests, while a KV-cache slot is free: admitted, and their first chunk.
So a new request joins the running decode batch at the next step, and a long prompt is spread over
several steps instead of stalling everyone's decode. Slots are preallocated KV rows (`num_slots` of
them); finishing or aborting a sequence returns its slot at once.

With `share_prefill` (the model can copy KV between slots), a completion admitted while a sibling of
its request is prefilling the prompt takes a slot but feeds nothing (`fork_of` is that sibling): the
engine copies the sibling's prompt KV into its slot when that prefill ends. A completion admitted later
(no free slot until then) while a sibling still holds the prompt's KV gets all of it but the last
token copied from that sibling (`kv_source`; the engine copies before the step's forward) and feeds
that last token, whose logits it samples from; with no such sibling it prefills on its own.
"""
from __future__ import annotations

import heapq
import logging
from collections import deque

from moe_serve.engine.sequence import Sequence

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at `scheduler.max_queue`: the request is refused (retry later)."""


def kv_cache_slots(kv_cache_gb: float, kv_bytes_per_token: int, max_model_len: int, max_num_seqs: int) -> int:
    """KV-cache slots of `max_model_len` tokens that fit in the budget, capped by `max_num_seqs`."""
    budget_tokens = int(kv_cache_gb * 2**30) // max(1, kv_bytes_per_token)
    if budget_tokens < max_model_len:
        raise ValueError(
            f"kv_cache.kv_cache_gb={kv_cache_gb} holds {budget_tokens} tokens ({kv_bytes_per_token} bytes each), "
            f"fewer than one sequence of model.max_model_len={max_model_len}; raise kv_cache_gb or lower max_model_len"
        )
    fit = budget_tokens // max_model_len
    if fit < max_num_seqs:  # e.g. a big model's default max_model_len takes the whole budget: one slot
        log.warning("kv_cache.kv_cache_gb=%g holds %d sequences of model.max_model_len=%d tokens, fewer than "
                    "kv_cache.max_num_seqs=%d: at most %d requests run at once, the rest wait; raise kv_cache_gb "
                    "or lower max_model_len", kv_cache_gb, fit, max_model_len, max_num_seqs, fit)
    return min(max_num_seqs, fit)


class Scheduler:
    def __init__(self, num_slots: int, max_num_batched_tokens: int, prefill_chunk: int, max_queue: int,
                 share_prefill: bool = False):
        self.share_prefill = share_prefill
        self.free_slots = list(range(num_slots))  # a min-heap: the lowest free slot is handed out first
        self.num_slots = num_slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(
                f"request {seq.request_id!r} refused: {len(self.waiting)} requests already wait "
                f"(scheduler.max_queue={self.max_queue})"
            )
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, tokens it feeds this step)], decodes first; empty when there is nothing to do."""
        budget = self.max_num_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        # decodes in slot order: with lowest-slot-first allocation they are usually slots 0..B-1,
        # which lets the model read their KV rows as one view instead of gathering them
        for seq in sorted((s for s in self.running if s.prefill_done), key=lambda s: s.slot):
            if budget > 0:
                plan.append((seq, 1))
                budget -= 1
        for seq in self.running:
            if not seq.prefill_done and seq.fork_of is None and budget > 0:
                n = min(self.prefill_chunk, len(seq.prompt_ids) - seq.num_computed, budget)
                plan.append((seq, n))
                budget -= n
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            leader = self.prefilling_sibling(seq)
            if leader is None and budget <= 0:
                break
            self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            self.running.append(seq)
            seq.fork_of = leader
            if leader is not None:
                continue  # feeds nothing (so takes no budget): waits for the sibling's prefill
            seq.kv_source = self.prompt_kv_holder(seq)
            if seq.kv_source is not None:
                seq.num_computed = len(seq.prompt_ids) - 1  # once the engine has copied them
            n = min(self.prefill_chunk, len(seq.prompt_ids) - seq.num_computed, budget)
            plan.append((seq, n))
            budget -= n
        return plan

    def prefilling_sibling(self, seq: Sequence) -> Sequence | None:
        """The running member of seq's request that is prefilling the prompt itself, if any."""
        if not self.share_prefill or len(seq.group) == 1 or seq.num_computed:
            return None
        for other in seq.group:
            if other is not seq and other.slot is not None and other.fork_of is None and not other.prefill_done \
                    and not other.finished:
                return other
        return None

    def prompt_kv_holder(self, seq: Sequence) -> Sequence | None:
        """A running member of seq's request whose slot holds the whole prompt's KV (its prefill, or a
        copy of one, is done), when there are prompt tokens before the last to copy; else None."""
        if not self.share_prefill or len(seq.group) == 1 or seq.num_computed or len(seq.prompt_ids) < 2:
            return None
        return next((other for other in seq.group if other is not seq and other.slot is not None
                     and other.fork_of is None and other.prefill_done and not other.finished), None)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out, returning its slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = None
        seq.fork_of = seq.kv_source = None  # an aborted follower is not forked
        waiting_on_it = [s for s in seq.group if s.fork_of is seq]
        if waiting_on_it:  # its prefill will not end: the first sibling waiting on it prefills instead
            head = waiting_on_it[0]
            for s in waiting_on_it:
                s.fork_of = None if s is head else head
