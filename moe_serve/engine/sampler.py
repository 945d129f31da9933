"""Batched sampling: greedy, temperature, top-k and top-p, one seeded generator per request.

Every row is processed with tensor ops over the whole batch; the only Python loop is one uniform
draw per sampled sequence, taken from that request's own generator, so a seeded request draws the
same numbers whatever else shares its batch. Its tokens are the same too as long as the logits are,
and a matmul's rounding can depend on the batch's shape (other kernels, other summation orders): in
fp32 by far less than the gaps decoding meets in practice (the continuous-batching tests compare
requests run alone and together), in bf16 enough to flip a near-tie now and then, as in every
engine that batches.
"""
from __future__ import annotations

import torch

from moe_serve.engine.sampling_params import SamplingParams


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample(
    logits: torch.Tensor,  # [S, V] next-token logits of S sequences
    params: list[SamplingParams],  # [S]
    generators: list[torch.Generator | None],  # [S] (None for greedy rows)
) -> list[int]:
    """One token id per sequence."""
    greedy_rows = [p.greedy for p in params]
    if all(greedy_rows):
        return logits.argmax(dim=-1).tolist()
    x = logits.float()
    S, V = x.shape
    dev = x.device
    temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)
    x = x / temps[:, None]
    sorted_x, sorted_idx = x.sort(dim=-1, descending=True)  # [S, V]
    # a top_k over the vocabulary is no cut; clamping also keeps huge values (2**63) out of int64
    ks = torch.tensor([min(p.effective_top_k or V, V) for p in params], device=dev)
    rank = torch.arange(V, device=dev)
    sorted_x = sorted_x.masked_fill(rank[None, :] >= ks[:, None], float("-inf"))
    probs = sorted_x.softmax(dim=-1)  # [S, V]
    top_ps = torch.tensor([p.top_p for p in params], device=dev)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
    # the first token always survives, also when top_p underflows to 0 in float32 (1e-300)
    probs = probs.masked_fill((before >= top_ps[:, None]) & (rank[None, :] > 0), 0.0)
    cdf = probs.cumsum(dim=-1)  # [S, V] unnormalized
    u = torch.stack([
        torch.rand((), generator=g, device=dev) if g is not None else torch.zeros((), device=dev)
        for g in generators
    ])  # [S]
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=V - 1)  # [S, 1]
    sampled = sorted_idx.gather(1, pick).squeeze(1)  # [S]
    greedy = logits.argmax(dim=-1)
    mask = torch.tensor(greedy_rows, device=dev)
    return torch.where(mask, greedy, sampled).tolist()
