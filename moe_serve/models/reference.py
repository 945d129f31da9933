"""Plain-PyTorch references for the fast paths: obviously correct, slow, used only by tests.

`reference_moe` loops over experts with a boolean mask (no sorting, no dispatch object) and reads
weights through `store.get`; `reference_route` is a per-token loop of the routing rules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_serve.models.spec import RoutingSpec


def reference_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, store, moe_layer: int) -> torch.Tensor:
    """sum_k w[t, k] * expert_{ids[t, k]}(x[t]) for every token t; x [N, H], ids/weights [N, K]."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(store.num_experts):
        gate_up, down = (w.double() for w in store.get(moe_layer, e))
        hit = ids == e  # [N, K]
        tok = hit.any(dim=1)
        if not tok.any():
            continue
        xe = x[tok].double()
        g, u = (xe @ gate_up.T).chunk(2, dim=-1)
        ye = (F.silu(g) * u) @ down.T  # [n_e, H]
        we = (weights.double() * hit).sum(dim=1)[tok]  # [n_e]
        out[tok] += ye * we[:, None]
    return out


def reference_route(logits: torch.Tensor, r: RoutingSpec, bias: torch.Tensor | None) -> tuple[list, list]:
    """Per token: (sorted expert ids, their weights) by the routing rules, in float64."""
    ids_all, w_all = [], []
    n_exp = logits.shape[1]
    for row in logits.double():
        scores = row.softmax(-1) if r.scoring == "softmax" else row.sigmoid()
        choice = scores + bias.double() if (r.has_bias and bias is not None) else scores.clone()
        if r.topk_method != "greedy":
            size = n_exp // r.n_group
            groups = choice.view(r.n_group, size)
            gscore = groups.topk(2).values.sum(-1) if r.topk_method == "noaux_tc" else groups.max(-1).values
            keep = set(gscore.topk(r.topk_group).indices.tolist())
            for g in range(r.n_group):
                if g not in keep:
                    choice[g * size:(g + 1) * size] = float("-inf")
        ids = sorted(choice.topk(r.top_k).indices.tolist())
        w = scores[ids]
        if r.norm_topk_prob:
            w = w / w.sum()
        ids_all.append(ids)
        w_all.append((w * r.routed_scaling_factor).tolist())
    return ids_all, w_all
