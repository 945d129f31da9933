"""Predictor-guided policy: evict by predicted next use, prefetch what the next layers will need.

Belady evicts the expert whose next use is furthest away. This policy estimates that distance:

- **next-token model** (learned online, optionally warm-started from another trace): for every
  layer and expert, the hazard h[l, e, gap] that an expert last used `gap` tokens ago is used at the
  next token. The previous token's routing is the gap=1 case, the strongest signal; frequency enters
  through the per-expert counts. From h the expected number of tokens until the next use follows by
  the recursion E[g] = 1 + (1 - h[g]) E[g + 1].
- **cross-layer predictor** (a `predictors.Predictor`, optional): after layer l's router, the
  probability that each expert of layers l+1 .. l+lookahead is used by the current token. It
  overrides the next-token model for those layers and names the experts to prefetch.

Expected next use of expert (l', e), in layer steps from the current layer l:
    d0 = (l' - l - 1) mod L + 1           (steps until layer l' runs again)
    D  = d0 + L * (tokens_until_use - 1)
and keep_score = -D. Prefetch hints: the predictor's likely experts for the next layers, and the
next-token model's likely experts of layer l for the next token; the cache admits a hint only if it
outranks the expert it would evict.
"""
from __future__ import annotations

import numpy as np

from moe_serve.experts.policies.base import CachePolicy

MAX_GAP = 64  # gaps >= MAX_GAP share one hazard


def gap_counts(experts: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Hazard statistics of a trace replayed as one stream: (trials, uses) float [L, E, MAX_GAP + 1].
    trials[l, e, g] counts tokens at which expert e of layer l had last been used g tokens before
    (g = MAX_GAP: that long ago or never); uses counts those at which it was used again."""
    T, L, K = experts.shape
    trials = np.zeros((L, num_experts, MAX_GAP + 1))
    uses = np.zeros_like(trials)
    base = (np.arange(L)[:, None] * num_experts + np.arange(num_experts)[None, :]) * (MAX_GAP + 1)  # [L, E]
    last = np.full((L, num_experts), -MAX_GAP, dtype=np.int64)
    lidx = np.arange(L)[:, None]
    for t in range(T):
        flat = base + np.minimum(t - last, MAX_GAP)  # [L, E]
        trials.reshape(-1)[flat.reshape(-1)] += 1.0
        used = flat[lidx, experts[t]].reshape(-1)  # [L*K] (ids are unique within a layer)
        uses.reshape(-1)[used] += 1.0
        last[lidx, experts[t]] = t
    return trials, uses


class PredictedPolicy(CachePolicy):
    """`predictor`: object with `predict(state, layer) -> scores [B, lookahead, E]` (probabilities in
    [0, 1], or logits, mapped through a sigmoid), or None. `prior`: (trials, uses) from `gap_counts`
    on a profiling trace, weighted by `prior_weight`. `prefetch_threshold`: least predicted
    probability of use for a prefetch hint."""

    name = "predicted"

    def __init__(self, predictor=None, lookahead: int = 1, prior=None, prior_weight: float = 0.25,
                 prefetch_threshold: float = 0.3, shrink: float = 4.0, refresh_every: int = 4):
        if lookahead < 0:
            raise ValueError(f"predicted policy: lookahead must be >= 0, got {lookahead}")
        if not 0.0 <= prefetch_threshold <= 1.0:
            raise ValueError(f"predicted policy: prefetch_threshold must lie in [0, 1], got {prefetch_threshold}")
        self.predictor, self.lookahead, self.prior = predictor, lookahead, prior
        self.prior_weight, self.threshold, self.shrink, self.refresh_every = prior_weight, prefetch_threshold, shrink, refresh_every

    def bind(self, num_layers, num_experts, capacity):
        super().bind(num_layers, num_experts, capacity)
        L, E = num_layers, num_experts
        shape = (L, E, MAX_GAP + 1)
        self.trials, self.uses = np.zeros(shape), np.zeros(shape)
        if self.prior is not None:
            pt, pu = self.prior
            if pt.shape != shape:
                raise ValueError(f"predicted policy: prior shape {pt.shape} != {shape}")
            self.trials += self.prior_weight * pt
            self.uses += self.prior_weight * pu
        self.last_tok = np.full((L, E), -MAX_GAP, dtype=np.int64)  # token of last use
        self.override = np.full((L, E), np.nan)  # predictor's p(use) for the current token's next layers
        self.token, self.layer = -1, L - 1
        self._refresh()

    # -- the next-token model --------------------------------------------------------------
    def _refresh(self) -> None:
        """Expected tokens until next use, ttu [L, E, MAX_GAP + 2], indexed by gap (0 unused)."""
        t, u = self.trials, self.uses
        base = (u.sum(1, keepdims=True) + 1.0) / (t.sum(1, keepdims=True) + 2.0)  # per layer and gap
        self.h = np.clip((u + self.shrink * base) / (t + self.shrink), 1e-4, 1.0)  # [L, E, G+1]
        ttu = np.empty(self.h.shape[:2] + (MAX_GAP + 2,))
        ttu[..., MAX_GAP + 1] = ttu[..., MAX_GAP] = 1.0 / self.h[..., MAX_GAP]
        for g in range(MAX_GAP - 1, 0, -1):
            ttu[..., g] = 1.0 + (1.0 - self.h[..., g]) * ttu[..., g + 1]
        self.ttu = ttu

    def on_access(self, layer, experts, clock):
        L, E = self.num_layers, self.num_experts
        if layer <= self.layer:  # wrapped around: a new token
            self.token += 1
            if self.token % self.refresh_every == 0:
                self._refresh()
        self.layer = layer
        gap = np.clip(self.token - self.last_tok[layer], 1, MAX_GAP)
        self.trials[layer, np.arange(E), gap] += 1.0
        self.uses[layer, experts, gap[experts]] += 1.0
        self.last_tok[layer, experts] = self.token
        self.override[layer] = np.nan

    # -- scores ----------------------------------------------------------------------------
    def keep_score(self, gids):
        L, E = self.num_layers, self.num_experts
        lay, ex = gids // E, gids % E
        upcoming = lay > self.layer  # used by the current token still, else by the next one
        t_next = self.token + (~upcoming)
        gap = np.clip(t_next - self.last_tok[lay, ex], 1, MAX_GAP)
        tokens = self.ttu[lay, ex, gap]
        p = self.override[lay, ex]
        known = ~np.isnan(p)
        if known.any():
            tokens = np.where(known, 1.0 + (1.0 - np.nan_to_num(p)) * self.ttu[lay, ex, np.minimum(gap + 1, MAX_GAP)], tokens)
        d0 = (lay - self.layer - 1) % L + 1
        return -(d0 + L * (tokens - 1.0))

    def on_route(self, layer, state, clock):
        L, E = self.num_layers, self.num_experts
        hints = []
        if self.predictor is not None and self.lookahead > 0 and state is not None:
            scores = np.asarray(self.predictor.predict(state, layer), dtype=np.float64)[0]  # [lookahead, E]
            if scores.min() < 0.0 or scores.max() > 1.0:
                scores = 1.0 / (1.0 + np.exp(-scores))
            for j in range(min(self.lookahead, scores.shape[0])):
                nl = layer + 1 + j
                if nl >= L:
                    break
                self.override[nl] = scores[j]
                want = np.flatnonzero(scores[j] >= self.threshold)
                hints.append(nl * E + want[np.argsort(-scores[j][want])])
        # the next token's experts of this layer, by the next-token model
        gap = np.clip(self.token + 1 - self.last_tok[layer], 1, MAX_GAP)
        p_next = self.h[layer, np.arange(E), gap]
        want = np.flatnonzero(p_next >= self.threshold)
        hints.append(layer * E + want[np.argsort(-p_next[want])])
        return np.concatenate(hints).astype(np.int64) if hints else np.zeros(0, dtype=np.int64)
