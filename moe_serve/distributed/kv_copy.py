"""A request's completions share one prefill on the ranks: copy a slot's prompt KV into its siblings' slots.

The frontend (`DistributedModel.copy_kv_prefix`) queues `KVCopy(src, dsts, n)` and the next StepPlan carries
it; every rank applies the plan's copies, in order, before that step's forward. Before it, not after the step
that ended the prefill: the source slot may already be a new sequence's, whose prefill writes it only in the
forward of the next step.

Under TP (dp = 1) every rank holds its head shard of every slot: each copies locally. Under data-parallel
attention the sequence of slot s lives on DP rank s % dp in KV row s // dp, so a sibling may live on another
rank: the source's rank sends the prefix (every layer's cache rows [0, n), packed as bytes) to the same TP rank
of each other DP rank holding a destination, which unpacks it into its rows. Every rank walks the same copies in
the same order, so the point-to-point pairs match and cannot deadlock.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def split_by_owner(copy, dp: int) -> dict[int, list[int]]:
    """DP rank -> the KV rows (on that rank) of the copy's destinations it owns, ranks in increasing order."""
    rows: dict[int, list[int]] = {}
    for d in copy.dsts:
        rows.setdefault(d % dp, []).append(d // dp)
    return dict(sorted(rows.items()))


def pack_prefix(kv_cache, row: int, n: int) -> torch.Tensor:
    """uint8 [bytes]: positions [0, n) of KV row `row`, every layer's every cache, back to back."""
    return torch.cat([c[row, :n].contiguous().reshape(-1).view(torch.uint8) for layer in kv_cache for c in layer])


def prefix_bytes(kv_cache, n: int) -> int:
    """Size of pack_prefix's buffer for n positions."""
    return sum(c[0, :n].numel() * c.element_size() for layer in kv_cache for c in layer)


def unpack_prefix(kv_cache, buf: torch.Tensor, rows: list[int], n: int) -> None:
    """Write `buf` (pack_prefix's layout, from a rank with caches of the same shapes) into each of `rows`."""
    at = 0
    for layer in kv_cache:
        for c in layer:  # [rows, max_len, ...]
            part = c[0, :n]
            size = part.numel() * part.element_size()
            c[rows, :n] = buf[at:at + size].view(c.dtype).view(part.shape)
            at += size


@torch.inference_mode()
def apply_kv_copies(model, layout, world, copies, routing_memory: dict | None = None) -> None:
    """Do a StepPlan's `copies` on this rank (model: its MoEModel; world: the world process group).
    routing_memory (the pre-planned dispatch's slot -> last token's routing, keyed by KV row): a destination
    row takes its source's, so its first decode step forecasts from the prompt's last token, not from the row's
    previous sequence (forecasts only size buffers: outputs are exact either way)."""
    dp = layout.dp
    for copy in copies:
        if dp == 1:
            model.copy_kv_prefix(copy.src, list(copy.dsts), copy.n)
            _remember(routing_memory, copy.src, list(copy.dsts))
            continue
        owner, src_row = copy.src % dp, copy.src // dp
        for d, rows in split_by_owner(copy, dp).items():
            if owner == d == layout.dp_rank:
                model.copy_kv_prefix(src_row, rows, copy.n)
                _remember(routing_memory, src_row, rows)
            elif owner == layout.dp_rank:  # the same TP rank of the destination's DP group
                dist.send(pack_prefix(model.kv_cache, src_row, copy.n), d * layout.tp + layout.tp_rank, group=world)
            elif d == layout.dp_rank:
                buf = torch.empty(prefix_bytes(model.kv_cache, copy.n), dtype=torch.uint8,
                                  device=model.kv_cache[0][0].device)  # the source's caches have the same shapes
                dist.recv(buf, owner * layout.tp + layout.tp_rank, group=world)
                unpack_prefix(model.kv_cache, buf, rows, copy.n)
                _remember(routing_memory, None, rows)  # the source's routing is on its rank: none here


def _remember(memory: dict | None, src: int | None, dsts: list[int]) -> None:
    """Each destination row takes the source row's last routing, or none (never its previous sequence's)."""
    if memory is None:
        return
    for d in dsts:
        if src in memory:
            memory[d] = memory[src]
        else:
            memory.pop(d, None)
