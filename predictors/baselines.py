"""Count-based predictors: expert popularity, layer-to-layer transitions, the previous token's routing.

They need nothing but routing ids, fit in one pass of counting, and cost a gather and a sum online.
"""
from __future__ import annotations

import torch

from predictors.base import Predictor, RoutingState, multi_hot, normalized, trace_tensors
from predictors.param_limits import Limit
from predictors.dataset import slot_targets
from predictors.traces import RoutingTrace


def layer_frequency(traces: list[RoutingTrace], num_experts: int) -> torch.Tensor:
    """float [L, E]: fraction of tokens routed to each expert, per layer."""
    counts = sum(multi_hot(trace_tensors(t)[0], num_experts).sum(0) for t in traces)
    tokens = sum(t.num_tokens for t in traces)
    return counts / max(tokens, 1)


class CountPredictor(Predictor):
    """Shared plumbing: a popularity table [L, E] that every count predictor uses for ties."""

    def _fit_frequency(self, traces):
        self.check_traces(traces)
        self.freq = layer_frequency(traces, self.num_experts)

    def fit(self, traces):
        """Popularity and previous-token need nothing but the frequency table."""
        self._fit_frequency(traces)
        self.fitted = True
        return self

    def array_shapes(self):
        return {"freq": (self.num_layers, self.num_experts)}

    def _prior(self, layer: int, batch: int) -> torch.Tensor:
        """[B, D, E]: popularity of each slot's target layer, zeros past the last layer."""
        out = torch.zeros(batch, self.slots, self.num_experts)
        for j, t in enumerate(self.target_layers(layer)):
            if t < self.num_layers:
                out[:, j] = self.freq[t]
        return out


class PopularityPredictor(CountPredictor):
    """Each target layer's most used experts, whatever the token: the floor every predictor must beat."""

    name = "popularity"

    def predict(self, state: RoutingState, layer: int) -> torch.Tensor:
        self.check(state, layer)
        return self._prior(layer, state.batch_size)

    def arrays(self):
        return {"freq": self.freq}

    def load_arrays(self, arrays):
        self.freq = arrays["freq"]
        self.fitted = True


class TransitionPredictor(CountPredictor):
    """P(expert j at the target | expert i at the current layer), summed over the current experts.

    For lookahead 0 the "transition" is from this token's layer l to the next token's layer l.
    """

    name = "transition"
    PARAMS = frozenset({"smoothing", "weighted"})  # fit: smoothing (towards popularity, 1.0); predict: weighted (True)
    PARAM_LIMITS = dict(smoothing=Limit("float", gt=0), weighted=Limit("bool"))  # 0: an unseen expert's row is 0/0

    def fit(self, traces):
        self._fit_frequency(traces)
        E, L, D = self.num_experts, self.num_layers, self.slots
        counts = torch.zeros(D, L, E, E)
        source = torch.zeros(D, L, E)
        for trace in traces:
            cur = multi_hot(trace_tensors(trace)[0], E)  # [T, L, E]
            tgt = slot_targets(trace, self.lookahead)  # [T, L, D, K]
            for j in range(D):
                has = (tgt[:, :, j, 0] >= 0).float()  # [T, L]
                y = multi_hot(tgt[:, :, j], E)  # [T, L, E]
                counts[j] += torch.einsum("tli,tlj->lij", cur * has[..., None], y)
                source[j] += (cur * has[..., None]).sum(0)
        alpha = float(self.params.get("smoothing", 1.0))
        # rows: conditional distribution given source expert i, smoothed towards popularity
        prior = torch.stack([self._prior(l, 1)[0] for l in range(L)], 1)  # [D, L, E]
        self.table = (counts + alpha * prior[:, :, None, :]) / (source[..., None] + alpha)
        self.fitted = True
        return self

    def predict(self, state: RoutingState, layer: int) -> torch.Tensor:
        self.check(state, layer)
        ids = state.experts[:, layer]  # [B, K]
        # each current expert counts once, plus its share of the gate weight (orders near-ties)
        w = 1.0 + normalized(state.weights[:, layer]) if self.params.get("weighted", True) else (ids >= 0).float()
        w = torch.where(ids >= 0, w, 0.0)
        out = torch.zeros(state.batch_size, self.slots, self.num_experts)
        for j, t in enumerate(self.target_layers(layer)):
            if t < self.num_layers:
                rows = self.table[j, layer][ids.clamp(min=0)]  # [B, K, E]
                out[:, j] = (rows * w[..., None]).sum(1)
        return out + 1e-3 * self._prior(layer, state.batch_size)

    def arrays(self):
        return {"freq": self.freq, "table": self.table}

    def array_shapes(self):
        E = self.num_experts
        return {"freq": (self.num_layers, E), "table": (self.slots, self.num_layers, E, E)}

    def load_arrays(self, arrays):
        self.freq, self.table = arrays["freq"], arrays["table"]
        self.fitted = True


class PrevTokenPredictor(CountPredictor):
    """The previous token's experts at the target layer (consecutive tokens share experts).

    For lookahead 0 the "previous token" of the next token is the current one: its experts at `layer`.
    """

    name = "prev_token"

    def predict(self, state: RoutingState, layer: int) -> torch.Tensor:
        self.check(state, layer)
        out = 1e-3 * self._prior(layer, state.batch_size)
        for j, t in enumerate(self.target_layers(layer)):
            if t >= self.num_layers:
                continue
            if self.next_token:
                ids, w = state.experts[:, t], state.weights[:, t]
            else:
                ids = state.prev_experts[:, t]
                w = state.prev_weights[:, t] if state.prev_weights is not None else (ids >= 0).float()
            out[:, j] += multi_hot(ids, self.num_experts, normalized(w) + 1.0)
        return out

    def arrays(self):
        return {"freq": self.freq}

    def load_arrays(self, arrays):
        self.freq = arrays["freq"]
        self.fitted = True
