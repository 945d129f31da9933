"""Tensor parallelism applied to a loaded MoEModel in place: attention heads, dense MLPs, shared experts.

Column-parallel pieces (q/k/v, gate/up, MLA's q_b/kv_b) keep this rank's rows; row-parallel pieces
(o_proj, down_proj) keep its columns and their partial outputs are summed over the TP group. The
model's code is untouched: modules get smaller weights and local head counts, `o_proj`/`down_proj`
become `RowParallelLinear`, and the MoE block is wrapped in `ReduceAfter` so that the routed experts'
and the shared expert's partial sums cross the wire in ONE all-reduce per MoE layer.
Embeddings, routers and the LM head stay replicated (no vocab parallelism yet).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_serve.distributed.sizes import kv_heads_split, tp_error
from moe_serve.models.layers import MLP, GQAttention, RMSNorm
from moe_serve.models.mla import MLAttention
from moe_serve.models.moe import MoEBlock


def _part(n: int, tp: int, rank: int, what: str) -> slice:
    if n % tp:
        raise ValueError(tp_error(what, n, tp))
    k = n // tp
    return slice(rank * k, (rank + 1) * k)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=False)


class RowParallelLinear(nn.Module):
    """y = x_shard @ W_shard^T (+ bias on TP rank 0 only), then summed over the group by `reduce`."""

    def __init__(self, lin: nn.Linear, cols: slice, keep_bias: bool, reduce=None):
        super().__init__()
        self.weight = _param(lin.weight[:, cols])
        self.bias = _param(lin.bias) if (lin.bias is not None and keep_bias) else None
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return self.reduce(y) if self.reduce is not None else y


class ReduceAfter(nn.Module):
    """Run `inner`, then sum its (partial) output over the group."""

    def __init__(self, inner: nn.Module, reduce):
        super().__init__()
        self.inner, self.reduce = inner, reduce

    def forward(self, *args):
        return self.reduce(self.inner(*args))


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a dimension split across TP ranks (OLMoE's q/k norm over the whole projection)."""

    def __init__(self, norm: RMSNorm, part: slice, full_dim: int, reduce):
        super().__init__()
        self.weight, self.eps, self.full_dim, self.reduce = _param(norm.weight[part]), norm.eps, full_dim, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        ss = self.reduce(h.pow(2).sum(-1, keepdim=True).contiguous())  # [.., 1] sum over all ranks' columns
        h = h * torch.rsqrt(ss / self.full_dim + self.eps)
        return self.weight * h.to(x.dtype)


def _rows(lin: nn.Linear, rows) -> None:
    lin.weight = _param(lin.weight[rows])
    if lin.bias is not None:
        lin.bias = _param(lin.bias[rows])
    lin.out_features = lin.weight.shape[0]


def _head_rows(n_heads: int, head_dim: int, heads: slice) -> slice:
    return slice(heads.start * head_dim, heads.stop * head_dim)


def shard_gqa(a: GQAttention, tp: int, r: int, reduce) -> None:
    heads = _part(a.nh, tp, r, "num_attention_heads")
    if kv_heads_split(a.nh, a.nkv, tp, a.qk_norm):  # the frontend's check (sizes.check_shardable) decides alike
        kv = _part(a.nkv, tp, r, "num_key_value_heads")
    else:  # fewer KV heads than ranks: each rank keeps the one it reads
        group = a.nh // a.nkv
        first = heads.start // group
        kv = slice(first, first + 1)
    full_q, full_k = a.nh * a.hd, a.nkv * a.hd
    _rows(a.q_proj, _head_rows(a.nh, a.hd, heads))
    _rows(a.k_proj, _head_rows(a.nkv, a.hd, kv))
    _rows(a.v_proj, _head_rows(a.nkv, a.hd, kv))
    if a.qk_norm == "full":
        a.q_norm = ShardedRMSNorm(a.q_norm, _head_rows(a.nh, a.hd, heads), full_q, reduce)
        a.k_norm = ShardedRMSNorm(a.k_norm, _head_rows(a.nkv, a.hd, kv), full_k, reduce)
    a.o_proj = RowParallelLinear(a.o_proj, _head_rows(a.nh, a.hd, heads), keep_bias=r == 0, reduce=reduce)
    a.nh, a.nkv = heads.stop - heads.start, kv.stop - kv.start
    a.fuse_projections()


def shard_mla(a: MLAttention, tp: int, r: int, reduce) -> None:
    m = a.m
    heads = _part(a.nh, tp, r, "num_attention_heads")
    _rows(a.q_proj if m.q_lora_rank is None else a.q_b_proj, _head_rows(a.nh, m.qk_head_dim, heads))
    _rows(a.kv_b_proj, _head_rows(a.nh, m.qk_nope_head_dim + m.v_head_dim, heads))
    a.o_proj = RowParallelLinear(a.o_proj, _head_rows(a.nh, m.v_head_dim, heads), keep_bias=r == 0, reduce=reduce)
    a.nh = heads.stop - heads.start


def shard_mlp(mlp: MLP, tp: int, r: int, reduce) -> None:
    """Column-split gate/up, row-split down; `reduce=None` leaves the output a partial sum."""
    inter = _part(mlp.gate_proj.weight.shape[0], tp, r, "intermediate_size")
    _rows(mlp.gate_proj, inter)
    _rows(mlp.up_proj, inter)
    mlp.down_proj = RowParallelLinear(mlp.down_proj, inter, keep_bias=r == 0, reduce=reduce)


def apply_tp(model, tp: int, rank: int, reduce) -> None:
    """Shard every layer of `model` for TP rank `rank` of `tp`; MoE blocks end in one all-reduce.

    The MoE block's routed part must already return partial sums over the same group (the EP
    dispatcher under TP attention does); the shared expert is split here without its own reduce.
    """
    for layer in model.layers:
        attn = layer.self_attn
        (shard_mla if isinstance(attn, MLAttention) else shard_gqa)(attn, tp, rank, reduce)
        if isinstance(layer.mlp, MoEBlock):
            if hasattr(layer.mlp, "shared_expert"):
                shard_mlp(layer.mlp.shared_expert, tp, rank, None)
            layer.mlp = ReduceAfter(layer.mlp, reduce)
        else:
            shard_mlp(layer.mlp, tp, rank, reduce)
