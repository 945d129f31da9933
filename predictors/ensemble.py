"""A weighted sum of other predictors' standardized scores, the weights tuned on held-out sequences.

Members are fitted on most of the training sequences; the rest choose, per slot, the weight of each
member (a small grid, the first member fixed at 1) that maximizes recall@k there. Scores are
standardized per row (zero mean, unit spread) so that counts, probabilities and logits can be added.
"""
from __future__ import annotations

import itertools

import torch

from predictors.base import Predictor, RoutingState
from predictors.param_limits import Limit
from predictors.dataset import slot_targets
from predictors.metrics import hits_at
from predictors.traces import RoutingTrace, split_sequences

GRID = (0.0, 0.25, 0.5, 1.0, 2.0)


def standardize(s: torch.Tensor) -> torch.Tensor:
    if s.numel() == 0:  # a batch of no tokens: std() of nothing warns
        return s
    centred = s - s.mean(-1, keepdim=True)
    if s.shape[-1] == 1:  # one expert: nothing to rank, and std() of one value is NaN (Bessel's n - 1)
        return centred
    return centred / s.std(-1, keepdim=True).clamp(min=1e-6)


def split_traces(traces: list[RoutingTrace], fraction: float) -> tuple[list[RoutingTrace], list[RoutingTrace]]:
    """Hold out whole sequences of each trace (traces with one sequence stay in training)."""
    fit, held = [], []
    for t in traces:
        if t.num_sequences < 2:
            fit.append(t)
            continue
        a, b = split_sequences(t, fraction, seed=0)
        fit.append(a)
        held.append(b)
    return fit, held


class EnsemblePredictor(Predictor):
    name = "ensemble"
    # fit: members (names, ["mlp", "prev_token", "transition"]), holdout (fraction of sequences, 0.2),
    # member_params ({member name: its parameters}); member_configs: written by config(), read on load
    PARAMS = frozenset({"members", "holdout", "member_params", "member_configs"})
    PARAM_LIMITS = dict(members=Limit("names"), holdout=Limit("float", gt=0, lt=1), member_params=Limit("dict"),
                        member_configs=Limit("list"))

    def member_names(self) -> list[str]:
        return list(self.params.get("members", ["mlp", "prev_token", "transition"]))

    def fit(self, traces: list[RoutingTrace]) -> "EnsemblePredictor":
        from predictors.registry import make_predictor

        self.check_traces(traces)
        names = self.member_names()
        fit_on, held = split_traces(traces, float(self.params.get("holdout", 0.2)))
        member_params = self.params.get("member_params", {})
        if set(member_params) - set(names):  # parameters for a member that is not there: a misspelt name
            raise ValueError(f"{self.name}: member_params names {sorted(set(member_params) - set(names))}, "
                             f"not among members {names}")
        for n, kw in member_params.items():  # make_predictor(**4) was a TypeError traceback
            if not isinstance(kw, dict):
                raise ValueError(f"{self.name}: member_params[{n!r}] must be an object of {n}'s parameters, got {kw!r}")
        members = []  # every member made (its parameters checked) before the first one is fitted
        for n in names:
            try:
                members.append(make_predictor(n, self.num_layers, self.num_experts, self.top_k, self.lookahead,
                                              **member_params.get(n, {})))
            except ValueError as exc:
                raise ValueError(f"{self.name}: member {n!r}: {exc}") from exc
        self.members = [m.fit(fit_on) for m in members]
        self.needs_hidden = any(m.needs_hidden for m in self.members)  # e.g. an mlp fitted with hidden states
        self.weight = torch.zeros(self.slots, len(names))
        self.weight[:, 0] = 1.0
        if held:
            self._tune(held)
        self.fitted = True
        return self

    def _tune(self, held: list[RoutingTrace]) -> None:
        """Grid search per slot over member weights, maximizing held-out hits at k."""
        per_slot = [[] for _ in range(self.slots)]  # lists of ([M, N, E] scores, [N, K] true)
        for trace in held:
            tgt = slot_targets(trace, self.lookahead)
            for layer in range(trace.num_layers):
                state = RoutingState.from_trace(trace, layer)
                scores = torch.stack([standardize(m.predict(state, layer)) for m in self.members])  # [M, T, D, E]
                for j in range(self.slots):
                    ok = tgt[:, layer, j, 0] >= 0
                    if ok.any():
                        per_slot[j].append((scores[:, ok, j], tgt[ok, layer, j]))
        for j, items in enumerate(per_slot):
            if not items:
                continue
            S = torch.cat([s for s, _ in items], 1)  # [M, N, E]
            Y = torch.cat([y for _, y in items])
            best, best_w = -1.0, None
            for rest in itertools.product(GRID, repeat=len(self.members) - 1):
                w = torch.tensor((1.0,) + rest)
                h = hits_at(torch.einsum("m,mne->ne", w, S), Y, self.top_k).sum().item()
                if h > best:
                    best, best_w = h, w
            self.weight[j] = best_w

    @torch.inference_mode()
    def predict(self, state: RoutingState, layer: int) -> torch.Tensor:
        self.check(state, layer)
        out = 0.0
        for i, m in enumerate(self.members):
            w = self.weight[:, i]  # [D]
            if bool((w != 0).any()):
                out = out + standardize(m.predict(state, layer)) * w[None, :, None]
        return out

    @property
    def adapts(self) -> bool:
        """True when a member learns online (e.g. mlp_online): then observe() reaches it."""
        return any(m.adapts for m in getattr(self, "members", []))

    def observe(self, experts, weights, prev_experts, prev_weights=None, hidden=None) -> None:
        for m in self.members:
            m.observe(experts, weights, prev_experts, prev_weights, hidden)

    def arrays(self):
        arrays = {"weight": self.weight}
        for i, m in enumerate(self.members):
            arrays.update({f"m{i}.{k}": v for k, v in m.arrays().items()})
        return arrays

    def config(self) -> dict:
        if getattr(self, "members", None):
            self.params["member_configs"] = [m.config() for m in self.members]
        return super().config()

    def array_shapes(self):  # each member checks its own arrays (m{i}.*) when it is loaded
        return {"weight": (self.slots, len(self.params.get("member_configs", [])))}

    def load_arrays(self, arrays):
        from predictors.registry import from_config

        self.weight = arrays["weight"]
        self.members = []
        for i, cfg in enumerate(self.params["member_configs"]):
            prefix = f"m{i}."
            self.members.append(from_config(cfg, {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}))
        self.needs_hidden = any(m.needs_hidden for m in self.members)
        self.fitted = True
