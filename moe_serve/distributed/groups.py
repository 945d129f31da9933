"""torch.distributed setup: the backend chosen from the device at runtime, TP and EP subgroups.

Layout of W ranks (W = max(tp, ep), both must divide W):
- attention and dense layers: TP groups of `tp` consecutive ranks; the W/tp TP groups are data
  parallel (each serves its own sequences: "DP attention").
- experts: EP groups of `ep` ranks strided so that an EP group spans the DP-attention groups;
  the W/ep ranks that share the same experts split each expert's intermediate dim (MoE-TP).
With W = 2: tp=2 (ep=1) shards everything by TP; ep=2 (tp=1) runs attention data-parallel and
dispatches tokens all-to-all; tp=2, ep=2 shards attention by TP and experts by EP (all-gather /
reduce-scatter dispatch: tokens are already on every rank, partial outputs are summed).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    tp: int
    ep: int
    rank: int = 0

    def __post_init__(self):
        for name, v in (("tp", self.tp), ("ep", self.ep)):
            if v < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {v}")
        w = max(self.tp, self.ep)
        if w % self.tp or w % self.ep:
            raise ValueError(f"parallel.tp={self.tp} and parallel.ep={self.ep}: the larger must be a multiple of the smaller")
        if not 0 <= self.rank < w:
            raise ValueError(f"rank must lie in [0, {w}), got {self.rank}")

    @property
    def world_size(self) -> int:
        return max(self.tp, self.ep)

    @property
    def dp(self) -> int:  # data-parallel attention groups
        return self.world_size // self.tp

    @property
    def moe_tp(self) -> int:  # ranks sharing the same experts, splitting their intermediate dim
        return self.world_size // self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank // self.moe_tp

    @property
    def moe_tp_rank(self) -> int:
        return self.rank % self.moe_tp

    def tp_groups(self) -> list[list[int]]:
        return [list(range(d * self.tp, (d + 1) * self.tp)) for d in range(self.dp)]

    def ep_groups(self) -> list[list[int]]:
        return [list(range(m, self.world_size, self.moe_tp)) for m in range(self.moe_tp)]

    def moe_tp_groups(self) -> list[list[int]]:
        return [list(range(e * self.moe_tp, (e + 1) * self.moe_tp)) for e in range(self.ep)]

    def output_ranks(self) -> list[int]:
        """Ranks that send logits back: the first rank of every DP-attention group."""
        return [d * self.tp for d in range(self.dp)]

    def owns_sequence(self, slot_id: int) -> bool:
        """DP attention: a sequence lives (KV cache and all) on DP group slot % dp for its lifetime."""
        return slot_id % self.dp == self.dp_rank


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo otherwise: decided when the group starts, never at import."""
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class Groups:
    """The process groups one rank uses (None when the group has one member: no communication)."""

    layout: ParallelLayout
    world: object
    tp: object | None
    ep: object | None
    moe_tp: object | None


def _new_groups(all_groups: list[list[int]], rank: int):
    mine = None
    for ranks in all_groups:  # every rank must create every group, in the same order
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return mine if len(all_groups[0]) > 1 else None


def init_distributed(layout: ParallelLayout, device: torch.device, init_method: str, timeout_s: float) -> Groups:
    """Join the world (rendezvous at `init_method`: file://, tcp:// or env://) and build the subgroups."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend_for(device), init_method=init_method, rank=layout.rank,
        world_size=layout.world_size, timeout=datetime.timedelta(seconds=timeout_s),
    )
    return Groups(
        layout=layout, world=dist.group.WORLD,
        tp=_new_groups(layout.tp_groups(), layout.rank),
        ep=_new_groups(layout.ep_groups(), layout.rank),
        moe_tp=_new_groups(layout.moe_tp_groups(), layout.rank),
    )


def torchrun_env() -> dict | None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT when started by torchrun, else None."""
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if not all(k in os.environ for k in keys):
        return None
    env = {k: os.environ[k] for k in keys}
    env["LOCAL_RANK"] = os.environ.get("LOCAL_RANK", "0")
    return env
