"""Prediction quality: how many of the experts a token really used were in the predicted set.

recall@k: k = the model's top-k; the fraction of the true top-k experts found among the k
highest-scored experts. At a prefetch budget of B experts per layer: precision = hits / B (how much
of the prefetch traffic was useful) and recall = hits / k (how much of the demand it covered).
"""
from __future__ import annotations

import torch


def hits_at(scores: torch.Tensor, true: torch.Tensor, n: int) -> torch.Tensor:
    """long [N]: how many of `true` [N, K] (ids, -1 = none) are among the n best of `scores` [N, E]."""
    if not 1 <= n <= scores.shape[-1]:
        raise ValueError(f"budget n must lie in [1, E={scores.shape[-1]}], got {n}")
    top = scores.topk(n, dim=-1).indices  # [N, n]
    return ((top[:, :, None] == true[:, None, :]) & (true[:, None, :] >= 0)).sum((1, 2))


def routing_metrics(scores: torch.Tensor, true: torch.Tensor, budget: int) -> dict[str, float]:
    """recall_at_k, precision_at_budget, recall_at_budget (means over rows) for scores [N, E], true [N, K]."""
    k = true.shape[-1]
    if scores.shape[0] != true.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} rows, true has {true.shape[0]}")
    if scores.shape[0] == 0:
        return dict(recall_at_k=float("nan"), precision_at_budget=float("nan"), recall_at_budget=float("nan"))
    hk = hits_at(scores, true, k).float()
    hb = hits_at(scores, true, budget).float()
    return dict(
        recall_at_k=(hk / k).mean().item(),
        precision_at_budget=(hb / budget).mean().item(),
        recall_at_budget=(hb / k).mean().item(),
    )


class MetricSum:
    """Accumulates hit counts over calls so that the mean is over all rows, not over calls."""

    def __init__(self, k: int, budget: int):
        self.k, self.budget = k, budget
        self.rows = 0
        self.hits_k = 0.0
        self.hits_b = 0.0

    def add(self, scores: torch.Tensor, true: torch.Tensor) -> None:
        if scores.shape[0] == 0:
            return
        self.rows += scores.shape[0]
        self.hits_k += hits_at(scores, true, self.k).sum().item()
        self.hits_b += hits_at(scores, true, self.budget).sum().item()

    def result(self) -> dict[str, float | None]:
        """Means over all rows added; None where no row was (nothing measured is not a measured 0)."""
        if self.rows == 0:
            return dict(recall_at_k=None, precision_at_budget=None, recall_at_budget=None, rows=0)
        n = self.rows
        return dict(
            recall_at_k=self.hits_k / (n * self.k),
            precision_at_budget=self.hits_b / (n * self.budget),
            recall_at_budget=self.hits_b / (n * self.k),
            rows=self.rows,
        )
