"""The compiled decode step's attention and experts, written for inductor (models/compiled.py): no
host sync and no data-dependent shapes, so one graph serves every batch size and context length."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_serve.models.attention import gqa_decode
from moe_serve.models.bf16_gemv import grouped_gemm
from moe_serve.models.narrow import worth_the_kernel


def cached_attention(q: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor,
                     visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention written out for inductor: q [B, Hq, D] over the first T rows of each decode's
    cache slot, cache (K, V) each [slots, max_len, Hkv, D], visible bool [B, T] -> [B, Hq, D]. The
    G = Hq/Hkv query heads of a KV head share its rows, as in `gqa_decode`; the rows are gathered
    inside the fused reductions (no [B, T, Hkv, D] copies, no SDPA call: 5-13% of a batch-1 step).
    Computed in fp32 whatever the cache dtype, as the SDPA kernels accumulate."""
    b, hq, d = q.shape
    keys, values = cache
    t, hkv = visible.shape[1], keys.shape[2]
    k, v = keys[slots, :t].float(), values[slots, :t].float()  # [B, T, Hkv, D] each (fused, not materialised)
    scores = (q.float().view(b, 1, hkv, hq // hkv, d) * k[:, :, :, None, :]).sum(-1) * scale  # [B, T, Hkv, G]
    probs = torch.softmax(scores.masked_fill(~visible[:, :, None, None], float("-inf")), dim=1)
    out = (probs[..., None] * v[:, :, :, None, :]).sum(1)  # [B, Hkv, G, D]
    return out.reshape(b, hq, d).to(q.dtype)


def sdpa_attention(q: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor,
                   visible: torch.Tensor, scale: float) -> torch.Tensor:
    """`cached_attention` through the eager step's SDPA path (`gqa_decode`), for wide batches on a CPU:
    the rows are gathered ([B, T, Hkv, D] copies) and handed to it as they are."""
    keys, values = cache
    t = visible.shape[1]
    rows = (keys[slots, :t], values[slots, :t])  # [B, T, Hkv, D] each
    return gqa_decode(q, rows, lambda kv: kv, visible[:, None, None, :], scale)


def gathered_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor, kernel: bool = False, grouped: bool = False) -> torch.Tensor:
    """Routed experts of B tokens, weights gathered by id: x [B, H], ids/weights [B, K],
    gate_up [E, 2I, H] (gate rows first), down [E, H, I], in x's dtype or a narrow copy -> [B, H].
    Same math as dispatch -> store.run -> combine: silu(gate) * up, down, weight, sum over k. Narrow
    copies with `kernel` (from KERNEL_MIN_BYTES, or any size when `grouped`): the AVX-512 kernel
    (bf16_gemv.py), the rows sorted by expert so that each expert's weights are read once."""
    b, k = ids.shape
    if kernel and gate_up.dtype != x.dtype and (grouped or worth_the_kernel(gate_up[0])):
        # the (token, k) rows sorted by expert: each expert's weights are read once for all its rows
        flat = ids.reshape(-1)  # [B*K]
        order = torch.argsort(flat, stable=True)  # [B*K]
        counts = (flat[:, None] == torch.arange(gate_up.shape[0], device=flat.device)).sum(0)  # [E], no sync
        offsets = F.pad(counts.cumsum(0), (1, 0))  # [E + 1]
        xs = x.index_select(0, torch.div(order, k, rounding_mode="floor"))  # [B*K, H] sorted by expert
        gate, up = grouped_gemm(gate_up, xs, offsets).chunk(2, dim=-1)
        ys = grouped_gemm(down, F.silu(gate) * up, offsets)  # [B*K, H], sorted
        y = torch.empty_like(ys).index_copy_(0, order, ys).view(b, k, -1)  # [B, K, H]
    else:
        gu = (gate_up[ids].to(x.dtype) * x[:, None, None, :]).sum(-1)  # [B, K, 2I]
        gate, up = gu.chunk(2, dim=-1)
        y = (down[ids].to(x.dtype) * (F.silu(gate) * up)[:, :, None, :]).sum(-1)  # [B, K, H]
    return (y * weights[..., None]).sum(1).to(x.dtype)
