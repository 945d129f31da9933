"""A small torch MLP over the routing history, trained with BCE on multi-hot targets.

Why this shape: a token's experts at the last layers are a fingerprint of the token (and its
context), and the next layers' routing is mostly a function of that fingerprint. The model sums one
learned vector per (layer, expert) the token used in its last `cur_window` layers (gate-weighted),
one per (layer, expert) the previous token used in layers l-`prev_before` .. target+`prev_after`,
and a layer embedding (plus a projection of the hidden state when the traces carry it): a trunk
vector z. Each (slot, target layer) has its own linear head on z. Two direct terms carry what
counting already knows: a learned transition matrix from the current layer's experts, and one from
the previous token's experts at the target layer.

Training uses the prefix trick: a window sum over layers for every l is a difference of two cumsums,
so an epoch is one pass over the trace, not one per layer. Online, one layer costs one or two embedding
bags (trunk input and both direct terms), a LayerNorm, one [dim, dim] and one [dim, D*E] matmul
(tables fused per layer on first use). With `hidden_direct`, a per-(slot, source layer) linear map
from the hidden state adds its logits directly (`with_router_weights` starts it from the routers).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from predictors.base import Predictor, RoutingState, multi_hot, normalized, trace_tensors
from predictors.param_limits import Limit
from predictors.dataset import slot_targets
from predictors.traces import RoutingTrace


class HistoryNet(nn.Module):
    def __init__(self, L: int, E: int, D: int, dim: int, hidden_size: int, hidden_direct: bool = False):
        super().__init__()
        self.cur = nn.Parameter(torch.randn(L * E, dim) * 0.05)  # current token, (layer, expert)
        self.prev = nn.Parameter(torch.randn(L * E, dim) * 0.05)  # previous token, (layer, expert)
        self.layer = nn.Parameter(torch.zeros(L, dim))
        self.hid = nn.Linear(hidden_size, dim, bias=False) if hidden_size else None
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Parameter(torch.randn(D, L, dim, E) * 0.02)  # [slot, target layer, dim, E]
        self.bias = nn.Parameter(torch.zeros(D, L, E))  # [slot, target layer, E]
        self.trans = nn.Parameter(torch.zeros(D, L, E, E))  # [slot, source layer, from, to]
        self.copy = nn.Parameter(torch.zeros(D, L, E, E))  # [slot, target layer, prev token's, to]
        # optional: a linear map from the hidden state straight to each slot's logits (a learned router)
        self.hdirect = nn.Parameter(torch.zeros(D, L, E, hidden_size)) if hidden_size and hidden_direct else None

    def trunk(self, z: torch.Tensor) -> torch.Tensor:
        z = F.gelu(self.norm(z))
        return z + F.gelu(self.fc(z))


def input_weights(ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [..., K] input value per expert: half multi-hot, half normalized gate weight."""
    w = torch.where(ids >= 0, w, 0.0)
    return torch.where(ids >= 0, 0.5 / ids.shape[-1] + 0.5 * normalized(w), 0.0)


def window_sums(per_layer: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """per_layer [T, L, dim]; lo, hi long [L] -> [T, L, dim]: sum over layers lo[l] .. hi[l] (inclusive)."""
    c = F.pad(per_layer.cumsum(1), (0, 0, 1, 0))  # [T, L+1, dim], c[:, i] = sum of layers < i
    return c[:, hi + 1] - c[:, lo]


class MLPPredictor(Predictor):
    name = "mlp"
    PARAMS = frozenset({
        "dim", "hidden_direct", "seed",  # the net (256, False, 0)
        "cur_window", "prev_before", "prev_after",  # its input windows in layers (6, 1, 1), see windows()
        "use_hidden", "epochs", "batch", "lr", "weight_decay", "trunk_dropout",  # fit (True, 10, 256, 6e-3, 0.01, 0.3)
        "hidden_size",  # written by fit (0: no hidden states), read by load_arrays
    })
    PARAM_LIMITS = dict(
        dim=Limit("int", ge=1), hidden_direct=Limit("bool"), seed=Limit("int"),
        cur_window=Limit("int", ge=0), prev_before=Limit("int", ge=0), prev_after=Limit("int", ge=0),  # cur_window 0: all
        use_hidden=Limit("bool"), epochs=Limit("int", ge=1), batch=Limit("int", ge=1), lr=Limit("float", ge=0),  # 0: no training
        weight_decay=Limit("float", ge=0), trunk_dropout=Limit("float", ge=0, lt=1), hidden_size=Limit("int", ge=0),
    )

    def _net(self, hidden_size: int) -> HistoryNet:
        torch.manual_seed(int(self.params.get("seed", 0)))
        net = HistoryNet(self.num_layers, self.num_experts, self.slots, int(self.params.get("dim", 256)), hidden_size,
                         bool(self.params.get("hidden_direct", False)))
        init = getattr(self, "router_init", None)  # [L, E, H]: the model's routers, see with_router_weights
        if net.hdirect is not None and init is not None:
            if tuple(init.shape) != (self.num_layers, self.num_experts, hidden_size):
                raise ValueError(f"{self.name}: router weights {tuple(init.shape)} != (L, E, H)=({self.num_layers}, {self.num_experts}, {hidden_size})")
            with torch.no_grad():  # slot j at source layer l starts as its target layer's own router
                for l in range(self.num_layers):
                    for j, t in enumerate(self.target_layers(l)):
                        if t < self.num_layers:
                            net.hdirect[j, l] = init[t]
        return net

    def with_router_weights(self, weights: dict[int, torch.Tensor]) -> "MLPPredictor":
        """Start the direct hidden-state map (hidden_direct=True) from the model's routers (layer -> [E, H])."""
        if sorted(weights) != list(range(self.num_layers)):
            raise ValueError(f"{self.name}: router weights must cover MoE layers 0..{self.num_layers - 1}, got {sorted(weights)}")
        self.params["hidden_direct"] = True
        self.router_init = torch.stack([weights[l].detach().float().cpu() for l in range(self.num_layers)])
        return self

    hidden_size = property(lambda self: int(self.params.get("hidden_size", 0)) or None)  # H predict() reads, if any

    def windows(self, layer: int) -> tuple[int, int, int]:
        """(first current-token layer, first and last previous-token layer) the trunk reads at `layer`."""
        cw = int(self.params.get("cur_window", 6)) or self.num_layers
        last_target = max(self.target_layers(layer))
        plo = max(layer - int(self.params.get("prev_before", 1)), 0)
        phi = min(last_target + int(self.params.get("prev_after", 1)), self.num_layers - 1)
        return max(layer - cw + 1, 0), plo, phi

    # ---- training: whole traces, all layers at once ----------------------------------------------
    def _forward_all(self, net: HistoryNet, x, w, px, pw, hidden, drop: float = 0.0, gen=None):
        """x, w, px, pw [T, L, K] (hidden [T, L, H] or None) -> per slot, logits [T, L, E] by source layer.
        `gen`: the dropout's generator (None: torch's global one)."""
        E, L, T = self.num_experts, self.num_layers, x.shape[0]
        off = torch.arange(L)[:, None] * E  # [L, 1]
        xv, pv = input_weights(x, w), input_weights(px, pw)
        cur = F.embedding_bag((x.clamp(min=0) + off).reshape(-1, x.shape[-1]), net.cur, per_sample_weights=xv.reshape(-1, x.shape[-1]), mode="sum")
        prev = F.embedding_bag((px.clamp(min=0) + off).reshape(-1, x.shape[-1]), net.prev, per_sample_weights=pv.reshape(-1, x.shape[-1]), mode="sum")
        win = torch.tensor([self.windows(l) for l in range(L)])  # [L, 3]
        idx = torch.arange(L)
        z = window_sums(cur.reshape(T, L, -1), win[:, 0], idx) + window_sums(prev.reshape(T, L, -1), win[:, 1], win[:, 2])
        z = z + net.layer
        if net.hid is not None:
            z = z + net.hid(hidden)
        z = net.trunk(z)  # [T, L, dim]
        if drop > 0:  # trunk dropout: whole rows lean on the direct terms alone, which transfer across domains
            z = z * (torch.rand(T, L, 1, generator=gen) > drop).float() / (1.0 - drop)
        cur_mh, prev_mh = multi_hot(x, E, xv), multi_hot(px, E, pv)  # [T, L, E]
        outs = []
        for j in range(self.slots):
            d = 0 if self.next_token else j + 1
            n, tl = L - d, torch.arange(d, L)  # source layers with a target, their targets
            lg = torch.einsum("tlh,lhe->tle", z[:, :n], net.head[j, tl]) + net.bias[j, tl]
            lg = lg + torch.einsum("tli,lie->tle", cur_mh[:, :n], net.trans[j, :n])
            lg = lg + torch.einsum("tli,lie->tle", prev_mh[:, d:], net.copy[j, tl])
            if net.hdirect is not None:
                lg = lg + torch.einsum("tlh,leh->tle", hidden[:, :n], net.hdirect[j, :n])
            outs.append(F.pad(lg, (0, 0, 0, d)))  # rows of source layers without a target: 0
        return outs

    def _loss(self, net: HistoryNet, data: list, hidden, tgt: torch.Tensor, drop: float, gen=None) -> torch.Tensor:
        """Summed per-slot BCE of a batch: data = (x, w, px, pw) [b, L, K], tgt long [b, L, D, K] (-1 = none)."""
        loss = 0.0
        for j, lg in enumerate(self._forward_all(net, *data, hidden, drop, gen)):
            y = tgt[:, :, j]  # [b, L, K]
            ok = (y[..., 0] >= 0).float()  # [b, L]
            bce = F.binary_cross_entropy_with_logits(lg, multi_hot(y, self.num_experts), reduction="none").sum(-1)
            loss = loss + (bce * ok).sum() / ok.sum().clamp(min=1)
        return loss

    def fit(self, traces: list[RoutingTrace]) -> "MLPPredictor":
        # the init and the trunk dropout draw from torch's global generator, which _net seeds (a fit is
        # reproducible); fork_rng gives the caller its own random stream back afterwards
        with torch.random.fork_rng(devices=[]):
            return self._fit(traces)

    def _fit(self, traces: list[RoutingTrace]) -> "MLPPredictor":
        self.check_traces(traces)
        use_hidden = bool(self.params.get("use_hidden", True)) and all(t.hidden is not None for t in traces)
        hsize = int(traces[0].hidden.shape[-1]) if use_hidden else 0
        self.params["hidden_size"] = hsize
        self.needs_hidden = hsize > 0  # predict() then reads state.hidden: callers must pass it
        net = self._net(hsize)
        data = [torch.cat(parts) for parts in zip(*(trace_tensors(t) for t in traces))]
        hidden = torch.cat([torch.from_numpy(t.hidden.astype(np.float32)) for t in traces]) if hsize else None
        tgt = torch.cat([slot_targets(t, self.lookahead) for t in traces])  # [T, L, D, K]
        T = tgt.shape[0]
        epochs, bs, lr = int(self.params.get("epochs", 10)), int(self.params.get("batch", 256)), float(self.params.get("lr", 6e-3))
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=float(self.params.get("weight_decay", 0.01)))
        steps = max(epochs * ((T + bs - 1) // bs), 2)
        # warm up for 10% of the steps, but at least one (OneCycleLR divides by zero on tiny traces otherwise)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.1, 1.5 / steps))
        gen = torch.Generator().manual_seed(int(self.params.get("seed", 0)))
        drop = float(self.params.get("trunk_dropout", 0.3))
        for _ in range(epochs):
            for idx in torch.randperm(T, generator=gen).split(bs):
                loss = self._loss(net, [d[idx] for d in data], None if hidden is None else hidden[idx], tgt[idx], drop)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        self.net = net.eval()
        self._plans = {}
        self.fitted = True
        return self

    # ---- online: one layer, a batch of states ---------------------------------------------------
    def _plan(self, layer: int) -> dict:
        """Per-layer fused tables, built on first use: an embedding-bag table of trunk vectors over the
        layer's input window (with the direct logits, D*E columns, alongside when D = 1), a table of
        direct logits over the part of the window that has any (D > 1), and the [dim, D*E] head.

        Window rows: the current token's layers lo..layer, then the previous token's layers plo..phi,
        E rows each. The direct rows are the transition rows (current layer) and the copy rows (the
        previous token at each slot's target layer): window positions n-1 .. `dir_hi`, a contiguous
        slice, so a second bag reads a view of the same ids (cheaper than one wide bag when D > 1)."""
        plans = self._plans  # before self.net: `adopt` swaps the net first, so a plan never outlives its net
        if layer in plans:
            return plans[layer]
        net, E, L, D = self.net, self.num_experts, self.num_layers, self.slots
        lo, plo, phi = self.windows(layer)
        n, m, dim = layer - lo + 1, phi - plo + 1, net.cur.shape[1]
        table = torch.zeros((n + m) * E, dim + D * E)
        table[: n * E, :dim] = net.cur[lo * E : (layer + 1) * E]
        table[n * E :, :dim] = net.prev[plo * E : (phi + 1) * E]
        head = torch.zeros(dim, D * E)
        bias = torch.zeros(D * E)
        for j, t in enumerate(self.target_layers(layer)):
            if t < L:
                cols = slice(j * E, (j + 1) * E)
                head[:, cols], bias[cols] = net.head[j, t], net.bias[j, t]
                table[(n - 1) * E : n * E, dim + j * E : dim + (j + 1) * E] = net.trans[j, layer]
                r = (n + t - plo) * E  # the previous token's target layer t (inside plo..phi by construction)
                table[r : r + E, dim + j * E : dim + (j + 1) * E] = net.copy[j, t]
        hdirect = None
        if net.hdirect is not None:  # [H, D*E]: slot j's map from the hidden state at `layer`
            hdirect = torch.zeros(net.hdirect.shape[-1], D * E)
            for j, t in enumerate(self.target_layers(layer)):
                if t < L:
                    hdirect[:, j * E : (j + 1) * E] = net.hdirect[j, layer].T
            hdirect = hdirect.detach()
        # one zero row in front of each window layer's E rows: an absent expert (-1) lands on it and adds
        # nothing, with no clamp or mask; the 0.5 of input_weights() is folded into the table
        table = F.pad(table.view(n + m, E, -1), (0, 0, 1, 0)).reshape((n + m) * (E + 1), -1) * 0.5
        valid = [t for t in self.target_layers(layer) if t < L]
        hi = n + max(valid) - plo if valid else n - 1  # last window position with direct rows
        off = (torch.arange(n + m) * (E + 1) + 1)[:, None]  # [n+m, 1] row of expert 0 of each window layer
        split = D > 1  # measured: two bags pay off when the direct part is wide (D*E), one when it is not
        plan = dict(
            lo=lo, plo=plo, phi=phi, dim=dim, head=head.detach(), bias=bias.detach(), hdirect=hdirect, off=off,
            table=(table[:, :dim].contiguous() if split else table).detach(),  # [rows, dim] or [rows, dim + D*E]
            dir_lo=n - 1, dir_hi=hi + 1, dir_off=off[n - 1 : hi + 1] - (n - 1) * (E + 1),
            direct=table[(n - 1) * (E + 1) : (hi + 1) * (E + 1), dim:].contiguous().detach() if split else None,
            layer_vec=net.layer[layer].detach(), inv_k=1.0 / self.top_k,
            ln=(net.norm.weight.detach(), net.norm.bias.detach(), net.norm.eps),
            fc=(net.fc.bias.detach(), net.fc.weight.detach().T.contiguous()),  # [dim], [dim, dim] (in, out)
            hid=None if net.hid is None else net.hid.weight.detach().T.contiguous(),  # [H, dim]
        )
        plans[layer] = plan
        return plan

    @torch.inference_mode()
    def predict(self, state: RoutingState, layer: int) -> torch.Tensor:
        """The training forward for one layer, as ~20 torch ops on the fused plan (no nn.Module calls)."""
        self.check(state, layer)
        p, B = self._plan(layer), state.batch_size
        lo, plo, phi, dim = p["lo"], p["plo"], p["phi"], p["dim"]
        px = state.prev_experts[:, plo : phi + 1]  # the previous token's window (holds every target layer)
        pw = state.prev_weights[:, plo : phi + 1] if state.prev_weights is not None else (px >= 0).float()
        ids = torch.cat([state.experts[:, lo : layer + 1], px], 1)  # [B, n+m, K]
        w = torch.cat([state.weights[:, lo : layer + 1], pw], 1)
        # 2 x input_weights(): normalized gate weight + 1/K (the table holds the 0.5; absent ids hit zero rows)
        vals = (w / w.sum(-1, keepdim=True).clamp(min=1e-6)).add_(p["inv_k"])
        # flatten(1), not view(B, -1): a batch of 0 tokens has no -1 to infer
        out = F.embedding_bag((ids + p["off"]).flatten(1), p["table"], per_sample_weights=vals.flatten(1), mode="sum")
        z = out[:, :dim] + p["layer_vec"]  # [B, dim]
        if p["direct"] is None:  # one bag: out[:, dim:] holds the direct terms [B, D*E]
            direct = out[:, dim:]
        else:  # the direct terms from their own window slice: transition and copy rows
            a, b = p["dir_lo"], p["dir_hi"]
            direct = F.embedding_bag((ids[:, a:b] + p["dir_off"]).flatten(1), p["direct"],
                                     per_sample_weights=vals[:, a:b].flatten(1), mode="sum")
        if p["hid"] is not None:
            z = torch.addmm(z, state.hidden.float(), p["hid"])
        z = F.gelu(F.layer_norm(z, (dim,), *p["ln"]))  # HistoryNet.trunk, inlined
        fc_bias, fc_weight = p["fc"]
        z = z + F.gelu(torch.addmm(fc_bias, z, fc_weight))
        out = torch.addmm(direct, z, p["head"]).add_(p["bias"])  # [B, D*E]
        if p["hdirect"] is not None:
            out = torch.addmm(out, state.hidden.float(), p["hdirect"])
        return out.view(B, self.slots, self.num_experts)

    def adopt(self, net: HistoryNet) -> None:
        """Predict with `net` from now on (weights learned elsewhere, e.g. by a copy of this predictor
        adapting on another thread). Two plain assignments, so a predict() running on another thread
        meanwhile finishes with the old weights and the next one builds its plans from the new."""
        self.net = net.eval()
        self._plans = {}

    def arrays(self):
        return {k: v.detach() for k, v in self.net.state_dict().items()}

    def array_shapes(self):  # HistoryNet's state_dict
        L, E, D, dim, H = self.num_layers, self.num_experts, self.slots, int(self.params.get("dim", 256)), int(self.params.get("hidden_size", 0))
        return {"cur": (L * E, dim), "prev": (L * E, dim), "layer": (L, dim), "norm.weight": (dim,), "norm.bias": (dim,),
                "fc.weight": (dim, dim), "fc.bias": (dim,), "head": (D, L, dim, E), "bias": (D, L, E), "trans": (D, L, E, E),
                "copy": (D, L, E, E), **({"hid.weight": (dim, H)} if H else {}),
                **({"hdirect": (D, L, E, H)} if H and self.params.get("hidden_direct", False) else {})}

    def load_arrays(self, arrays):
        with torch.random.fork_rng(devices=[]):  # _net seeds the global generator for its (overwritten) init
            self.net = self._net(int(self.params.get("hidden_size", 0)))
        self.needs_hidden = self.net.hid is not None
        self.net.load_state_dict(arrays)
        self.net.eval()
        self._plans = {}
        self.fitted = True
