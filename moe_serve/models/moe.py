"""The MoE block as four replaceable stages: router -> dispatch -> experts -> combine.

- router (`Router`): logits, scores, top-k ids and weights per the family's `RoutingSpec`;
- hooks (`runtime.hooks.route`) right after it, only when `hooks.active` (trace, replay, predictor);
- dispatch (`runtime.dispatcher.dispatch`): local and dropless: token copies sorted by expert id,
  no capacity limit; the EP engine swaps in an all-to-all dispatcher with the same two methods;
- experts (`runtime.store.run`): the expert store computes each expert's rows (see experts/store.py);
- combine (`runtime.dispatcher.combine`): weighted sum back into token order.
The shared expert (Qwen2-MoE, DeepSeek) runs beside the routed ones and is added last, as in
transformers. `MoERuntime` is one small object shared by every block, so swapping the store, the
hooks or the dispatcher is one assignment on the model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_serve.models.hooks import NO_HOOKS, RouterHooks
from moe_serve.models.layers import MLP, linear
from moe_serve.models.spec import ModelSpec, RoutingSpec


class Router(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.r: RoutingSpec = spec.routing
        self.num_experts = spec.num_experts
        self.weight = nn.Parameter(torch.empty(spec.num_experts, spec.hidden_size), requires_grad=False)
        if self.r.has_bias:  # kept in fp32, as transformers does
            self.register_buffer("e_score_correction_bias", torch.empty(spec.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x [N, H] -> ids long [N, K], w [N, K]
        r, n = self.r, x.shape[0]
        logits = F.linear(x.float(), self.weight.float()) if r.logits_fp32 else F.linear(x, self.weight)  # [N, E]
        scores = logits.softmax(-1, dtype=torch.float32) if r.scoring == "softmax" else logits.float().sigmoid()
        if r.topk_method == "greedy":
            weights, ids = torch.topk(scores, r.top_k, dim=-1)
        else:
            choice = scores + self.e_score_correction_bias if r.has_bias else scores
            grouped = choice.view(n, r.n_group, self.num_experts // r.n_group)  # [N, G, E/G]
            if r.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1)[0].sum(-1)  # [N, G]
            else:  # group_limited_greedy
                group_scores = grouped.max(dim=-1).values
            group_idx = torch.topk(group_scores, r.topk_group, dim=-1)[1]  # [N, topk_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            keep = keep[:, :, None].expand_as(grouped).reshape(n, self.num_experts)
            fill = float("-inf") if r.topk_method == "noaux_tc" else 0.0
            ids = torch.topk(choice.masked_fill(~keep, fill), r.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)
        if r.norm_topk_prob:
            eps = 1e-20 if r.scoring == "sigmoid" else 0.0
            weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
        if r.routed_scaling_factor != 1.0:
            weights = weights * r.routed_scaling_factor
        if not r.weights_fp32 and weights.dtype != x.dtype:
            weights = weights.to(x.dtype)
        return ids, weights


class LocalDispatcher:
    """Dropless single-rank dispatch: copies of each token, sorted by expert id.

    Combine follows transformers' default (grouped_mm) experts path exactly: weight each copy (fp32
    weights promote the product to fp32), put copies back in token order, sum each token's k copies
    (fp32 accumulation), cast once to the activation dtype; so bf16 outputs match bit for bit.
    No index_add_/scatter: on CPU those parallelize even for two rows and stall on a busy machine.

    One token (batch-1 decode) is ordered on the host from one read of its K ids, with no sort,
    bincount or gather: always on a CPU, and on a GPU when the store reads the counts on the host
    anyway (`runtime.store.counts_on_host`: every store but the resident one's grouped GPU path),
    so that read replaces the store's and a handful of small device ops (measured on an H100: the
    device path's bincount alone syncs and costs ~0.15 ms of host time).
    """

    def __init__(self, runtime: "MoERuntime | None" = None):
        self.runtime = runtime  # whose store says where it wants the counts

    def _on_host(self, ids: torch.Tensor) -> bool:
        if ids.device.type == "cpu":
            return True
        return self.runtime is not None and getattr(self.runtime.store, "counts_on_host", True)

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int):
        n, k = ids.shape
        if n == 1 and self._on_host(ids):  # batch-1 decode: order its K experts on the host
            chosen = ids[0].tolist()
            order = sorted(range(k), key=chosen.__getitem__)  # copy ranks by expert id (ids are distinct)
            counts = [0] * num_experts
            for e in chosen:
                counts[e] += 1
            return x.expand(k, x.shape[1]), counts, (order, weights, n, k)  # [K, H] view: every copy is x
        flat = ids.reshape(-1)  # [M = N*K]
        order = torch.argsort(flat, stable=True)  # [M] copy positions sorted by expert
        counts = torch.bincount(flat, minlength=num_experts)  # long [E]
        x_sorted = x.index_select(0, torch.div(order, k, rounding_mode="floor"))  # [M, H]
        return x_sorted, counts, (order, weights.reshape(-1), n, k)

    def combine(self, y_sorted: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
        order, weights, n, k = state  # order [M]: copy of each sorted row; weights [M] in copy order
        if isinstance(order, list):  # one token: y_sorted rows back in rank order, then the same math
            if order != sorted(order):
                y_sorted = y_sorted.index_select(0, _inverse(tuple(order), y_sorted.device))
            y = y_sorted * weights.reshape(k, 1)  # [K, H], rank order
        else:
            weighted = y_sorted * weights.index_select(0, order)[:, None]  # [M, H] (fp32 if the weights are)
            y = torch.empty_like(weighted)
            y[order] = weighted  # back in copy (token, rank) order
        out = y.view(n, k, -1).sum(dim=1)  # [N, H]
        return out if out.dtype == dtype else out.to(dtype)


@functools.lru_cache(maxsize=1024)
def _inverse(perm: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """long [K]: the inverse permutation, as a tensor made once per (permutation, device)."""
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    with torch.inference_mode(False):  # a normal tensor, usable inside and outside inference mode
        return torch.tensor(inv, device=device)


@dataclass
class MoERuntime:
    """What every MoE block shares and the engine may swap: the expert store, hooks, dispatcher."""

    store: object = None  # ExpertStore
    hooks: RouterHooks = NO_HOOKS
    dispatcher: object = None  # LocalDispatcher or an EP dispatcher


class MoEBlock(nn.Module):
    def __init__(self, spec: ModelSpec, moe_index: int, runtime: MoERuntime):
        super().__init__()
        self.moe_index, self.num_experts, self.rt = moe_index, spec.num_experts, runtime
        self.gate = Router(spec)
        if spec.shared_expert_intermediate_size:
            self.shared_expert = MLP(spec.hidden_size, spec.shared_expert_intermediate_size)
        if spec.shared_expert_gate:
            self.shared_expert_gate = linear(spec.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, H]
        rt = self.rt
        ids, weights = self.gate.forward(x)  # [N, K], [N, K]
        if rt.hooks.active:
            replaced = rt.hooks.route(self.moe_index, x, ids, weights)
            if replaced is not None:
                ids, weights = replaced
        x_sorted, counts, state = rt.dispatcher.dispatch(x, ids, weights, self.num_experts)
        y_sorted = rt.store.run(self.moe_index, x_sorted, counts)
        out = rt.dispatcher.combine(y_sorted, state, x.dtype)
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(x)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
