"""Log-probabilities of the sampled tokens and of the most likely ones, for requests that ask (logprobs=N).

As vLLM's default ("raw" logprobs), the values are the log_softmax of the model's logits for that step,
before penalties, temperature, top-k and top-p: what the model thinks, not what the sampler drew from.
Computed only for the rows that asked, in one batched pass (log_softmax, topk, gather, rank), and
moved to Python once per step; a step where nobody asked does none of this (see LLMEngine._sample).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_serve.engine.sampling_params import MAX_LOGPROBS  # noqa: F401 - the limit lives with the field


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log-probabilities. Frozen: every output of a stream holds the same objects
    (outputs.Prefix copies the list, not its items), so one consumer's change must not show in another's."""

    token_id: int  # the sampled token
    logprob: float  # its log-probability
    rank: int  # 1 = the most likely token; ties share the best rank
    top: tuple[tuple[int, float], ...]  # the request's `logprobs` most likely (token id, logprob), most likely first


def token_logprobs(
    logits: torch.Tensor,  # [S, V] raw next-token logits
    rows: list[int],  # [R] the rows that asked for logprobs
    tokens: list[int],  # [S] the token sampled for every row
    ks: list[int],  # [R] how many top log-probabilities each of those rows wants (0..MAX_LOGPROBS)
) -> list[TokenLogprob]:
    """One TokenLogprob per row in `rows`, in that order."""
    idx = torch.tensor(rows, device=logits.device)
    lp = logits.index_select(0, idx).float().log_softmax(dim=-1)  # [R, V]
    chosen = torch.tensor([tokens[r] for r in rows], device=logits.device)  # [R]
    chosen_lp = lp.gather(1, chosen[:, None])  # [R, 1]
    ranks = (lp > chosen_lp).sum(dim=-1) + 1  # [R]
    k = min(max(ks), lp.shape[-1])
    if k > 0:
        top_lp, top_ids = lp.topk(k, dim=-1)  # [R, k], most likely first
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    else:
        top_lp = top_ids = [[] for _ in rows]
    chosen_lp, ranks = chosen_lp.squeeze(1).tolist(), ranks.tolist()
    return [TokenLogprob(token_id=tokens[r], logprob=chosen_lp[j], rank=ranks[j],
                         top=tuple(zip(top_ids[j][:ks[j]], top_lp[j][:ks[j]])))
            for j, r in enumerate(rows)]
