"""bf16 copies of fp32 weights, for the compiled decode step (models/compiled.py).

A bf16 checkpoint computed in fp32 holds fp32 weights whose every value is a bf16 value. The compiled
step can read a bf16 copy of such a weight and widen each value as it loads it: the same products
from half the bytes. Eager matmuls cannot mix dtypes, so the eager model keeps the fp32 weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_serve.models.bf16_gemv import grouped_gemm


def narrow_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """A bf16 copy of an fp32 weight whose every value is a bf16 value, else None."""
    if weight.dtype != torch.float32:
        return None
    narrow = weight.to(torch.bfloat16)
    return narrow if torch.equal(narrow.float(), weight) else None


class NarrowCopies:
    """`narrow_copy` of each weight the step reads, made once per source tensor (a projection
    replaced later gets a copy of its own; the copy stands in only for the tensor it was made from)."""

    def __init__(self):
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # id(source) -> (source, copy)

    def __contains__(self, weight: torch.Tensor) -> bool:
        """Whether a copy of `weight` (or the finding that it has none) was already made."""
        hit = self._copies.get(id(weight))
        return hit is not None and hit[0] is weight

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        """The bf16 copy of `weight`, or `weight` itself when it has none (not fp32, or not all bf16 values)."""
        hit = self._copies.get(id(weight))
        if hit is None or hit[0] is not weight:
            hit = self._copies[id(weight)] = (weight, narrow_copy(weight))
        return weight if hit[1] is None else hit[1]


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   kernel: bool = False) -> torch.Tensor:
    """F.linear for x [N, in] and weight [out, in] in x's dtype or a narrow copy; a narrow one is
    widened as each value loads, one reduction per output row (F.linear cannot mix dtypes, and a
    widened copy would cost more bytes than the fp32 weight): by the AVX-512 kernel with `kernel`
    (bf16_gemv.py), else by inductor's loop. Inside a compiled step only (eager, the reduction would
    materialise the products), and at N = 1: it reads the weight once per row of x."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if kernel and worth_the_kernel(weight):
        rows = torch.arange(2, device=x.device) * x.shape[0]  # [0, N]: every row of x for the one weight
        y = grouped_gemm(weight[None], x, rows)  # [N, out]
    else:
        y = (weight.to(x.dtype) * x[:, None, :]).sum(-1)  # [N, out]
    return y if bias is None else y + bias


KERNEL_MIN_BYTES = 4 << 20


def worth_the_kernel(weight: torch.Tensor) -> bool:
    """Whether a narrow [out, in] weight goes through the AVX-512 kernel rather than inductor's fused
    loop: from KERNEL_MIN_BYTES up. Smaller ones stay in cache between steps, where the fused loop
    (no call, no second pass over x) is faster: the default model's batch-1 step (256 KB experts)
    took 744-763 us with the kernel, 637-658 without."""
    return weight.numel() * weight.element_size() >= KERNEL_MIN_BYTES


def kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`widened_linear` through the AVX-512 kernel (the `linear` a compiled step hands the attention)."""
    return widened_linear(x, weight, bias, kernel=True)
