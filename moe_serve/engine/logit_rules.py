"""OpenAI's logit_bias and vLLM's min_tokens, applied to the logits the sampler draws from.

  logit_bias: logit[t] += bias[t] for each token t the request names (values in [-100, 100]);
  min_tokens: while a sequence has fewer output tokens than min_tokens, its end-of-sequence tokens
              (unless ignore_eos) and stop_token_ids get -inf, so it cannot end early.
Like penalties (penalties.py), they change what is sampled, not the logprobs reported (vLLM's raw
logprobs), and only the rows of requests that ask are touched.
"""
from __future__ import annotations

import torch


def needs_logit_rules(params) -> bool:
    return params.logit_bias is not None or params.min_tokens > 0


def apply_logit_rules(
    logits: torch.Tensor,  # [S, V] next-token logits (float32, the caller's own copy or not)
    rows: list[int],  # [R] the rows with a logit_bias or min_tokens
    seqs: list,  # [R] their sequences (params, output_ids)
    eos_token_ids: set[int],  # the model's end-of-sequence tokens
) -> torch.Tensor:
    """A float32 copy of `logits` with the rules of `rows` applied ([S, V]); `logits` is left as it was."""
    x = logits.float()
    if x is logits:
        x = x.clone()
    V = x.shape[1]
    for r, seq in zip(rows, seqs):
        p = seq.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=x.device)
            x[r, ids] += torch.tensor(list(p.logit_bias.values()), device=x.device, dtype=x.dtype)
        if len(seq.output_ids) < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            banned = [t for t in banned if t < V]
            if banned:
                x[r, torch.tensor(banned, device=x.device)] = float("-inf")
    return x
