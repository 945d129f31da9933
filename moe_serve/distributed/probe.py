"""A step runner without a model: checks that the control plane and every process group work.

Each step, every rank all-reduces (over the world, its TP group and its EP group) a vector built
from the step's last token of each sequence and its own rank, and the output ranks return the
three sums as "logits" [S, 3]. The frontend can verify them exactly (`expected_probe_logits`), so
a wrong group, a lost message or a mixed-up step shows as a wrong number, not as a silent pass.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moe_serve.distributed.groups import Groups


def expected_probe_logits(last_tokens: list[int], rank: int, tp_groups, ep_groups) -> torch.Tensor:
    """What an output rank `rank` must return for sequences whose last tokens are `last_tokens`."""
    t = torch.tensor(last_tokens, dtype=torch.float64)
    world = sum(range(max(r for g in tp_groups for r in g) + 1))
    tp = sum(next(g for g in tp_groups if rank in g))
    ep = sum(next(g for g in ep_groups if rank in g))
    n_world = sum(len(g) for g in tp_groups)
    n_tp, n_ep = len(tp_groups[0]), len(ep_groups[0])
    return torch.stack([t * n_world + world, t * n_tp + tp, t * n_ep + ep], dim=1)


class ProbeRunner:
    def __init__(self, groups: Groups):
        self.groups = groups
        self.layout = groups.layout

    def step(self, plan):
        ids = plan.token_ids.to_tensor()
        ends = torch.tensor(plan.query_lens).cumsum(0) - 1
        last = ids[ends].to(torch.float64) + self.layout.rank  # [S]
        outs = []
        for g in (self.groups.world, self.groups.tp, self.groups.ep):
            x = last.clone()
            if g is not None:
                dist.all_reduce(x, group=g)
            outs.append(x)
        if self.layout.rank not in self.layout.output_ranks():
            return None
        return list(range(len(plan.slot_ids))), torch.stack(outs, dim=1), {"allreduces": 3.0}, None

    def command(self, msg) -> None:
        raise ValueError(f"probe runner: command {type(msg).__name__} is not supported")


def build(spec, groups: Groups) -> ProbeRunner:
    return ProbeRunner(groups)
