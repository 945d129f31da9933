"""Small building blocks: RMSNorm, the gated MLP (dense layers, shared experts), GQA attention.

Modules are built on the meta device and get their weights by `load_state_dict(assign=True)`; the
parameter names are transformers' in-memory names, so the loader's key map stays a few renames.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_serve.models.attention import StepMeta, attend
from moe_serve.models.rope import apply_rope
from moe_serve.models.spec import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as transformers: normalize in fp32, cast back, then scale in the activation dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def linear(i: int, o: int, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(i, o, bias=bias)
    lin.requires_grad_(False)
    return lin


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)): dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(hidden, inter), linear(hidden, inter), linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GQAttention(nn.Module):
    """Grouped-query attention (Mixtral, Qwen2/3-MoE, OLMoE); cache rows are K and V [N, Hkv, D]."""

    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        s = spec
        self.nh, self.nkv, self.hd = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_proj = linear(s.hidden_size, s.num_heads * s.head_dim, s.qkv_bias)
        self.k_proj = linear(s.hidden_size, s.num_kv_heads * s.head_dim, s.qkv_bias)
        self.v_proj = linear(s.hidden_size, s.num_kv_heads * s.head_dim, s.qkv_bias)
        self.o_proj = linear(s.num_heads * s.head_dim, s.hidden_size, s.o_bias)
        self.qk_norm = s.qk_norm
        if s.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps), RMSNorm(s.head_dim, s.rms_norm_eps)
        elif s.qk_norm == "full":
            self.q_norm = RMSNorm(s.num_heads * s.head_dim, s.rms_norm_eps)
            self.k_norm = RMSNorm(s.num_kv_heads * s.head_dim, s.rms_norm_eps)
        self.clip = s.clip_qkv
        self.scale, self.window, self.rope_mode = s.attn_scale, s.window(layer), s.rope_mode

    def cache_shapes(self, num_slots: int, max_len: int) -> list[tuple[int, ...]]:
        return [(num_slots, max_len, self.nkv, self.hd)] * 2

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMeta,
                cache: tuple[torch.Tensor, ...]) -> torch.Tensor:  # x [N, H]
        n = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [N, Hq*D], [N, Hkv*D] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = q.view(n, self.nh, self.hd), k.view(n, self.nkv, self.hd), v.view(n, self.nkv, self.hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin, self.rope_mode), apply_rope(k, cos, sin, self.rope_mode)
        o = attend(q, (k, v), cache, lambda rows: rows, meta, self.scale, self.window, self.hd)  # [N, Hq, D]
        return self.o_proj(o.reshape(n, self.nh * self.hd))
