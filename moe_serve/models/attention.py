"""Attention over a preallocated per-slot KV cache, for mixed batches (prefill chunks + decodes).

`StepMeta` is built once per forward from the ForwardBatch (host lists -> a few index tensors) and
shared by every layer. `attend` writes the step's new cache rows, then:
  - all decodes in one SDPA call: their slots' rows gathered to [B, T, ...], padded keys masked out
    by length (no Python loop over sequences or tokens), each KV head's query heads as query rows;
    under a sliding window shorter than the longest context, only each decode's last `window` rows
    (the keys transformers' sliding cache holds: the same sum in the same order, so bf16 agrees bit
    for bit, and no work on keys the window hides);
  - each prefill chunk in its own SDPA call over its slot's first context+chunk rows, causal with the
    chunk's offset, so chunked prefill equals one-shot prefill.
The cache may hold keys/values (GQA) or a latent (MLA); `expand` turns gathered cache rows into K, V.
Caches are zero-initialized: masked rows are never NaN, so 0-weights times them stay 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from moe_serve.models.batch import ForwardBatch

# cuDNN's attention, torch's first choice on Hopper GPUs, builds an execution plan for every new
# sequence length: 37-40 ms the first time a length is seen (measured on an H100, torch 2.11), which
# an eager decode meets at every step that reaches a new context length. The flash and memory-efficient
# kernels need no per-shape plan (0.1-0.3 ms on a new length), so CUDA attention leaves cuDNN out.
# (By the backend switch itself: `torch.nn.attention.sdpa_kernel` costs ~80 us of host time a call there.)
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, without cuDNN's kernel on CUDA."""
    if q.device.type != "cuda" or not torch.backends.cuda.cudnn_sdp_enabled():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


@dataclass
class StepMeta:
    positions: torch.Tensor  # long [N]
    cache_rows: torch.Tensor  # long [N]: row of each token in a cache flattened to [slots * max_len, ...]
    dec_idx: torch.Tensor | None  # long [B]: flat index of each decode token
    dec_slots: torch.Tensor | None  # long [B]
    dec_lens: torch.Tensor | None  # long [B]: cached tokens incl. this one
    dec_max: int  # longest decode context (rows to gather)
    dec_min: int  # shortest decode context
    dec_uniform: bool  # every decode sees exactly dec_max keys: no length mask needed
    dec_range: tuple[int, int] | None  # decode slots are exactly a..b-1 in order: read a view, no gather
    prefills: list[tuple[int, int, int, int]]  # (start, n, slot, context_len) per prefill chunk
    last_idx: torch.Tensor  # long [S]: flat index of each sequence's last token
    max_len: int = 0  # cache rows per slot
    _mask: list = field(default_factory=list)  # decode_mask, once built
    _spans: dict = field(default_factory=dict)

    @staticmethod
    def build(batch: ForwardBatch, device, max_len: int) -> "StepMeta":
        q, ctx, slots = batch.query_lens, batch.context_lens, batch.slot_ids
        starts, acc = [], 0
        for n in q:
            starts.append(acc)
            acc += n
        if acc != batch.num_tokens:
            raise ValueError(f"sum(query_lens) = {acc} but token_ids has {batch.num_tokens} tokens")
        dec = [i for i, n in enumerate(q) if n == 1]
        pre = [(starts[i], q[i], slots[i], ctx[i]) for i, n in enumerate(q) if n > 1]
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        positions = batch.positions.to(device)
        if len(dec) == len(q):  # decodes only (the common step): token b is sequence b
            dec_slots = as_t(slots)
            cache_rows = dec_slots * max_len + positions
            last_idx = dec_idx = torch.arange(len(q), device=device)
            dec_lens = as_t([c + 1 for c in ctx])
        else:
            token_slots = torch.repeat_interleave(as_t(slots), as_t(q))
            cache_rows = token_slots * max_len + positions
            last_idx = as_t([s + n - 1 for s, n in zip(starts, q)])
            dec_idx = as_t([starts[i] for i in dec]) if dec else None
            dec_slots = as_t([slots[i] for i in dec]) if dec else None
            dec_lens = as_t([ctx[i] + 1 for i in dec]) if dec else None
        return StepMeta(
            positions=positions,
            cache_rows=cache_rows,
            dec_idx=dec_idx,
            dec_slots=dec_slots,
            dec_lens=dec_lens,
            dec_max=max((ctx[i] + 1 for i in dec), default=0),
            dec_min=min((ctx[i] + 1 for i in dec), default=0),
            dec_uniform=len({ctx[i] for i in dec}) <= 1,
            dec_range=_contiguous([slots[i] for i in dec]),
            prefills=pre,
            last_idx=last_idx,
            max_len=max_len,
        )

    def decode_mask(self) -> torch.Tensor | None:
        """bool [B, 1, 1, T]: key t is visible to decode b (t < len_b), for rows 0..dec_max (no window
        shortens any decode there, see window_span); None when all keys are visible (as transformers'
        unpadded decode, same kernel path)."""
        if self.dec_uniform:
            return None
        if not self._mask:
            key = torch.arange(self.dec_max, device=self.dec_lens.device)
            self._mask.append(visible_keys(key, self.dec_lens, None)[:, None, None, :])
        return self._mask[0]

    def window_span(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Under a window shorter than the longest decode context: (rows long [B, W], mask) where
        rows are the flat cache rows of each decode's last W = window keys (from 0 for a shorter
        context; mask bool [B, 1, 1, W] then hides its rows past the end, else None). None: no window
        shortens any decode, read rows 0..dec_max."""
        if window is None or window >= self.dec_max:
            return None
        if window not in self._spans:
            key = torch.arange(window, device=self.dec_lens.device)  # [W]
            first = (self.dec_lens - window).clamp(min=0)  # [B]: position of each decode's first key
            rows = (self.dec_slots * self.max_len + first)[:, None] + key  # [B, W]
            mask = None if self.dec_min >= window else (key[None, :] < self.dec_lens[:, None])[:, None, None, :]
            self._spans[window] = (rows, mask)
        return self._spans[window]


def visible_keys(key: torch.Tensor, lens: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool [B, T]: cache row key[t] (key long [T]) is visible to decode b, whose sequence holds
    lens[b] tokens with this one: t < lens[b], and inside the sliding window when there is one."""
    visible = key[None, :] < lens[:, None]
    if window is not None:
        visible &= key[None, :] > (lens[:, None] - 1 - window)
    return visible


def write_cache_rows(caches: tuple[torch.Tensor, ...], new_rows: tuple[torch.Tensor, ...],
                     flat_rows: torch.Tensor) -> None:
    """Write a step's new rows (each [N, ...]) into their caches (each [slots, max_len, ...]) at
    `flat_rows` long [N] (slot * max_len + position): one index_copy_ per cache, into its rows view."""
    for cache, rows in zip(caches, new_rows):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, flat_rows, rows if rows.dtype == cache.dtype else rows.to(cache.dtype))


def _contiguous(slots: list[int]) -> tuple[int, int] | None:
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slots[0], slots[0] + len(slots)
    return None


def chunk_mask(n: int, ctx: int, window: int | None, device) -> torch.Tensor | None:
    """bool [n, ctx+n] for a prefill chunk at offset ctx; None when plain causal from 0 suffices."""
    if ctx == 0 and window is None:
        return None
    i = torch.arange(n, device=device)[:, None] + ctx
    j = torch.arange(ctx + n, device=device)[None, :]
    m = j <= i
    if window is not None:
        m &= j > i - window
    return m


def gqa_decode(qd: torch.Tensor, rows: tuple[torch.Tensor, ...], expand, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
    """Decodes' attention: qd [B, Hq, D] over their cache rows (each [B, T, ...]) -> [B, Hq, Dv].
    The G = Hq/Hkv query heads that share a KV head (heads kv*G .. kv*G+G-1) attend as G query rows
    of that head: no K/V expansion, and one kernel block per KV head (~2x faster on CPU)."""
    k, v = expand(rows)  # [B, T, Hkv, D]
    b, hq, hkv = qd.shape[0], qd.shape[1], k.shape[2]
    o = sdpa(qd.reshape(b, hkv, hq // hkv, qd.shape[-1]), k.transpose(1, 2), v.transpose(1, 2),
             attn_mask=mask, scale=scale)  # [B, Hkv, G, Dv]
    return o.reshape(b, hq, o.shape[-1])


def attend(
    q: torch.Tensor,  # [N, Hq, Dqk]
    new_rows: tuple[torch.Tensor, ...],  # each [N, ...]: this step's cache rows
    caches: tuple[torch.Tensor, ...],  # each [slots, T, ...]
    expand: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]],  # rows [B,T,..] -> K,V [B,T,Hkv,D]
    meta: StepMeta,
    scale: float,
    window: int | None,
    v_dim: int,
    decode: Callable | None = None,  # (qd [B,Hq,Dqk], rows, mask [B,1,1,T] | None) -> [B,Hq,Dv]; default gqa_decode
) -> torch.Tensor:  # [N, Hq, Dv]
    write_cache_rows(caches, new_rows, meta.cache_rows)
    n_tok, hq = q.shape[0], q.shape[1]
    out = q.new_empty(n_tok, hq, v_dim) if meta.prefills else None
    if meta.dec_idx is not None:
        span = meta.window_span(window)
        if span is not None:  # each decode's last `window` rows only, [B, W, ...]
            flat_rows, mask = span
            rows = tuple(c.view(-1, *c.shape[2:])[flat_rows] for c in caches)
        elif meta.dec_range is not None:  # slots a..b-1: a view of the cache, no copy
            rows = tuple(c[meta.dec_range[0]:meta.dec_range[1], : meta.dec_max] for c in caches)
            mask = meta.decode_mask()
        else:
            rows = tuple(c[:, : meta.dec_max].index_select(0, meta.dec_slots) for c in caches)
            mask = meta.decode_mask()
        only_decodes = not meta.prefills  # then decode b is token b: no gather/scatter of q and out
        qd = q if only_decodes else q.index_select(0, meta.dec_idx)  # [B, Hq, D]
        o = decode(qd, rows, mask) if decode is not None else gqa_decode(qd, rows, expand, mask, scale)  # [B, Hq, Dv]
        if only_decodes:
            return o
        out.index_copy_(0, meta.dec_idx, o)
    for start, n, slot, ctx in meta.prefills:
        k, v = expand(tuple(c[slot, : ctx + n][None] for c in caches))  # [1, ctx+n, Hkv, D]
        qp = q[start:start + n].transpose(0, 1)[None]  # [1, Hq, n, D]
        mask = chunk_mask(n, ctx, window, q.device)
        o = sdpa(qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None, scale=scale,
                 enable_gqa=k.shape[2] != hq)
        out[start:start + n] = o[0].transpose(0, 1)
    return out
