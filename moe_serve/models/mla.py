"""DeepSeek multi-head latent attention (MLA).

The KV cache holds, per token, the normalized latent c_kv [kv_lora_rank] and the roped shared key
k_pe [qk_rope_head_dim] (what transformers caches too): 576 values per token and layer for V3
instead of 2 * 128 heads * 192. Attention expands the gathered latents with kv_b_proj into per-head
K_nope and V, as transformers does, so fp32 results agree to rounding.

Decodes attend in the latent space instead (DeepSeek's "absorbed" form): q_nope is mapped through
kv_b_proj's key block into the latent, scores are q_lat . c + q_pe . k_pe, the weighted latents are
mapped through the value block. The same math with no per-step expansion of the whole cache (that
costs T x C x H x (Dnope + Dv) per layer and step: ~100x more at a few thousand cached tokens for
V2-Lite), and no per-head K/V: every head reads the one latent row per token.
"""
from __future__ import annotations

import torch
from torch import nn

from moe_serve.models.attention import StepMeta, attend
from moe_serve.models.layers import RMSNorm, linear
from moe_serve.models.rope import apply_rope
from moe_serve.models.spec import ModelSpec

LORA_NORM_EPS = 1e-6  # transformers (and DeepSeek's reference) build q_a/kv_a norms with the default eps


class MLAttention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        m, h, self.nh = spec.mla, spec.hidden_size, spec.num_heads
        self.m = m
        if m.q_lora_rank is None:
            self.q_proj = linear(h, self.nh * m.qk_head_dim)
        else:
            self.q_a_proj = linear(h, m.q_lora_rank, spec.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = linear(m.q_lora_rank, self.nh * m.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(h, m.kv_lora_rank + m.qk_rope_head_dim, spec.qkv_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = linear(m.kv_lora_rank, self.nh * (m.qk_nope_head_dim + m.v_head_dim))
        self.o_proj = linear(self.nh * m.v_head_dim, h, spec.o_bias)
        self.scale, self.rope_mode = spec.attn_scale, spec.rope_mode
        self.absorb_decode = True  # False: decodes expand the cache too (transformers' op order, bf16 bit-exact)

    def cache_shapes(self, num_slots: int, max_len: int) -> list[tuple[int, ...]]:
        return [(num_slots, max_len, self.m.kv_lora_rank), (num_slots, max_len, self.m.qk_rope_head_dim)]

    def _expand(self, rows: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        c, k_pe = rows  # [B, T, C], [B, T, R]
        b, t, _ = c.shape
        m = self.m
        kv = self.kv_b_proj(c).view(b, t, self.nh, m.qk_nope_head_dim + m.v_head_dim)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(b, t, self.nh, m.qk_rope_head_dim)), dim=-1)
        return k, v  # [B, T, H, Dqk], [B, T, H, Dv]

    def _absorbed_decode(self, qd: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor],
                         mask: torch.Tensor | None) -> torch.Tensor:
        """qd [B, H, Dnope+R] (roped part last), rows: latents c [B, T, C] and roped k_pe [B, T, R]
        -> [B, H, Dv]. Computed in fp32 (reduced-precision inputs upcast): the latent query and
        scores never round to bf16, so this is at least as accurate as the expanded form."""
        m, dtype = self.m, qd.dtype
        c, k_pe = rows[0].float(), rows[1].float()
        w = self.kv_b_proj.weight.float().view(self.nh, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)  # [H, Dn+Dv, C]
        q_nope, q_pe = qd.float().split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w[:, : m.qk_nope_head_dim]).transpose(0, 1)  # [B, H, C]
        scores = torch.baddbmm(torch.bmm(q_pe, k_pe.transpose(1, 2)), q_lat, c.transpose(1, 2))  # [B, H, T]
        scores = scores * self.scale
        if mask is not None:  # [B, 1, 1, T]: padded keys of shorter sequences
            scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        o_lat = torch.bmm(scores.softmax(-1), c)  # [B, H, C]
        o = torch.bmm(o_lat.transpose(0, 1), w[:, m.qk_nope_head_dim:].transpose(1, 2)).transpose(0, 1)  # [B, H, Dv]
        return o if o.dtype == dtype else o.to(dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMeta,
                cache: tuple[torch.Tensor, ...]) -> torch.Tensor:  # x [N, H]
        n, m = x.shape[0], self.m
        if m.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(n, self.nh, m.qk_head_dim)
        q_nope, q_pe = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        c = self.kv_a_layernorm(c)  # [N, C]
        q_pe = apply_rope(q_pe, cos, sin, self.rope_mode)
        k_pe = apply_rope(k_pe[:, None, :], cos, sin, self.rope_mode)[:, 0]  # [N, R]
        q = torch.cat((q_nope, q_pe), dim=-1)  # [N, H, Dqk]
        o = attend(q, (c, k_pe), cache, self._expand, meta, self.scale, None, m.v_head_dim,
                   decode=self._absorbed_decode if self.absorb_decode else None)  # [N, H, Dv]
        return self.o_proj(o.reshape(n, self.nh * m.v_head_dim))
