"""The next layers' own routers applied to the current hidden state.

The residual stream changes little from one layer to the next, so layer t's router on the hidden
state entering layer l (< t) already ranks layer t's experts well. Needs the router weights (from
the model's checkpoint: `from_router_weights`) or traces with hidden states to estimate them
(`fit`: a softmax regression of each layer's gate weights on the hidden state entering that layer).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from predictors.base import Predictor, RoutingState, multi_hot
from predictors.param_limits import Limit
from predictors.traces import RoutingTrace

_LAYER = re.compile(r"layers\.(\d+)\.")


def router_weights_from_checkpoint(model_dir: str | Path, num_experts: int) -> dict[int, torch.Tensor]:
    """MoE layer index -> router weight [E, H], read from a checkpoint directory's *.safetensors.

    A router weight is any `...layers.N....gate.weight` tensor with E rows (Mixtral, Qwen-MoE,
    DeepSeek, OLMoE and GPT-OSS-style `router.weight` names); MoE layers are numbered in model-layer order.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"router checkpoint {model_dir}: no *.safetensors files")
    found = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    m = _LAYER.search(key)
                    if m and (key.endswith("gate.weight") or key.endswith("router.weight")) and "shared_expert_gate" not in key:
                        t = st.get_tensor(key)
                        if t.dim() == 2 and t.shape[0] == num_experts:
                            found[int(m.group(1))] = t
        except SafetensorError as exc:  # its own type (a traceback from the CLI), naming no file
            raise ValueError(f"router checkpoint {model_dir}: {f} is not a readable safetensors file ({exc})") from None
    if not found:
        raise ValueError(f"router checkpoint {model_dir}: no router weight with num_experts={num_experts} rows")
    return {i: found[n] for i, n in enumerate(sorted(found))}


class RouterPredictor(Predictor):
    name = "router"
    needs_hidden = True
    # fit: steps (LBFGS iterations, 100), l2 (1e-4); source: "checkpoint" or "fitted", written by
    # from_router_weights and fit (saved files carry it)
    PARAMS = frozenset({"steps", "l2", "source"})
    PARAM_LIMITS = dict(steps=Limit("int", ge=1), l2=Limit("float", ge=0), source=Limit("str", choices=("checkpoint", "fitted")))

    @classmethod
    def from_router_weights(cls, weights: dict[int, torch.Tensor], top_k: int, lookahead: int = 1) -> "RouterPredictor":
        """weights: MoE layer index -> router weight [E, H] (a model's gate.weight), every layer present."""
        layers = sorted(weights)
        if layers != list(range(len(layers))):
            raise ValueError(f"router weights must cover MoE layers 0..L-1 without gaps, got {layers}")
        W = torch.stack([weights[l].detach().float().cpu() for l in layers])  # [L, E, H]
        pred = cls(W.shape[0], W.shape[1], top_k, lookahead, source="checkpoint")
        pred.weight = W
        pred.fitted = True
        return pred

    def fit(self, traces: list[RoutingTrace]) -> "RouterPredictor":
        if self.fitted and self.params.get("source") == "checkpoint":
            return self  # the real routers need no fitting
        self.check_traces(traces)
        hidden = torch.cat([torch.from_numpy(t.hidden.astype(np.float32)) for t in traces])  # [T, L, H]
        # soft targets: the chosen experts' gate weights, renormalized (proportional to the router's softmax)
        y = torch.cat([
            multi_hot(torch.from_numpy(t.experts.astype(np.int64)), self.num_experts, torch.from_numpy(t.weights.astype(np.float32)))
            for t in traces
        ])
        y = y / y.sum(-1, keepdim=True).clamp(min=1e-6)  # [T, L, E]
        scale = hidden.pow(2).mean().sqrt().clamp(min=1e-6)
        W = torch.zeros(self.num_layers, self.num_experts, hidden.shape[-1], requires_grad=True)
        opt = torch.optim.LBFGS([W], lr=1.0, max_iter=int(self.params.get("steps", 100)), line_search_fn="strong_wolfe")
        l2 = float(self.params.get("l2", 1e-4))

        def closure():
            opt.zero_grad()
            logits = torch.einsum("tlh,leh->tle", hidden / scale, W)
            loss = -(y * F.log_softmax(logits, -1)).sum(-1).mean() + l2 * W.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weight = (W.detach() / scale)
        self.params["source"] = "fitted"
        self.fitted = True
        return self

    @torch.inference_mode()
    def predict(self, state: RoutingState, layer: int) -> torch.Tensor:
        self.check(state, layer)
        h = state.hidden.float()  # [B, H]
        out = torch.zeros(state.batch_size, self.slots, self.num_experts)
        for j, t in enumerate(self.target_layers(layer)):
            if t < self.num_layers:
                out[:, j] = torch.softmax(h @ self.weight[t].T, -1)
        return out

    @property
    def hidden_size(self) -> int | None:
        return int(self.weight.shape[-1]) if self.fitted else None  # weight [.., E, H]

    def arrays(self):
        return {"weight": self.weight}

    def array_shapes(self):
        return {"weight": (self.num_layers, self.num_experts, None)}  # [L, E, H]

    def load_arrays(self, arrays):
        self.weight = arrays["weight"]
        self.fitted = True


class HiddenLinearPredictor(Predictor):
    """A softmax regression from the hidden state at layer l to each slot's target layer routing.

    Unlike `router` (layer t's own router on layer l's hidden state), this learns the map for each
    (slot, source layer), so it absorbs the norm scales and the residual drift between l and t.
    Started from the checkpoint's routers when built with `from_router_weights`.
    """

    name = "hidden_linear"
    needs_hidden = True
    PARAMS = frozenset({"steps", "l2"})  # fit: LBFGS iterations (100), L2 pull towards the start (1e-4)
    PARAM_LIMITS = dict(steps=Limit("int", ge=1), l2=Limit("float", ge=0))

    @classmethod
    def from_router_weights(cls, weights: dict[int, torch.Tensor], top_k: int, lookahead: int = 1, **params):
        router = RouterPredictor.from_router_weights(weights, top_k, lookahead)
        pred = cls(router.num_layers, router.num_experts, top_k, lookahead, **params)
        pred.init = router.weight  # [L, E, H]
        return pred

    def fit(self, traces: list[RoutingTrace]) -> "HiddenLinearPredictor":
        from predictors.dataset import slot_target_dist

        self.check_traces(traces)
        L, E, D = self.num_layers, self.num_experts, self.slots
        hidden = torch.cat([torch.from_numpy(t.hidden.astype(np.float32)) for t in traces])  # [T, L, H]
        y = torch.cat([slot_target_dist(t, self.lookahead) for t in traces])  # [T, L, D, E]
        ok = (y.sum(-1) > 0).float()  # [T, L, D]
        scale = hidden.pow(2).mean().sqrt().clamp(min=1e-6)
        x = hidden / scale
        init = getattr(self, "init", None)
        W0 = torch.zeros(D, L, E, x.shape[-1])
        if init is not None:  # slot j at source layer l starts as its target layer's router
            for j in range(D):
                for l in range(L):
                    t = self.target_layers(l)[j]
                    if t < L:
                        W0[j, l] = init[t] * scale
        W = W0.clone().requires_grad_(True)
        b = torch.zeros(D, L, E, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=int(self.params.get("steps", 100)), line_search_fn="strong_wolfe")
        l2 = float(self.params.get("l2", 1e-4))

        def closure():
            opt.zero_grad()
            logits = torch.einsum("tlh,dleh->tlde", x, W) + b.transpose(0, 1)  # [T, L, D, E]
            ce = -(y * F.log_softmax(logits, -1)).sum(-1)
            loss = (ce * ok).sum() / ok.sum().clamp(min=1) + l2 * (W - W0).pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weight, self.bias = (W.detach() / scale), b.detach()
        self.fitted = True
        return self

    @torch.inference_mode()
    def predict(self, state: RoutingState, layer: int) -> torch.Tensor:
        self.check(state, layer)
        h = state.hidden.float()  # [B, H]
        out = torch.einsum("bh,deh->bde", h, self.weight[:, layer]) + self.bias[:, layer]
        valid = torch.tensor([t < self.num_layers for t in self.target_layers(layer)])[None, :, None]
        return torch.where(valid, torch.softmax(out, -1), 0.0)

    @property
    def hidden_size(self) -> int | None:
        return int(self.weight.shape[-1]) if self.fitted else None  # weight [.., E, H]

    def arrays(self):
        return {"weight": self.weight, "bias": self.bias}

    def array_shapes(self):
        D, L, E = self.slots, self.num_layers, self.num_experts
        return {"weight": (D, L, E, None), "bias": (D, L, E)}  # weight [D, L, E, H]

    def load_arrays(self, arrays):
        self.weight, self.bias = arrays["weight"], arrays["bias"]
        self.fitted = True
