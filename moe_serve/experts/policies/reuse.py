"""Learned reuse forecast for eviction: P(expert (l, e) is used within its next w opportunities), w = 1..H.

Why: most misses at 50% resident are experts evicted shortly before they come back, and the
per-expert hazard (time since last use) cannot tell those apart. What does: which experts follow the
previous token's experts at the same layer *in this domain*. The forecast keeps that online, as
counts learned from the routing it observes (nothing from another domain), plus decayed use counts:

features of (l, e) before token t routes layer l, float [E, NF]:
  gap since last use, one-hot over (1, 2, 3, 4, 5-8, 9-16, 17-32, 33-63, >= 64)   [9]
  log1p of decayed use counts, half-lives 4 / 16 / 64 tokens                     [3]
  transition log-odds: mean over the previous token's experts a at layer l of
    logit P(e used within the next W tokens | a used now) - logit P(e used within W)   [1]
  1                                                                              [1]
and P(N <= w) = sigmoid(features @ weights[:, w - 1]), weights [NF, H] fitted offline (`fit_reuse`)
on a trace replayed as one stream, with the transition counts learned online there as well.
Arrays in, arrays out; per layer step one [E, NF] x [NF, H] product and K x W*K count updates.
"""
from __future__ import annotations

import numpy as np

HALF_LIVES = np.array([4.0, 16.0, 64.0])
DECAY = 0.5 ** (1.0 / HALF_LIVES)  # [3]
GAP_EDGES = np.array([1, 2, 3, 4, 5, 9, 17, 33, 64])  # bucket b holds gaps in [edge b, edge b+1)
NF = 9 + 3 + 1 + 1
WINDOW = 4  # W of the transition feature, in tokens
SMOOTH = 4.0  # pseudo-counts towards e's own rate


class ReuseForecast:
    """Online state for `features`; `observe(layer, experts [K], token)` as each layer routes."""

    def __init__(self, num_layers: int, num_experts: int):
        L, E = num_layers, num_experts
        self.num_layers, self.num_experts = L, E
        self.last = np.full((L, E), -GAP_EDGES[-1], dtype=np.int64)  # token of last use
        self.ema = np.zeros((3, L, E))
        self.hist: list[list[np.ndarray]] = [[] for _ in range(L)]  # per layer: the last W + 1 tokens' experts
        self.pair = np.zeros((L, E, E))  # [l, a, b]: a used at s - 1, b within s .. s + W - 1
        self.seen = np.zeros((L, E))  # [l, a]: windows counted after a
        self.within = np.zeros((L, E))  # [l, b]: windows holding b
        self.windows = np.zeros(L)
        self._e = np.arange(E)

    def observe(self, layer: int, experts: np.ndarray, token: int) -> None:
        experts = np.asarray(experts, dtype=np.int64)
        self.ema[:, layer] *= DECAY[:, None]
        self.ema[:, layer, experts] += 1.0
        self.last[layer, experts] = token
        hist = self.hist[layer]
        hist.append(experts)
        if len(hist) > WINDOW + 1:
            hist.pop(0)
        if len(hist) == WINDOW + 1:  # the window after hist[0] is complete
            after = np.unique(np.concatenate(hist[1:]))
            self.pair[layer][np.ix_(hist[0], after)] += 1.0
            self.seen[layer, hist[0]] += 1.0
            self.within[layer, after] += 1.0
            self.windows[layer] += 1.0

    def _gap_bucket(self, layer: int, next_token: int) -> np.ndarray:
        gap = np.minimum(np.maximum(next_token - self.last[layer], 1), GAP_EDGES[-1])
        return np.searchsorted(GAP_EDGES, gap, side="right") - 1  # [E]

    def _transition(self, layer: int) -> np.ndarray | None:
        """[E] transition log-odds after the last token's experts at `layer`, or None before any window."""
        hist = self.hist[layer]
        if not hist or self.windows[layer] == 0:
            return None
        prev = hist[-1]  # the experts the last token used at this layer: [K]
        rate = np.clip((self.within[layer] + 1.0) / (self.windows[layer] + 2.0), 1e-3, 1 - 1e-3)  # [E]
        p = (self.pair[layer][prev] + SMOOTH * rate) / (self.seen[layer, prev][:, None] + SMOOTH)  # [K, E]
        p = np.clip(p, 1e-3, 1 - 1e-3)
        return (np.log(p) - np.log1p(-p)).mean(0) - (np.log(rate) - np.log1p(-rate))

    def logits(self, layer: int, next_token: int, weights: np.ndarray) -> np.ndarray:
        """features(layer, next_token) @ weights [NF, W] without building the features: [E, W]."""
        z = weights[self._gap_bucket(layer, next_token)] + np.log1p(self.ema[:, layer].T) @ weights[9:12] + weights[13]
        trans = self._transition(layer)
        return z if trans is None else z + trans[:, None] * weights[12]

    def features(self, layer: int, next_token: int) -> np.ndarray:
        """float [E, NF] of layer `layer`'s experts before `next_token` routes it."""
        f = np.zeros((self.num_experts, NF))
        f[self._e, self._gap_bucket(layer, next_token)] = 1.0
        f[:, 9:12] = np.log1p(self.ema[:, layer].T)
        trans = self._transition(layer)
        if trans is not None:
            f[:, 12] = trans
        f[:, 13] = 1.0
        return f


def tokens_until(features: np.ndarray, weights: np.ndarray, horizon: int) -> np.ndarray:
    """E[min(N, horizon)] [E] (1 = used at the next opportunity) from features [E, NF], weights [NF, >= H-1]."""
    if horizon <= 1:
        return np.ones(features.shape[0])
    return until_from_logits(features @ weights[:, : horizon - 1])


def until_from_logits(z: np.ndarray) -> np.ndarray:
    """z [E, H-1]: logit P(N <= w), w = 1..H-1 -> E[min(N, H)] [E]."""
    p = np.maximum.accumulate(1.0 / (1.0 + np.exp(-z)), axis=1)  # a CDF does not decrease
    return 1.0 + (1.0 - p).sum(1)


def training_rows(experts: np.ndarray, num_experts: int, horizon: int, every: int = 4):
    """A trace int [T, L, K] replayed as one stream -> X float32 [n, NF], Y float32 [n, H] (Y[:, w-1]:
    used within the next w opportunities), one row per expert and layer of every `every`-th token."""
    T, L, K = experts.shape
    if T <= every:  # the first row is taken at token `every`
        raise ValueError(f"the reuse forecast is fitted on a trace of >= {every + 1} tokens, got {T}")
    nxt = np.full((T + 1, L, num_experts), 2**40, dtype=np.int64)  # next token >= t using (l, e)
    for t in range(T - 1, -1, -1):
        nxt[t] = nxt[t + 1]
        nxt[t][np.arange(L)[:, None], experts[t]] = t
    state = ReuseForecast(L, num_experts)
    X, Y = [], []
    for t in range(T):
        for layer in range(L):
            if t % every == 0 and t > 0:
                X.append(state.features(layer, t).astype(np.float32))
                until = nxt[t, layer] - t + 1  # [E]
                Y.append((until[:, None] <= np.arange(1, horizon + 1)[None]).astype(np.float32))
            state.observe(layer, experts[t, layer], t)
    return np.concatenate(X), np.concatenate(Y)


def fit_reuse(experts: np.ndarray, num_experts: int, horizon: int = 8, steps: int = 60) -> np.ndarray:
    """Weights float [NF, horizon] by logistic regression (L-BFGS) on `training_rows` of a trace."""
    import torch

    X, Y = (torch.from_numpy(a) for a in training_rows(experts, num_experts, horizon))
    w = torch.zeros(NF, horizon, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w, Y) + 1e-4 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach().numpy().astype(np.float64)
