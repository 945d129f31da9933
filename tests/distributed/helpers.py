"""Shared pieces of the distributed tests: a greedy loop over ForwardBatches, tiny checkpoints."""
from __future__ import annotations

import torch

from moe_serve.models import ForwardBatch

PROMPTS = [[3, 4, 5, 6, 7], [9, 10, 11], [20, 21, 22, 23]]


def greedy(model, prompts=PROMPTS, steps: int = 8, kill=None):
    """Prefill the prompts in one batch, then decode `steps` tokens greedily; returns (tokens, logits).

    `kill(step)` is called before each decode step (tests use it to kill a rank mid-generation).
    """
    n = len(prompts)
    ids = [t for p in prompts for t in p]
    pos = [i for p in prompts for i in range(len(p))]
    lens = [len(p) for p in prompts]
    batch = ForwardBatch(token_ids=torch.tensor(ids), positions=torch.tensor(pos), slot_ids=list(range(n)),
                         query_lens=lens[:], context_lens=[0] * n, seq_ids=list(range(n)))
    tokens, logits = [], []
    for step in range(steps):
        if kill is not None:
            kill(step)
        out = model.forward(batch)  # [S, V]
        nxt = out.argmax(-1)
        tokens.append(nxt.tolist())
        logits.append(out)
        batch = ForwardBatch(token_ids=nxt, positions=torch.tensor(lens), slot_ids=list(range(n)),
                             query_lens=[1] * n, context_lens=lens[:], seq_ids=list(range(n)))
        lens = [x + 1 for x in lens]
    return tokens, torch.stack(logits)
