"""Small building blocks: RMSNorm, the gated MLP (dense layers, shared experts), GQA attention.

Modules are built on the meta device and get their weights by `load_state_dict(assign=True)`; the
parameter names are transformers' in-memory names, so the loader's key map stays a few renames.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from moe_serve.models.attention import StepMeta, attend
from moe_serve.models.rope import apply_rope
from moe_serve.models.spec import ModelSpec


@functools.lru_cache(maxsize=None)
def fp32_constant(value: float, device: torch.device) -> torch.Tensor:
    """A 0-dim fp32 tensor: a Python scalar operand is wrapped into a tensor on every call (~2 us on
    this CPU), a tensor one is not; the arithmetic (fp32, the same rounded value) is unchanged."""
    with torch.inference_mode(False):  # a normal tensor, usable inside and outside inference mode
        return torch.tensor(value, dtype=torch.float32, device=device)


def scalar_operand(value: float, device: torch.device) -> torch.Tensor | float:
    """`fp32_constant` in eager mode; the plain float inside a torch.compile trace (it folds into the
    kernel, and dynamo would only trace through the cache)."""
    return value if torch.compiler.is_compiling() else fp32_constant(value, device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers: normalize in fp32, cast back, then scale in the activation dtype.
    `weight` broadcasts over x's trailing dims ([D], or [heads, D] for several norms at once).
    Same ops and bits as `h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)` (mean is sum then a
    divide; pow(2) is h*h), with the scalars as tensors and the temporaries reused."""
    h = x if x.dtype == torch.float32 else x.float()
    mean_sq = (h * h).sum(-1, keepdim=True).div_(scalar_operand(float(h.shape[-1]), h.device))
    normed = torch.mul(h, torch.rsqrt(mean_sq.add_(scalar_operand(eps, h.device))))
    if x.dtype == torch.float32:  # the casts are no-ops: skip their dispatch (decode is op-bound)
        return normed.mul_(weight) if weight.dim() <= normed.dim() and weight.dtype == normed.dtype else weight * normed
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


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
        self._fused_key, self._fused_src, self._fused = None, None, None

    def cache_shapes(self, num_slots: int, max_len: int) -> list[tuple[int, ...]]:
        return [(num_slots, max_len, self.nkv, self.hd)] * 2

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(qkv weight [(Hq+2Hkv)*D, H], its bias or None, per-head q|k norm weight [Hq+Hkv, D] or None).

        One matmul instead of three (each output column is the same dot product: same bits), and
        with per-head q/k norms one norm and one rotation over q and k together. Built on first use
        and rebuilt when a projection is replaced (tensor-parallel sharding swaps them)."""
        src = self._fusion_sources()
        if src[0] != self._fused_key:
            projs = (self.q_proj, self.k_proj, self.v_proj)
            bias = torch.cat([p.bias for p in projs]) if self.q_proj.bias is not None else None
            norm = None
            if self.qk_norm == "head":
                norm = torch.cat([self.q_norm.weight.expand(self.nh, -1), self.k_norm.weight.expand(self.nkv, -1)])
            self._fused = (torch.cat([p.weight for p in projs]), bias, norm)
            self._fused_key, self._fused_src = src
        return self._fused

    def fuse_projections(self) -> None:
        """Keep q, k, v weights (and biases) as row views of the fused tensor: one copy in memory."""
        weight, bias, _ = self.fused_weights()
        nq, nk = self.nh * self.hd, self.nkv * self.hd
        for proj, rows in ((self.q_proj, slice(0, nq)), (self.k_proj, slice(nq, nq + nk)),
                           (self.v_proj, slice(nq + nk, nq + 2 * nk))):
            proj.weight = nn.Parameter(weight[rows], requires_grad=False)
            if bias is not None:
                proj.bias = nn.Parameter(bias[rows], requires_grad=False)
        self._fused_key, self._fused_src = self._fusion_sources()

    def _fusion_sources(self) -> tuple[tuple, list]:
        """(key, sources): what the fused tensors are built from. The key holds the source tensors'
        ids (a new object means the fused copy is stale; `_fused_src` keeps the old ones alive, so
        an id is never reused while compared) and the head counts by value. Read straight from the
        parameter dicts: this runs every forward, and nn.Module attribute lookups cost ~1 us each."""
        mods = self._modules
        names = ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm") if self.qk_norm == "head" else ("q_proj", "k_proj", "v_proj")
        objs = [mods[n]._parameters["weight"] for n in names]
        return (*map(id, objs), self.nh, self.nkv), objs

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMeta,
                cache: tuple[torch.Tensor, ...]) -> torch.Tensor:  # x [N, H]
        q, k, v = self.project(x, cos, sin)
        o = attend(q, (k, v), cache, lambda rows: rows, meta, self.scale, self.window, self.hd)  # [N, Hq, D]
        return self.o_proj(o.reshape(x.shape[0], self.nh * self.hd))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused=None,
                linear=F.linear) -> tuple[torch.Tensor, ...]:
        """x [N, H] -> q [N, Hq, D], k [N, Hkv, D] (normed as the family says, rotated), v [N, Hkv, D].
        `fused`: `fused_weights()` when the caller already has it (a compiled step takes it as input,
        with its `linear` that also reads a narrow copy of the weight)."""
        n, nh, nkv, hd = x.shape[0], self.nh, self.nkv, self.hd
        weight, bias, qk_norm_weight = fused if fused is not None else self.fused_weights()
        qkv = linear(x, weight, bias)  # [N, (Hq + 2 Hkv) * D]
        nq, nk = nh * hd, nkv * hd
        if self.qk_norm == "full":  # norms over the whole projections, before the clip (OLMoE)
            q, k, v = self.q_norm(qkv[:, :nq]), self.k_norm(qkv[:, nq:nq + nk]), qkv[:, nq + nk:]
            if self.clip is not None:
                q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
            q = apply_rope(q.view(n, nh, hd), cos, sin, self.rope_mode)
            k = apply_rope(k.view(n, nkv, hd), cos, sin, self.rope_mode)
        else:
            if self.clip is not None:
                qkv = qkv.clamp(-self.clip, self.clip)
            qk = qkv[:, :nq + nk].view(n, nh + nkv, hd)  # q heads then k heads
            if qk_norm_weight is not None:
                qk = rms_norm(qk, qk_norm_weight, self.q_norm.eps)
            qk = apply_rope(qk, cos, sin, self.rope_mode)
            q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nq + nk:]
        return q, k, v.view(n, nkv, hd)
