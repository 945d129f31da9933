"""Held-out loss and per-layer expert load of a Qwen3-MoE (or Mixtral) transformers model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int = 8) -> dict:
    """windows: (n, seq_len + 1) token ids. Returns mean next-token loss (nats), perplexity, and
    tokens routed to each expert per layer (top-k picks, so each token counts k times per layer)."""
    cfg = model.config
    n_exp, k = cfg.num_experts if hasattr(cfg, "num_experts") else cfg.num_local_experts, cfg.num_experts_per_tok
    total, count = 0.0, 0
    load = torch.zeros(cfg.num_hidden_layers, n_exp, dtype=torch.long)
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        out = model(input_ids=x[:, :-1], output_router_logits=True, use_cache=False)
        logits = out.logits.float()  # (b, t, vocab)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
        for l, rl in enumerate(out.router_logits):  # rl: (b * t, n_exp)
            top = rl.float().topk(k, dim=-1).indices.reshape(-1)
            load[l] += torch.bincount(top, minlength=n_exp)
    loss = total / count
    imbalance = (load.max(dim=1).values.float() / load.float().mean(dim=1)).tolist()
    return {"loss": round(loss, 4), "ppl": round(math.exp(loss), 2), "tokens": count,
            "expert_tokens": load.tolist(), "max_over_mean_per_layer": [round(v, 3) for v in imbalance]}
