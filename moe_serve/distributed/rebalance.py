"""Online rebalancing: live expert loads -> a new placement plan -> expert weights moved between ranks.

Every rank counts the routing choices of its own tokens (`DispatchStats.load`). Every
`rebalance_every` steps, at the end of the same step on every rank (all ranks run the same step
plans, so they agree on when without a message), the ranks:
1. sum the load of the last `window` steps over the EP group (data-parallel attention: each rank
   saw different tokens; TP attention: all ranks saw the same ones, no sum needed);
2. rank 0 plans with `placement` (EPLB by default, same slots per rank) and broadcasts phy2log,
   so every rank switches to the identical plan;
3. move weights: a rank that gains a slot of expert e copies it from its own old slots when it
   had e, else receives it from the lowest EP rank that held e (isend/irecv, same-shard peers);
4. install the new weights and plan, which the dispatchers use from the next step on.
The pause is the time of steps 1-4 (reported as `rebalance_s`); serving waits for it but never
stops. `PlacementCommand` switches to a given plan the same way at a given step.
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch
import torch.distributed as dist


class LoadWindow:
    """Cumulative [L, E] load snapshots of the last `window` steps -> the window's load."""

    def __init__(self, window: int):
        self.snaps: deque[np.ndarray] = deque(maxlen=window + 1)

    def push(self, cumulative: np.ndarray) -> None:
        self.snaps.append(cumulative.copy())

    def load(self) -> np.ndarray:
        return self.snaps[-1] - self.snaps[0] if len(self.snaps) > 1 else self.snaps[-1].copy()


def plan_from_load(load: np.ndarray, plan, algorithm: str = "eplb"):
    """A new plan of the same shape (ranks, slots per rank) for `load` [L, E]."""
    from placement.algorithms import get_algorithm

    fn = get_algorithm(algorithm)
    return fn(load.astype(np.float64) + 1e-3, plan.num_ranks, plan.slots_per_rank)  # +eps: ties broken by id


def transfers(old, new, l: int) -> list[tuple[int, int, int, int]]:
    """(src_rank, dst_rank, expert, dst_local_slot) for slots of layer l whose rank did not hold the expert."""
    spr, out = new.slots_per_rank, []
    old_sets = [set(old.phy2log[l, r * spr:(r + 1) * spr].tolist()) for r in range(old.num_ranks)]
    for r in range(new.num_ranks):
        for s, e in enumerate(new.phy2log[l, r * spr:(r + 1) * spr].tolist()):
            if e not in old_sets[r]:
                src = next(q for q in range(old.num_ranks) if e in old_sets[q])
                out.append((src, r, e, s))
    return out


def switch_plan(store, old, new, ep_group, ep_rank: int, ep_global) -> int:
    """Move weights so that `store` holds this rank's slots of `new`; returns experts received here.

    ep_global(j): the global rank of EP rank j in this rank's EP group (p2p needs global ranks).
    """
    received = 0
    for l in range(new.num_layers):
        moves = transfers(old, new, l)
        gu_old, dn_old, local_old = store.gate_up[l], store.down[l], store.local[l]
        spr = new.slots_per_rank
        mine = new.phy2log[l, ep_rank * spr:(ep_rank + 1) * spr].tolist()
        gu = torch.empty((spr, *gu_old.shape[1:]), dtype=gu_old.dtype, device=gu_old.device)
        dn = torch.empty((spr, *dn_old.shape[1:]), dtype=dn_old.dtype, device=dn_old.device)
        for s, e in enumerate(mine):  # what this rank already had
            if e in local_old:
                gu[s].copy_(gu_old[local_old[e]])
                dn[s].copy_(dn_old[local_old[e]])
        ops = []
        for src, dst, e, s in moves:
            if src == ep_rank:
                j = local_old[e]
                ops += [dist.P2POp(dist.isend, gu_old[j].contiguous(), ep_global(dst), ep_group),
                        dist.P2POp(dist.isend, dn_old[j].contiguous(), ep_global(dst), ep_group)]
            if dst == ep_rank:
                ops += [dist.P2POp(dist.irecv, gu[s], ep_global(src), ep_group),
                        dist.P2POp(dist.irecv, dn[s], ep_global(src), ep_group)]
                received += 1
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        local = {}
        for s, e in enumerate(mine):
            local.setdefault(e, s)
        store.install_layer(l, gu, dn, local)
    store.plan = new
    return received


class Rebalancer:
    """Owned by the runner: counts steps, keeps the load window, switches plans at agreed steps."""

    def __init__(self, runner, every: int, window: int, algorithm: str = "eplb"):
        self.r, self.every, self.window, self.algorithm = runner, every, LoadWindow(window), algorithm
        self.pending: dict[int, object] = {}  # step -> plan from a PlacementCommand
        self.switches, self.last_s, self.last_moved = 0, 0.0, 0
        self.refused = 0  # PlacementCommands whose plan failed the checks (the running plan was kept)

    def before_step(self, step: int) -> None:
        plan = self.pending.pop(step, None)
        if plan is not None:
            self._apply(plan)

    def after_step(self, step: int) -> None:
        self.window.push(self.r.ctx.stats.load)
        if self.every and (step + 1) % self.every == 0:
            t = time.perf_counter()
            load = torch.from_numpy(self.window.load())
            lay = self.r.layout
            if lay.dp > 1 and self.r.groups.ep is not None:
                dist.all_reduce(load, group=self.r.groups.ep)  # each rank saw its own tokens
            new = plan_from_load(load.numpy(), self.r.plan, self.algorithm)
            phy = torch.from_numpy(new.phy2log.copy())
            dist.broadcast(phy, src=0)  # rank 0's plan wins: every rank installs the same one
            from placement.plan import PlacementPlan

            new = PlacementPlan.from_phy2log(phy.numpy(), self.r.plan.num_experts, self.r.plan.num_ranks,
                                             dict(algorithm=self.algorithm, step=step))
            self._apply(new, t)

    def _apply(self, new, t: float | None = None) -> None:
        t = time.perf_counter() if t is None else t
        r = self.r
        lay = r.layout
        self.last_moved = switch_plan(r.model.store, r.plan, new, r.groups.ep, lay.ep_rank,
                                      lambda j: lay.moe_tp_rank + j * lay.moe_tp)
        r.plan = r.ctx.plan = new
        self.switches += 1
        self.last_s = time.perf_counter() - t

    def stats(self) -> dict[str, float]:
        return {"rebalance_switches": float(self.switches), "rebalance_s": self.last_s,
                "rebalance_moved_experts": float(self.last_moved), "placement_commands_refused": float(self.refused)}
