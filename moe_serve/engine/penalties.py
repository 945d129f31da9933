"""Presence, frequency (OpenAI's) and repetition (vLLM's, after CTRL) penalties, applied to logits.

For a sequence with output-token counts c[t] (prompt excluded) and prompt tokens P, vLLM's order:
  repetition: for t in P or with c[t] > 0: logit /= r if logit > 0 else logit *= r
  frequency:  logit -= frequency_penalty * c[t]
  presence:   logit -= presence_penalty * (c[t] > 0)
Only the rows of requests that ask are touched; the counts are built from each sequence's token lists
in one bincount per row, a cost paid only while such a request runs (see sample_step.py).
"""
from __future__ import annotations

import torch


def apply_penalties(
    logits: torch.Tensor,  # [S, V] next-token logits
    rows: list[int],  # [R] the rows with a penalty
    seqs: list,  # [R] their sequences (prompt_ids, output_ids, params)
) -> torch.Tensor:
    """A float32 copy of `logits` with the penalties of `rows` applied ([S, V]); `logits` is left as it was."""
    x = logits.float()
    if x is logits:
        x = x.clone()
    V, dev = x.shape[1], x.device
    counts = torch.zeros(len(rows), V, device=dev)  # [R, V] output-token counts
    seen = torch.zeros(len(rows), V, dtype=torch.bool, device=dev)  # [R, V] in the prompt or the output
    for j, seq in enumerate(seqs):
        if seq.output_ids:
            counts[j] = torch.bincount(torch.tensor(seq.output_ids, device=dev), minlength=V)[:V].float()
        if seq.params.repetition_penalty != 1.0:
            seen[j, torch.tensor(seq.prompt_ids, device=dev)] = True
    seen |= counts > 0
    p = [s.params for s in seqs]
    rep = torch.tensor([q.repetition_penalty for q in p], device=dev)[:, None]  # [R, 1]
    freq = torch.tensor([q.frequency_penalty for q in p], device=dev)[:, None]
    pres = torch.tensor([q.presence_penalty for q in p], device=dev)[:, None]
    idx = torch.tensor(rows, device=dev)
    sub = x.index_select(0, idx)  # [R, V]
    r = torch.where(seen, rep, torch.ones_like(rep))
    sub = torch.where(sub > 0, sub / r, sub * r)
    sub = sub - freq * counts - pres * (counts > 0).float()
    x.index_copy_(0, idx, sub)
    return x
