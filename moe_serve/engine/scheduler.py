"""Continuous batching: which sequences run in the next forward step, and how many tokens each feeds.

Every step is built fresh from three groups, in this order, within `max_num_batched_tokens`:
  1. running sequences past their prompt: one decode token each;
  2. running sequences still prefilling: their next chunk (at most `prefill_chunk` tokens);
  3. waiting requests, while a KV-cache slot is free: admitted, and their first chunk.
So a new request joins the running decode batch at the next step, and a long prompt is spread over
several steps instead of stalling everyone's decode. Slots are preallocated KV rows (`num_slots` of
them); finishing or aborting a sequence returns its slot at once.
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
    def __init__(self, num_slots: int, max_num_batched_tokens: int, prefill_chunk: int, max_queue: int):
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
            if not seq.prefill_done and budget > 0:
                n = min(self.prefill_chunk, len(seq.prompt_ids) - seq.num_computed, budget)
                plan.append((seq, n))
                budget -= n
        while self.waiting and self.free_slots and budget > 0:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            self.running.append(seq)
            n = min(self.prefill_chunk, len(seq.prompt_ids), budget)
            plan.append((seq, n))
            budget -= n
        return plan

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out, returning its slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = None
