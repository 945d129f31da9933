"""The history MLP, fitted offline and then kept learning online from the routing the server observes.

Why: expert choice is strongly domain-specific (DeepSeek-V2-Lite's experts specialize by task), so a
predictor fitted on one domain loses a third of its recall on another, while the same model fitted
on the new domain's own tokens recovers it. A server sees every token's routing a moment after it
predicted it, so it can keep fitting: `observe` takes tokens whose routing is complete, appends them
to a replay buffer and runs a few AdamW steps on the newest tokens plus a uniform sample of older
ones. Predictions only ever use what was learned from tokens already observed (never the future);
`predictors.evaluate` replays test traces in time order, predicting a chunk before observing it.

Lookahead 0 (next token, same layer): a finished token is a training target for the token before
it (its input: that token's routing, with no routing of its own predecessor; hidden states of the
previous token are not kept, so a hidden-state model adapts its lookahead-d slots only).

Online predict() is the MLP's (the fused per-layer plans are rebuilt after each update).
Saved files hold the adapted weights; the optimizer state and the replay buffer are not saved.
"""
from __future__ import annotations

import torch

from predictors.mlp import MLPPredictor
from predictors.param_limits import Limit


def lookahead_targets(experts: torch.Tensor, lookahead: int) -> torch.Tensor:
    """experts long [N, L, K] -> long [N, L, D, K]: slot j of layer l = layer l+1+j's experts (-1 past L)."""
    N, L, K = experts.shape
    out = torch.full((N, L, lookahead, K), -1, dtype=torch.long)
    for j in range(lookahead):
        if j + 1 < L:
            out[:, : L - j - 1, j] = experts[:, j + 1 :]
    return out


class OnlineMLPPredictor(MLPPredictor):
    """`mlp` (dim 128 by default) + prequential fine-tuning. Params (besides the MLP's): online_steps (AdamW steps per
    observe, 1), online_batch (rows per step, 128: the new tokens plus replayed older ones),
    online_lr (3e-3), online_dropout (trunk dropout while adapting, 0.1), online_buffer (rows kept, 20000)."""

    name = "mlp_online"
    adapts = True
    # observe(); the MLP's PARAMS come with them (seed and weight_decay are read here too)
    PARAMS = frozenset({"online_steps", "online_batch", "online_lr", "online_dropout", "online_buffer"})
    PARAM_LIMITS = dict(online_steps=Limit("int", ge=0), online_batch=Limit("int", ge=1), online_lr=Limit("float", ge=0),
                        online_dropout=Limit("float", ge=0, lt=1), online_buffer=Limit("int", ge=1))

    def __init__(self, num_layers, num_experts, top_k, lookahead=1, **params):
        # dim 128, not the offline MLP's 256: adapting online recovers most of what the width bought
        # (intent->summary recall@6 at lookahead 1: 0.657 vs 0.680), and predict() costs ~40% less
        params.setdefault("dim", 128)
        super().__init__(num_layers, num_experts, top_k, lookahead, **params)

    def fit(self, traces):
        super().fit(traces)
        self.reset_online()
        return self

    def reset_online(self) -> None:
        """Forget what was observed (the buffer and optimizer), keeping the current weights."""
        self._buf: list[torch.Tensor] | None = None  # ring of x, w, px, pw, tgt (and hidden) of observed tokens
        self._start = self._size = 0  # ring slot of the oldest row, rows held
        self._opt = None
        self._gen = torch.Generator().manual_seed(int(self.params.get("seed", 0)) + 1)
        self.observed = 0

    def _examples(self, experts, weights, prev_experts, prev_weights, hidden):
        """Training rows (x, w, px, pw, tgt, hidden) for this predictor's slots from finished tokens."""
        experts, prev_experts = experts.long(), prev_experts.long()
        weights = weights.float()
        prev_weights = (prev_experts >= 0).float() if prev_weights is None else prev_weights.float()
        if not self.next_token:
            tgt = lookahead_targets(experts, self.lookahead)
            return [experts, weights, prev_experts, prev_weights, tgt], hidden
        if self.net.hid is not None:
            return None, None  # the previous token's hidden states are not kept
        has = prev_experts[:, 0, 0] >= 0  # the token before exists: it is the input, this token the target
        x, w = prev_experts[has], prev_weights[has]
        none = torch.full_like(x, -1)
        tgt = experts[has][:, :, None, :]  # [n, L, 1, K]
        return [x, w, none, torch.zeros_like(w), tgt], None

    def _store(self, data: list[torch.Tensor]) -> int:
        """Append rows to the replay ring (preallocated: online_buffer rows; ids kept as int16,
        hidden states as float16 while every value fits, float32 after one does not); returns how
        many rows were added."""
        cap = int(self.params.get("online_buffer", 20000))
        data = [d[-cap:] for d in data]
        new = data[0].shape[0]
        if self._buf is None:
            small = {torch.int64: torch.int16, torch.float32: torch.float32}
            self._dtypes = [d.dtype for d in data]
            self._buf = [torch.empty((cap, *d.shape[1:]), dtype=small[d.dtype]) for d in data]
            if self.net.hid is not None:
                self._buf[-1] = self._buf[-1].half()
        hid = self._buf[-1] if self.net.hid is not None else None
        if hid is not None and hid.dtype == torch.float16 and data[-1].abs().max() > torch.finfo(torch.float16).max:
            self._buf[-1] = hid.float()  # a value past 65504 would be inf in half: float32 from now on
        slots = (self._start + self._size + torch.arange(new)) % cap
        for b, d in zip(self._buf, data):
            b[slots] = d.to(b.dtype)
        self._size += new
        if self._size > cap:  # the oldest rows were overwritten
            self._start, self._size = (self._start + self._size - cap) % cap, cap
        return new

    def observe(self, experts, weights, prev_experts, prev_weights=None, hidden=None) -> None:
        if not self.fitted:
            raise ValueError(f"{self.name}: observe() before fit()")
        if experts.dim() != 3 or experts.shape[1:] != (self.num_layers, experts.shape[2]):
            raise ValueError(f"{self.name}: observe() experts must be [N, L={self.num_layers}, K], got {tuple(experts.shape)}")
        if self.net.hid is not None and hidden is None and not self.next_token:
            raise ValueError(f"{self.name}: observe() needs hidden [N, L, H] (the model was fitted with hidden states)")
        data, hid = self._examples(experts, weights, prev_experts, prev_weights, hidden)
        if data is None or data[0].shape[0] == 0:
            return
        if self.net.hid is not None:
            data.append(hid.float())
        new = self._store(data)
        self.observed += new
        if self._opt is None:
            self._opt = torch.optim.AdamW(self.net.parameters(), lr=float(self.params.get("online_lr", 3e-3)),
                                          weight_decay=float(self.params.get("weight_decay", 0.01)))
        n, cap = self._size, self._buf[0].shape[0]
        bs = int(self.params.get("online_batch", 128))
        drop = float(self.params.get("online_dropout", 0.1))
        self.net.train()
        with torch.enable_grad():
            for _ in range(int(self.params.get("online_steps", 1))):
                newest = torch.arange(n - min(new, bs), n)
                older = torch.randint(0, max(n - new, 1), (max(bs - len(newest), 0),), generator=self._gen) if n > new else newest[:0]
                idx = (self._start + torch.cat([newest, older])) % cap  # time order -> ring slot
                b = [t[idx].to(dtype) for t, dtype in zip(self._buf, self._dtypes)]
                # its own generator: what it learns does not depend on who else draws from torch's global one
                # (a server's sampling, or another thread: see moe_serve/experts/learner.py)
                loss = self._loss(self.net, b[:4], b[5] if len(b) > 5 else None, b[4], drop, self._gen)
                self._opt.zero_grad()
                loss.backward()
                self._opt.step()
        self.net.eval()
        self._plans = {}

    def load_arrays(self, arrays):
        super().load_arrays(arrays)
        self.reset_online()
