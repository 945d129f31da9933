"""bf16 copies of fp32 weights, for the compiled decode step (models/compiled.py).

A bf16 checkpoint computed in fp32 holds fp32 weights whose every value is a bf16 value. The compiled
step can read a bf16 copy of such a weight and widen each value as it loads it: the same products
from half the bytes. Eager matmuls cannot mix dtypes, so the eager model keeps the fp32 weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for x [N, in] and weight [out, in] in x's dtype or a narrow copy; a narrow one is
    widened as each value loads, one reduction per output row (F.linear cannot mix dtypes, and a
    widened copy would cost more bytes than the fp32 weight). Inside a compiled step only (eager, the
    reduction would materialise the products), and at N = 1: it reads the weight once per row of x."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    y = (weight.to(x.dtype) * x[:, None, :]).sum(-1)  # [N, out]
    return y if bias is None else y + bias
