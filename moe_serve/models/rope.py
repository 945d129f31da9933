"""Rotary position embeddings: default, linear, YaRN and llama3 frequency rules; half or pair rotation.

Numerics follow transformers: inverse frequencies in fp32, cos/sin of `position * inv_freq` times the
attention factor, cast to the activation dtype, then `x * cos + rotate(x) * sin` in that dtype.
"""
from __future__ import annotations

import math

import torch

from moe_serve.models.spec import RopeSpec


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [dim/2]


def _yarn(r: RopeSpec) -> tuple[torch.Tensor, float]:
    dim, base, factor = r.dim, r.theta, r.factor

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = r.attention_factor
    if attn is None:
        if r.mscale and r.mscale_all_dim:
            attn = float(get_mscale(factor, r.mscale) / get_mscale(factor, r.mscale_all_dim))
        else:
            attn = get_mscale(factor)

    def corr_dim(rot):
        return (dim * math.log(r.original_max_position_embeddings / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(r.beta_fast), corr_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return inter * (1 - keep) + extra * keep, float(attn)


def _llama3(r: RopeSpec) -> torch.Tensor:
    inv = _base_inv_freq(r.theta, r.dim)
    old = r.original_max_position_embeddings
    low_wl, high_wl = old / r.low_freq_factor, old / r.high_freq_factor
    wl = 2 * math.pi / inv
    out = torch.where(wl > low_wl, inv / r.factor, inv)
    smooth = (old / wl - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * out / r.factor + smooth * out
    medium = ~(wl < high_wl) * ~(wl > low_wl)
    return torch.where(medium, smoothed, out)


def inv_freq_and_scale(r: RopeSpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (fp32) and the factor applied to cos/sin."""
    if r.kind == "default":
        return _base_inv_freq(r.theta, r.dim), 1.0
    if r.kind == "linear":
        return _base_inv_freq(r.theta, r.dim) / r.factor, 1.0
    if r.kind == "yarn":
        return _yarn(r)
    if r.kind == "llama3":
        return _llama3(r), 1.0
    raise ValueError(f"rope kind {r.kind!r} is not supported")


class Rotary:
    """The step's rotation table, computed once per forward and shared by every layer.

    `mode`: "half" (rotate_half, Llama/Mixtral/Qwen/OLMoE), "pairs" (adjacent pairs, DeepSeek-V3),
    "complex" (adjacent pairs as complex numbers in fp32, DeepSeek-V2 as transformers computes it)."""

    def __init__(self, spec: RopeSpec, device):
        inv, self.scale = inv_freq_and_scale(spec)
        self.inv_freq = inv.to(device)  # [dim/2] fp32
        self.mode = "complex" if spec.complex_fp32 else ("pairs" if spec.interleaved else "half")

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cos, sin) [N, dim] in `dtype`; in complex mode (freqs_cis [N, dim/2] complex64, None)."""
        freqs = positions[:, None].float() * self.inv_freq  # [N, dim/2]
        if self.mode == "complex":
            return torch.polar(torch.ones_like(freqs), freqs) * self.scale, None
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, dim]
        cos, sin = emb.cos(), emb.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return (cos, sin) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None, mode: str) -> torch.Tensor:
    """x [N, heads, dim] rotated by the table from `Rotary.cos_sin` (see Rotary for the modes).

    "pairs" returns the rotated pairs de-interleaved ([evens' | odds']) and "complex" keeps them
    interleaved, exactly as transformers' DeepSeek-V3 / -V2 do; q and k always get the same layout,
    so attention scores do not depend on it."""
    if mode == "complex":
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [N, heads, dim/2]
        return torch.view_as_real(xc * cos[:, None, :]).flatten(-2).type_as(x)
    cos, sin = cos[:, None, :], sin[:, None, :]
    if mode == "half":
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
