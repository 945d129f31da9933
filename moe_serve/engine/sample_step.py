"""One step's sampling for the sequences that get a token: (penalties,) sample, (logprobs).

`extras` is the engine's "a live request asks for logprobs, penalties, logit_bias or min_tokens": while
it is False this is `sample` alone, so the default decode path does no extra work per step.
"""
from __future__ import annotations

import torch

from moe_serve.engine.logit_rules import apply_logit_rules, needs_logit_rules
from moe_serve.engine.logprobs import TokenLogprob, token_logprobs
from moe_serve.engine.penalties import apply_penalties
from moe_serve.engine.sampler import sample


def sample_rows(logits: torch.Tensor, seqs: list, extras: bool,
                eos_token_ids: set[int] = frozenset()) -> tuple[list[int], list[TokenLogprob | None] | None]:
    """logits [S, V] of S sequences -> (a token per row, a TokenLogprob or None per row, or None when no
    row asked for logprobs). Penalties, logit_bias and min_tokens (logit_rules.py) change what is
    sampled; logprobs are taken from the raw logits, before any of them (vLLM's default)."""
    params, gens = [s.params for s in seqs], [s.generator for s in seqs]
    if not extras:
        return sample(logits, params, gens), None
    raw = logits
    penalized = [i for i, p in enumerate(params) if p.penalized]
    if penalized:
        logits = apply_penalties(logits, penalized, [seqs[i] for i in penalized])
    ruled = [i for i, p in enumerate(params) if needs_logit_rules(p)]
    if ruled:
        logits = apply_logit_rules(logits, ruled, [seqs[i] for i in ruled], eos_token_ids)
    tokens = sample(logits, params, gens)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return tokens, None
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    for r, lp in zip(rows, token_logprobs(raw, rows, tokens, [params[r].logprobs for r in rows])):
        logprobs[r] = lp
    return tokens, logprobs
