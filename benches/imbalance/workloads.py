"""Synthetic routing workloads for the imbalance suite: seeded, deterministic, numpy only.

Every workload returns (fit, stream): two int64 [T, L, K] arrays of expert ids. A plan is fitted on
`fit` and scored on `stream`. Tokens are drawn from a latent-topic model so that co-location matters:
each token picks one of `topics` topics; its K experts are drawn without replacement (Gumbel top-k)
from  base_load[e] x (1 + boost x [e in the topic's expert set]). The topic sets are scattered ids
(a fresh permutation per layer), so contiguous and round-robin placement cannot align with them.
"""
from __future__ import annotations

import numpy as np

E, L, K, T = 64, 4, 6, 4096
TOPICS, BOOST = 8, 6.0


def sample(base: np.ndarray, T: int, rng, topics=TOPICS, boost=BOOST) -> np.ndarray:
    """base float [L, E] or [T, L, E] (per-token, for time-varying load) -> expert ids int64 [T, L, K]."""
    Lb, Eb = base.shape[-2:]
    out = np.empty((T, Lb, K), dtype=np.int64)
    topic = rng.integers(topics, size=T)
    for l in range(Lb):
        members = np.random.default_rng(1000 + l).permutation(Eb).reshape(topics, -1)  # fixed per layer
        mask = np.zeros((topics, Eb))
        mask[np.arange(topics)[:, None], members] = boost
        w = (base[..., l, :] if base.ndim == 3 else base[l][None]) * (1.0 + mask[topic])
        logits = np.log(np.maximum(w, 1e-30)) + rng.gumbel(size=(T, Eb))
        logits[w <= 0] = -np.inf
        out[:, l] = np.argsort(-logits, axis=1)[:, :K]
    return out


def _zipf(s: float, rng) -> np.ndarray:
    return np.stack([rng.permutation(1.0 / np.arange(1, E + 1) ** s) for _ in range(L)])


def uniform(seed=0):
    rng = np.random.default_rng(seed)
    base = np.ones((L, E))
    return sample(base, T, rng), sample(base, T, rng)


def zipf(seed=0, s=1.0):
    rng = np.random.default_rng(seed)
    base = _zipf(s, rng)
    return sample(base, T, rng), sample(base, T, rng)


def hot_set(seed=0, n_hot=4, factor=8.0):
    """A few scattered experts take `factor` x the traffic of the others."""
    rng = np.random.default_rng(seed)
    base = np.ones((L, E))
    for l in range(L):
        base[l, rng.choice(E, n_hot, replace=False)] = factor
    return sample(base, T, rng), sample(base, T, rng)


def hot_rank(seed=0, ranks=8, factor=4.0):
    """The experts contiguous placement puts on rank 0 (ids 0 .. E/ranks-1) are all hot."""
    rng = np.random.default_rng(seed)
    base = np.ones((L, E))
    base[:, : E // ranks] = factor
    return sample(base, T, rng), sample(base, T, rng)


def rotating_hotspot(seed=0, n_hot=4, factor=8.0, phases=4):
    """The hot set moves to new experts `phases` times during the stream; the fit sees only the first."""
    rng = np.random.default_rng(seed)
    sets = [rng.choice(E, n_hot, replace=False) for _ in range(phases)]
    def base_of(i):
        b = np.ones((L, E))
        b[:, sets[i]] = factor
        return b
    fit = sample(base_of(0), T, rng)
    per_token = np.stack([base_of(min(t * phases // T, phases - 1)) for t in range(T)])
    return fit, sample(per_token, T, rng)


def bursts(seed=0, n_hot=4, factor=10.0, burst=256, period=1024):
    """Mostly Zipf(0.8) traffic, with a burst of `burst` tokens on a random hot set every `period`."""
    rng = np.random.default_rng(seed)
    base = _zipf(0.8, rng)
    per_token = np.repeat(base[None], T, axis=0)
    for start in range(period // 2, T, period):
        hot = rng.choice(E, n_hot, replace=False)
        per_token[start:start + burst, :, hot] *= factor
    return sample(base, T, rng), sample(per_token, T, rng)


def zero_load(seed=0, frac=0.25):
    """A quarter of the experts are never chosen (as with pruned or domain-dead experts)."""
    rng = np.random.default_rng(seed)
    base = _zipf(0.6, rng)
    for l in range(L):
        base[l, rng.choice(E, int(frac * E), replace=False)] = 0.0
    return sample(base, T, rng), sample(base, T, rng)


WORKLOADS = {
    "uniform": uniform,
    "zipf_0.6": lambda seed=0: zipf(seed, 0.6),
    "zipf_1.2": lambda seed=0: zipf(seed, 1.2),
    "hot_set": hot_set,
    "hot_rank": hot_rank,
    "rotating_hotspot": rotating_hotspot,
    "bursts": bursts,
    "zero_load": zero_load,
}
