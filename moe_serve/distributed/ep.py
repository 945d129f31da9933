"""Expert parallelism: this rank's physical experts, and the dispatch stages that reach the others.

`EPExpertStore` holds only this rank's slots of the placement plan (a replicated expert is
computed by whichever rank holds the chosen copy), split along the intermediate dim when several
ranks share the same experts (MoE-TP). It answers the model's `store.run` contract for the rows
this rank received, grouped by logical expert.

Dispatchers (one per MoE layer; same `dispatch`/`combine` contract as models.moe.LocalDispatcher):
- `ReplicatedDispatcher`: every rank already holds every token (TP attention). Each rank runs
  its own copies and returns partial sums; the MoE block's single all-reduce finishes the combine
  (the all-gather is the TP attention itself, the reduce-scatter + all-gather is that all-reduce).
- `AllToAllDispatcher`: attention is data parallel, each rank holds its own tokens. Copies are
  sent with all_to_all_single (uneven splits) to the ranks of their chosen slots and come back by
  the reverse all-to-all; the combine then adds them in the local dispatcher's order.
- `AllGatherDispatcher`: data-parallel attention, tokens all-gathered, partial sums reduced and
  each rank keeps its own rows (gloo has no reduce-scatter: an all-reduce of the padded rows).
Replicas are picked by `placement.replica.choose_replica`, the rule the placement scorer uses,
over the batch a rank sees (its own tokens, or every rank's tokens as separate batches).
`DispatchStats` counts what the runtime actually did: copies (distinct ranks per token), rows and
bytes sent to other ranks, per-expert load.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from moe_serve.distributed.sizes import split_error
from moe_serve.experts.store import ExpertStore, expert_forward
from placement.replica import choose_replica


class EPExpertStore(ExpertStore):
    """This rank's physical slots: per MoE layer gate_up [S, 2I/m, H], down [S, H, I/m]."""

    def __init__(self, source, plan, ep_rank: int, moe_tp: int, moe_tp_rank: int, dtype, device):
        self.source, self.plan, self.ep_rank = source, plan, ep_rank
        self.moe_tp, self.moe_tp_rank, self.dtype, self.device = moe_tp, moe_tp_rank, dtype, torch.device(device)
        self.num_moe_layers, self.num_experts = plan.num_layers, plan.num_experts
        self.gate_up, self.down, self.local = [], [], []
        for l in range(plan.num_layers):
            gu, dn, local = self.read_layer(l, plan)
            self.gate_up.append(gu)
            self.down.append(dn)
            self.local.append(local)

    def _shard(self, gate_up: torch.Tensor, down: torch.Tensor):
        i = down.shape[1]
        if i % self.moe_tp:
            raise ValueError("expert parallelism: " + split_error("moe_intermediate_size", i,
                                                                  f"the {self.moe_tp} ranks sharing each expert"))
        k, r = i // self.moe_tp, self.moe_tp_rank
        part = slice(r * k, (r + 1) * k)
        return torch.cat((gate_up[:i][part], gate_up[i:][part])), down[:, part]

    def slots_of(self, plan, l: int) -> np.ndarray:
        spr = plan.slots_per_rank
        return plan.phy2log[l, self.ep_rank * spr:(self.ep_rank + 1) * spr]

    def read_layer(self, l: int, plan):
        """Weights of this rank's slots of layer l under `plan` (from the checkpoint source)."""
        experts = self.slots_of(plan, l)
        pairs = [self._shard(*self.source.get(l, int(e))) for e in experts]
        gu = torch.stack([p[0] for p in pairs]).to(self.device, self.dtype)
        dn = torch.stack([p[1] for p in pairs]).to(self.device, self.dtype)
        local = {}
        for s, e in enumerate(experts.tolist()):
            local.setdefault(e, s)
        return gu, dn, local

    def install_layer(self, l: int, gate_up: torch.Tensor, down: torch.Tensor, local: dict) -> None:
        self.gate_up[l], self.down[l], self.local[l] = gate_up, down, local

    def get(self, moe_layer: int, e: int):
        s = self.local[moe_layer].get(e)
        if s is None:
            raise RuntimeError(f"EP rank {self.ep_rank} got rows of expert {e} (MoE layer {moe_layer}) "
                               "that it does not hold: the ranks disagree on the placement plan")
        return self.gate_up[moe_layer][s], self.down[moe_layer][s]

    def run(self, moe_layer: int, x_sorted: torch.Tensor, counts) -> torch.Tensor:
        """Rows grouped by logical expert per `counts` [E] (list or long tensor), this rank's copies only."""
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        y = torch.empty_like(x_sorted)
        start = 0
        for e, c in enumerate(counts):
            if c:
                gate_up, down = self.get(moe_layer, e)
                y[start:start + c] = expert_forward(x_sorted[start:start + c], gate_up, down)
                start += c
        return y

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.gate_up, *self.down))


@dataclass
class DispatchStats:
    """Counters of the dispatch the runtime did (real tokens only), reset by the runner each step."""

    num_ranks: int
    num_layers: int
    num_experts: int
    copies: int = 0  # sum over tokens and layers of distinct ranks holding the token's k experts
    tokens: int = 0  # token-layers dispatched
    remote_rows: int = 0  # rows sent to other ranks (one direction)
    remote_bytes: int = 0
    load: np.ndarray = field(default=None)  # int64 [L, E] routing choices per logical expert (cumulative)

    def __post_init__(self):
        if self.load is None:
            self.load = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)

    def record(self, l: int, ids: np.ndarray, dest: np.ndarray, remote_rows: int, row_bytes: int) -> None:
        """ids, dest: [n, K] logical ids and destination ranks of n real tokens; rows sent elsewhere."""
        n = ids.shape[0]
        if n == 0:
            return
        touched = np.zeros((n, self.num_ranks), dtype=bool)
        touched[np.arange(n)[:, None], dest] = True
        self.copies += int(touched.sum())
        self.tokens += n
        self.remote_rows += remote_rows
        self.remote_bytes += remote_rows * row_bytes
        np.add.at(self.load[l], ids.reshape(-1), 1)

    def step_dict(self) -> dict[str, float]:
        return {"dispatch_copies": float(self.copies), "dispatch_tokens": float(self.tokens),
                "dispatch_remote_rows": float(self.remote_rows), "dispatch_remote_bytes": float(self.remote_bytes)}

    def reset_step(self) -> None:
        self.copies = self.tokens = self.remote_rows = self.remote_bytes = 0


def _slots(plan, l: int, ids: np.ndarray, batch=None) -> np.ndarray:
    return choose_replica(ids, plan.log2phy[l], plan.replica_count[l], plan.slots_per_rank, plan.num_ranks, batch)


def _sort_local(x, flat, k, e):
    """This rank's copies (flat (token, k) positions, logical ids e) grouped by expert, stably."""
    order = torch.argsort(e, stable=True)
    flat = flat[order]
    return x.index_select(0, torch.div(flat, k, rounding_mode="floor")), flat, e[order]


def _sum_copies(weighted: torch.Tensor, flat: torch.Tensor, n: int, k: int, dtype) -> torch.Tensor:
    """Weighted copies at (token, k) positions `flat` -> [n, H]: each token's k copies summed (absent
    copies are zero) in the activation dtype after an fp32-or-wider sum, as models.moe.LocalDispatcher."""
    full = weighted.new_zeros(n * k, weighted.shape[1])
    full[flat] = weighted
    return full.view(n, k, weighted.shape[1]).sum(dim=1).to(dtype)


class _Base:
    def __init__(self, layer: int, ctx):
        self.l, self.ctx = layer, ctx  # ctx: the runner's EPContext (plan, groups, stats, step info)

    @property
    def plan(self):
        return self.ctx.plan


class ReplicatedDispatcher(_Base):
    def dispatch(self, x, ids, weights, num_experts):
        n, k = ids.shape
        ids_np = ids.cpu().numpy()
        dest = _slots(self.plan, self.l, ids_np) // self.plan.slots_per_rank  # [N, K] EP rank of each copy
        if self.ctx.count:  # tokens are on every rank already: nothing crosses the wire to dispatch
            r = self.ctx.real_tokens
            self.ctx.stats.record(self.l, ids_np[:r], dest[:r], 0, 0)
        flat = torch.arange(n * k)[torch.from_numpy((dest == self.ctx.ep_rank).reshape(-1))]
        x_sorted, flat, e = _sort_local(x, flat, k, ids.reshape(-1)[flat])
        counts = torch.bincount(e, minlength=num_experts)
        return x_sorted, counts, (flat, weights.reshape(-1)[flat], n, k)

    def combine(self, y_sorted, state, dtype):
        flat, w, n, k = state
        return _sum_copies(y_sorted * w[:, None], flat, n, k, dtype)  # partial: the block all-reduces


class AllToAllDispatcher(_Base):
    """One row per (token, destination rank), carrying the token's expert ids and weights for that rank
    (-1 elsewhere): the bytes on the wire follow the fan-out the placement plan optimizes. The
    receiver returns one weighted partial sum per row; the sender adds its ranks' partials."""

    def dispatch(self, x, ids, weights, num_experts):
        n, k = ids.shape
        W, group = self.plan.num_ranks, self.ctx.ep_group
        ids_np = ids.cpu().numpy()
        dest_np = _slots(self.plan, self.l, ids_np) // self.plan.slots_per_rank  # [N, K]
        dest = torch.from_numpy(dest_np)
        key = dest * n + torch.arange(n)[:, None]  # [N, K]: (rank, token) of each copy
        pair, inv = torch.unique(key.reshape(-1), sorted=True, return_inverse=True)  # rows grouped by rank
        p_rank, p_tok = torch.div(pair, n, rounding_mode="floor"), pair % n
        if self.ctx.count:
            r = self.ctx.real_tokens
            remote = int(((p_rank != self.ctx.ep_rank) & (p_tok < r)).sum())
            self.ctx.stats.record(self.l, ids_np[:r], dest_np[:r], remote, x.shape[1] * x.element_size())
        inv = inv.view(n, k)
        cols = torch.arange(k)[None, :].expand(n, k)
        p_ids = torch.full((len(pair), k), -1, dtype=ids.dtype)
        p_ids[inv, cols] = ids
        p_w = torch.zeros((len(pair), k), dtype=weights.dtype)
        p_w[inv, cols] = weights
        send_counts = torch.bincount(p_rank, minlength=W)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        sc, rc = send_counts.tolist(), recv_counts.tolist()
        R = sum(rc)
        r_x = x.new_empty(R, x.shape[1])
        dist.all_to_all_single(r_x, x.index_select(0, p_tok), rc, sc, group=group)
        # ids and weights in one exchange: weights widened to fp64 (exact) and sent as their int64 bits
        meta = torch.cat((p_ids.long(), p_w.double().view(torch.int64)), dim=1)  # [P, 2K]
        r_meta = meta.new_empty(R, 2 * k)
        dist.all_to_all_single(r_meta, meta, rc, sc, group=group)
        r_ids, r_w = r_meta[:, :k], r_meta[:, k:].contiguous().view(torch.float64).to(weights.dtype)
        flat = torch.nonzero(r_ids.reshape(-1) >= 0).reshape(-1)  # this rank's copies among the rows
        x_sorted, flat, e = _sort_local(r_x, flat, k, r_ids.reshape(-1)[flat])
        counts = torch.bincount(e, minlength=num_experts)
        return x_sorted, counts, (flat, r_w, R, k, p_rank, p_tok, sc, rc, n)

    def combine(self, y_sorted, state, dtype):
        flat, r_w, R, k, p_rank, p_tok, sc, rc, n = state
        partial = _sum_copies(y_sorted * r_w.reshape(-1)[flat][:, None], flat, R, k, dtype)  # [R, H]
        back = partial.new_empty(sum(sc), partial.shape[1])
        dist.all_to_all_single(back, partial, sc, rc, group=self.ctx.ep_group)
        per_rank = back.new_zeros(self.plan.num_ranks, n, back.shape[1])
        per_rank[p_rank, p_tok] = back
        return per_rank.sum(0)  # each token's partials, added in rank order


class AllGatherDispatcher(_Base):
    def dispatch(self, x, ids, weights, num_experts):
        n, k = ids.shape
        sizes, group, me = self.ctx.tokens_per_rank, self.ctx.ep_group, self.ctx.ep_rank
        m = max(sizes)

        def gather(t):  # [n, ...] -> [sum(sizes), ...] in rank order (padded to m for gloo)
            pad = t.new_zeros((m, *t.shape[1:]))
            pad[:n] = t
            parts = [torch.empty_like(pad) for _ in sizes]
            dist.all_gather(parts, pad, group=group)
            return torch.cat([p[:s] for p, s in zip(parts, sizes)])

        xs, all_ids, all_w = gather(x), gather(ids), gather(weights)
        src = np.repeat(np.arange(len(sizes)), sizes)
        ids_np = all_ids.cpu().numpy()
        dest = _slots(self.plan, self.l, ids_np, batch=src) // self.plan.slots_per_rank  # each rank a batch
        if self.ctx.count:
            r, start = self.ctx.real_tokens, sum(sizes[:me])
            self.ctx.stats.record(self.l, ids_np[start:start + r], dest[start:start + r], r * (len(sizes) - 1),
                                  x.shape[1] * x.element_size())
        flat = torch.arange(all_ids.numel())[torch.from_numpy((dest == me).reshape(-1))]
        x_sorted, flat, e = _sort_local(xs, flat, k, all_ids.reshape(-1)[flat])
        counts = torch.bincount(e, minlength=num_experts)
        return x_sorted, counts, (flat, all_w.reshape(-1)[flat], n, m, k)

    def combine(self, y_sorted, state, dtype):
        flat, w, n, m, k = state
        sizes, me = self.ctx.tokens_per_rank, self.ctx.ep_rank
        part = _sum_copies(y_sorted * w[:, None], flat, sum(sizes), k, dtype)  # [T, H] partial
        padded = part.new_zeros(len(sizes), m, part.shape[1])
        for r, (a, s) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), sizes)):
            padded[r, :s] = part[a:a + s]
        dist.all_reduce(padded, group=self.ctx.ep_group)  # reduce-scatter (gloo has none): keep my rows
        return padded[me, :n].clone()


DISPATCHERS = {"replicated": ReplicatedDispatcher, "alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}
