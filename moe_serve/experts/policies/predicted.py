"""Predictor-guided policy: evict by predicted next use, prefetch what the next layers will need.

Belady evicts the expert whose next use is furthest away. This policy estimates that distance:

- **next-token model** (learned online, optionally warm-started from another trace): for every
  layer and expert, the hazard h[l, e, gap] that an expert last used `gap` tokens ago is used by
  the next token. The previous token's routing is the gap=1 case, the strongest signal; frequency
  enters through the per-expert counts. From h follows the expected number of tokens until the next
  use, truncated at a horizon of H tokens (E[min(N, H)] = sum_{i<H} P(N > i)): beyond the time an
  expert survives in the cache, how much later it is needed no longer matters.
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
from moe_serve.experts.policies.reuse import NF, ReuseForecast, until_from_logits

MAX_GAP = 64  # gaps >= MAX_GAP share one hazard
FAR = -MAX_GAP  # "last used" of an expert never used


def gap_counts(experts: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Hazard statistics of a trace replayed as one stream: (trials, uses) float [L, E, MAX_GAP + 1].
    trials[l, e, g] counts tokens at which expert e of layer l had last been used g tokens before
    (g = MAX_GAP: that long ago or never); uses counts those at which it was used again."""
    T, L, K = experts.shape
    trials = np.zeros((L, num_experts, MAX_GAP + 1))
    uses = np.zeros_like(trials)
    base = (np.arange(L)[:, None] * num_experts + np.arange(num_experts)[None, :]) * (MAX_GAP + 1)  # [L, E]
    last = np.full((L, num_experts), FAR, dtype=np.int64)
    lidx = np.arange(L)[:, None]
    for t in range(T):
        flat = base + np.minimum(t - last, MAX_GAP)  # [L, E]
        trials.reshape(-1)[flat.reshape(-1)] += 1.0
        uses.reshape(-1)[flat[lidx, experts[t]].reshape(-1)] += 1.0  # ids are unique within a layer
        last[lidx, experts[t]] = t
    return trials, uses


def _gap(d: np.ndarray) -> np.ndarray:
    """Tokens since last use, as a hazard index in [1, MAX_GAP] (np.clip is slow on small arrays)."""
    return np.minimum(np.maximum(d, 1), MAX_GAP)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.minimum(np.maximum(p, 1e-4), 1 - 1e-4)
    return np.log(p) - np.log1p(-p)


def combine(p_layer: np.ndarray, p_token: np.ndarray, base: float) -> np.ndarray:
    """Two forecasts of the same event, one from this token's earlier layers (the predictor), one
    from this expert's own recency (the next-token model), combined as independent evidence over
    the base rate (naive Bayes in log-odds): each signal is weak alone, together far less so."""
    z = _logit(p_layer) + _logit(p_token) - _logit(np.asarray(base))
    return 1.0 / (1.0 + np.exp(-z))


def as_probabilities(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Predictor scores [..., E] (any scale; logits when negative) -> P(expert used) [..., E]: the
    scores' shares of the top_k experts a token uses, capped at 1."""
    if scores.min() < 0.0:
        scores = np.exp(scores - scores.max(-1, keepdims=True))
    share = scores / np.maximum(scores.sum(-1, keepdims=True), 1e-12)
    return np.minimum(share * top_k, 1.0)


def auto_horizon(resident_fraction: float) -> int:
    """H in tokens for a cache holding `resident_fraction` of all experts: 16 x the fraction, within
    [4, 8] (4 up to 25% resident, 8 from 50%; both measured best there, see `PredictedPolicy`)."""
    return int(min(max(round(16 * resident_fraction), 4), 8))


class PredictedPolicy(CachePolicy):
    """`predictor`: object with `top_k` and `predict(state, layer) -> scores [B, lookahead, E]` (any
    scale, see `as_probabilities`), or None. `prior`: (trials, uses) from `gap_counts`
    on a profiling trace, weighted by `prior_weight`. `horizon`: H in tokens, or None for
    `auto_horizon` of the cache's size: the longer an expert stays resident, the further ahead its
    next use matters. Measured on the DeepSeek-V2-Lite traces (replay of the first 2255 summary / 1520
    intent rows at 25%, demand-first, the other domain's predictor, no forced prefetch): H = 4 beats 8
    (hit/Belady summary .715 -> .755 with prior weight .05, intent .757 -> .801); at 50% resident
    H = 8 beats 4 (first 2,000 rows, lookahead 6, 54.8 GB/s, predicted-prefetch: ready-in-time
    .871 -> .884 intent, .850 -> .862 summary; .889 -> .899 / .857 -> .868 with `prefetch_from` 2),
    while at 25% it stalls longer (31.1 -> 35.4 ms/token intent, 38.4 -> 42.7 summary). The other
    domain's hazard prior costs more than it helps (weight 0: .768 / .819), so it is off unless asked
    for: the hazards are learned online from the first token.
    `prefetch_from`: the nearest predicted layer (1 = the next) whose experts are prefetched. A copy
    that takes longer than d layers of compute cannot land before layer l + d starts: such hints
    only hold up the link for copies that could. Their predictions still steer eviction.
    `prefetch_threshold`: least predicted probability of use for a prefetch hint (admitted only if it
    outranks its victim). `prefetch_top`: the predictor's N likeliest experts of each predicted layer
    are fetched whatever they displace (more hits for more bytes); `combined_top`: so are the N
    likeliest by the combined estimate (predictor and the expert's own recent use at that layer,
    `combine`), which catches the likely misses the predictor alone ranks too low.

    `reuse_weights` (opt-in; `reuse.fit_reuse` on another trace): the learned reuse forecast (decayed
    use counts and which experts follow the previous token's at the same layer, learned online) is
    mixed into each expert's expected tokens until use with weight `reuse_mix`; the predicted layers
    keep the predictor's estimate. Full traces, 50%, lookahead 6, 54.8 GB/s, prefetch from 2, fitted on
    the other domain: ready-in-time summary .8837 -> .8919, intent .9098 -> .9132 (mix .75; .8907 / .9141 at .5).

    Online cost: everything that depends only on the hazards (their log-odds, E[min(N, H)] for every
    gap) is tabulated at each refresh, so a layer step is a few gathers over E experts."""

    name = "predicted"

    def __init__(self, predictor=None, lookahead: int = 1, prior=None, prior_weight: float = 0.0,
                 prefetch_threshold: float = 0.5, horizon: int | None = None, shrink: float = 4.0,
                 refresh_every: int = 16, prefetch_top: int = 0, combined_top: int = 0, prefetch_from: int = 1,
                 reuse_weights: np.ndarray | None = None, reuse_mix: float = 0.75):
        if lookahead < 0:
            raise ValueError(f"predicted policy: lookahead must be >= 0, got {lookahead}")
        if not 0.0 <= prefetch_threshold <= 1.0:
            raise ValueError(f"predicted policy: prefetch_threshold must lie in [0, 1], got {prefetch_threshold}")
        if horizon is not None and horizon < 1:
            raise ValueError(f"predicted policy: horizon must be >= 1 token, got {horizon}")
        if prefetch_from < 1:
            raise ValueError(f"predicted policy: prefetch_from must be >= 1 layer, got {prefetch_from}")
        self.predictor, self.lookahead, self.prior, self.prior_weight = predictor, lookahead, prior, prior_weight
        self.threshold, self.horizon, self.shrink, self.refresh_every = prefetch_threshold, horizon, shrink, refresh_every
        if prefetch_top < 0:
            raise ValueError(f"predicted policy: prefetch_top must be >= 0, got {prefetch_top}")
        self.prefetch_top, self.combined_top, self.prefetch_from = prefetch_top, combined_top, prefetch_from
        self._horizon_arg = horizon
        if not 0.0 <= reuse_mix <= 1.0:
            raise ValueError(f"predicted policy: reuse_mix must lie in [0, 1], got {reuse_mix}")
        # the learned reuse forecast (`reuse.py`, weights [NF, >= H-1] from `fit_reuse`), mixed into the
        # expected tokens until use with weight reuse_mix; None: the hazards alone
        self.reuse_weights = None if reuse_weights is None else np.asarray(reuse_weights, dtype=np.float64)
        self.reuse_mix = reuse_mix
        self._forced: set[int] = set()

    def bind(self, num_layers, num_experts, capacity):
        super().bind(num_layers, num_experts, capacity)
        L, E = num_layers, num_experts
        self.horizon = self._horizon_arg or auto_horizon(capacity / (L * E))
        shape = (L, E, MAX_GAP + 1)
        self.trials, self.uses = np.zeros(shape), np.zeros(shape)
        if self.prior is not None:
            pt, pu = self.prior
            if pt.shape != shape:
                raise ValueError(f"predicted policy: prior shape {pt.shape} != {shape}")
            self.trials += self.prior_weight * pt
            self.uses += self.prior_weight * pu
        self.last_tok = np.full((L, E), FAR, dtype=np.int64)  # token of each expert's last use
        self._reuse = ReuseForecast(L, E) if self.reuse_weights is not None else None
        wshape = None if self._reuse is None else self.reuse_weights.shape
        if wshape is not None and (len(wshape) != 2 or wshape[0] != NF or wshape[1] < self.horizon - 1):
            raise ValueError(f"predicted policy: reuse_weights shape {wshape} must be [{NF}, >= {self.horizon - 1}]")
        self.tokens = np.ones((L, E))  # expected tokens until use, counted from the next opportunity
        self.token, self.layer = -1, L - 1
        self._e = np.arange(E)
        self._scores = None
        self._z_base = _logit(np.asarray(self.predictor.top_k / E)) if self.predictor is not None else 0.0
        self._refresh()

    # -- the next-token model --------------------------------------------------------------
    def _refresh(self) -> None:
        """Hazards h [L, E, MAX_GAP + 1] from the counts, shrunk towards each layer's per-gap rate."""
        t, u = self.trials, self.uses
        # per layer: overall use rate, then per gap shrunk towards it, then per expert towards that
        overall = (u.sum((1, 2), keepdims=True) + 1.0) / (t.sum((1, 2), keepdims=True) + self.num_experts)
        base = (u.sum(1, keepdims=True) + self.shrink * overall) / (t.sum(1, keepdims=True) + self.shrink)
        self.h = np.clip((u + self.shrink * base) / (t + self.shrink), 1e-4, 1.0)
        self.logit_h = _logit(self.h)  # [L, E, G] for `combine`, once per refresh
        # E[min(N, H)] for every layer, expert and gap at once (the online path only gathers):
        # _tab[h] [L, E, G] for every horizon h <= H
        G = MAX_GAP + 1
        gaps = np.arange(G)
        until, survive = np.ones_like(self.h), np.ones_like(self.h)  # [L, E, G]
        self._tab = {1: until.copy()}
        for i in range(self.horizon - 1):  # E[min(N, H)] = 1 + sum_{i < H-1} P(N > i + 1)
            survive *= 1.0 - self.h[:, :, np.minimum(gaps + i, MAX_GAP)]
            until += survive
            self._tab[i + 2] = until.copy()
        for l in range(self.num_layers):
            self._update_row(l, self.token + 1 if l <= self.layer else self.token)

    def _until(self, layer: int, gap: np.ndarray, horizon: int) -> np.ndarray:
        """E[min(N, horizon)] [E]: expected tokens until use (1 = the next opportunity), given gap [E]."""
        return self._tab[horizon][layer, self._e, gap]

    def _update_row(self, layer: int, next_token: int) -> None:
        gap = _gap(next_token - self.last_tok[layer])
        self.tokens[layer] = self._until(layer, gap, self.horizon)
        if self._reuse is not None:
            w = self.reuse_weights[:, : self.horizon - 1]  # [NF, H-1]
            learned = until_from_logits(self._reuse.logits(layer, next_token, w)) if self.horizon > 1 else 1.0
            self.tokens[layer] += self.reuse_mix * (learned - self.tokens[layer])

    def on_access(self, layer, experts, clock):
        if layer <= self.layer:  # wrapped around: a new token
            self.token += 1
            if self.token % self.refresh_every == 0:
                self._refresh()
        self.layer = layer
        if self._reuse is not None:
            self._reuse.observe(layer, experts, self.token)
        gap = _gap(self.token - self.last_tok[layer])
        self.trials[layer, self._e, gap] += 1.0
        self.uses[layer, experts, gap[experts]] += 1.0
        self.last_tok[layer, experts] = self.token
        self._update_row(layer, self.token + 1)
        self._scores = None

    # -- scores ----------------------------------------------------------------------------
    def keep_score(self, gids):
        if self._scores is None:  # one vector per layer step, shared by every eviction in it
            L = self.num_layers
            d0 = (np.arange(L) - self.layer - 1) % L + 1  # [L]
            self._scores = -(d0[:, None] + L * (self.tokens - 1.0)).reshape(-1)
        return self._scores[gids]

    def admits(self, g, victim):
        if g in self._forced:  # one of the predictor's top picks: fetched whatever it displaces
            return True
        ks = self.keep_score(np.array([victim, g], dtype=np.int64))
        return bool(ks[1] > ks[0])

    def on_route(self, layer, state, clock):
        """Every predicted layer at once, as arrays [J, E] (J = the predicted layers that exist after
        `layer`): this runs after every router of every step, on the host, while the device waits."""
        E = self.num_experts
        hints = []
        self._forced.clear()
        if self.predictor is not None and self.lookahead > 0 and state is not None:
            scores = as_probabilities(np.asarray(self.predictor.predict(state, layer), dtype=np.float64),
                                      self.predictor.top_k)  # [B, D, E]
            # P(any token of the batch uses the expert): [D, E]
            scores = scores[0] if scores.shape[0] == 1 else 1.0 - np.prod(1.0 - scores, axis=0)
            nls = np.arange(layer + 1, min(layer + 1 + min(self.lookahead, scores.shape[0]), self.num_layers))
            J = nls.size
            if J:
                scores = scores[:J]
                rows, cols = nls[:, None], self._e[None, :]
                gap = _gap(self.token - self.last_tok[nls])  # [J, E]: layers nls, this token
                # `combine` with the hazard's log-odds from the refresh-time table
                z = _logit(scores) - self._z_base + self.logit_h[rows, cols, gap]
                p = 1.0 / (1.0 + np.exp(-z))  # [J, E]
                order = np.argsort(-p, axis=1)  # most likely first
                # forced picks: the predictor's own top, plus the top by the combined estimate, which adds
                # the previous tokens' use of the expert at layer nl (the strongest single signal)
                top = np.argsort(-scores, axis=1)[:, : self.prefetch_top]  # [J, prefetch_top]
                if self.combined_top:  # duplicates are harmless
                    top = np.concatenate([top, order[:, : self.combined_top]], axis=1)
                near = max(self.prefetch_from - 1, 0)  # the first `near` rows are too close to prefetch for
                self._forced.update((rows[near:] * E + top[near:]).ravel().tolist())
                later = self._tab[max(self.horizon - 1, 1)][rows, cols, np.minimum(gap + 1, MAX_GAP)]
                self.tokens[nls] = 1.0 + (1.0 - p) * later
                # hinted: the forced picks, and the rest on the predictor's own confidence (not the combined
                # estimate, which is overconfident: it counts shared evidence twice)
                want = scores >= self.threshold
                row_of = np.arange(J)[:, None]
                want[row_of, top] = True
                want[:near] = False
                # row by row, most likely first: boolean indexing walks the rows in order
                hints.append((rows * E + order)[want[row_of, order]])
            self._scores = None
        # the next token's experts of this layer, by the next-token model
        p_next = self.h[layer, self._e, _gap(self.token + 1 - self.last_tok[layer])]
        want = np.flatnonzero(p_next >= self.threshold)
        hints.append(layer * E + want[np.argsort(-p_next[want])])
        return np.concatenate(hints).astype(np.int64)
