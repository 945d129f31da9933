"""Decode steps the compiled-decode tests run on an eager and a compiled model alike: three prompts
prefilled in scattered slots, then greedy decodes together and alone."""
from __future__ import annotations

import torch

from moe_serve.models import ForwardBatch
from tests.models.helpers import RecordRoutes

GEN = torch.Generator().manual_seed(5)
PROMPTS = [torch.randint(3, 128, (n,), generator=GEN).tolist() for n in (6, 13, 9)]
SLOTS = (3, 0, 2)


class RecordIds(RecordRoutes):
    reads_ids_only = True  # it keeps expert ids only: the compiled step may report them after the fact


def decodes(tokens: list[int], slots, lens) -> ForwardBatch:
    return ForwardBatch(token_ids=torch.tensor(tokens), positions=torch.tensor(lens), slot_ids=list(slots),
                        query_lens=[1] * len(tokens), context_lens=list(lens), seq_ids=list(slots))


def run(model, steps: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Prefill the three prompts, then `steps` greedy steps of all three together and `steps` of the
    first alone: (logits per decode step, expert ids per step and MoE layer)."""
    routes = RecordIds()
    model.hooks = routes
    lens = [len(p) for p in PROMPTS]
    toks = []
    for p, slot in zip(PROMPTS, SLOTS):
        toks.append(int(model(ForwardBatch.single(p, slot=slot)).argmax()))
    logits = []
    for _ in range(steps):
        out = model(decodes(toks, SLOTS, lens))
        logits.append(out)
        toks, lens = out.argmax(-1).tolist(), [n + 1 for n in lens]
    for _ in range(steps):
        out = model(decodes(toks[:1], SLOTS[:1], lens[:1]))
        logits.append(out)
        toks, lens = out.argmax(-1).tolist(), [n + 1 for n in lens]
    steps_ids = [[ids[i] for ids in routes.ids.values()] for i in range(2 * steps + 3)][3:]
    return logits, steps_ids
