"""The predictor interface: what is known when layer l's router has run, and scores for what comes next.

A predictor is fitted offline on routing traces and queried online by the expert cache, once per MoE
layer per step, for a whole batch at once (torch in, torch out, no per-token synchronization).

`lookahead` d >= 1: `predict(state, layer)` scores the experts of MoE layers layer+1 .. layer+d of the
SAME tokens (slot j is layer layer+1+j; slots past the last layer are zeros).
`lookahead` 0: "next token, same layer": one slot scoring the experts the NEXT token of each sequence
will use at `layer` itself (what the cache should keep resident for the next decode step).

Shapes: B tokens in the batch, L MoE layers, K experts per token (top-k), E experts per layer,
H hidden size, D slots (= max(lookahead, 1)).
"""
from __future__ import annotations

import difflib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from predictors.param_limits import Limit, check_values
from predictors.traces import RoutingTrace

FORMAT_VERSION = 1


@dataclass
class RoutingState:
    """What is known about a batch of tokens when layer `layer`'s router has run."""

    experts: torch.Tensor  # long [B, L, K]: ids at layers <= current, -1 elsewhere
    weights: torch.Tensor  # float [B, L, K]: their gate weights, 0 where experts is -1
    prev_experts: torch.Tensor  # long [B, L, K]: the previous token of the same sequence, -1 if none
    hidden: torch.Tensor | None = None  # float [B, H]: hidden state entering the current layer's router
    prev_weights: torch.Tensor | None = None  # float [B, L, K]: the previous token's gate weights

    def __post_init__(self) -> None:
        if self.experts.dim() != 3:
            raise ValueError(f"RoutingState.experts must be [B, L, K], got {tuple(self.experts.shape)}")
        for name in ("weights", "prev_experts", "prev_weights"):
            t = getattr(self, name)
            if t is not None and t.shape != self.experts.shape:
                raise ValueError(f"RoutingState.{name} shape {tuple(t.shape)} != experts {tuple(self.experts.shape)}")
        if self.hidden is not None and (self.hidden.dim() != 2 or self.hidden.shape[0] != self.experts.shape[0]):
            raise ValueError(f"RoutingState.hidden must be [B={self.experts.shape[0]}, H], got {tuple(self.hidden.shape)}")

    @property
    def batch_size(self) -> int:
        return int(self.experts.shape[0])

    @staticmethod
    def from_trace(trace: RoutingTrace, layer: int, rows: np.ndarray | None = None) -> "RoutingState":
        """States of trace rows `rows` (all rows by default) right after layer `layer`'s router, vectorized."""
        if not 0 <= layer < trace.num_layers:
            raise ValueError(f"layer must lie in [0, {trace.num_layers}), got {layer}")
        experts, weights, prev_e, prev_w = trace_tensors(trace)
        hidden = None
        if trace.hidden is not None:
            hidden = torch.from_numpy(np.ascontiguousarray(trace.hidden[:, layer])).float()
        if rows is not None:
            idx = torch.as_tensor(rows, dtype=torch.long)
            experts, weights, prev_e, prev_w = experts[idx], weights[idx], prev_e[idx], prev_w[idx]
            hidden = None if hidden is None else hidden[idx]
        known = (torch.arange(trace.num_layers) <= layer)[None, :, None]  # [1, L, 1]
        return RoutingState(
            experts=torch.where(known, experts, -1),
            weights=torch.where(known, weights, 0.0),
            prev_experts=prev_e,
            prev_weights=prev_w,
            hidden=hidden,
        )


def trace_tensors(trace: RoutingTrace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts long [T,L,K], weights float [T,L,K], prev_experts, prev_weights) of a whole trace."""
    experts = torch.from_numpy(trace.experts.astype(np.int64))
    weights = torch.from_numpy(trace.weights.astype(np.float32))
    prev = torch.from_numpy(trace.prev_index())
    has = (prev >= 0)[:, None, None]
    prev_e = torch.where(has, experts[prev.clamp(min=0)], -1)
    prev_w = torch.where(has, weights[prev.clamp(min=0)], 0.0)
    return experts, weights, prev_e, prev_w


def next_index(trace: RoutingTrace) -> np.ndarray:
    """int64 [T]: row of the next token of the same sequence, -1 at a sequence end."""
    nxt = np.arange(trace.num_tokens, dtype=np.int64) + 1
    ends = trace.seq_offsets[1:][np.diff(trace.seq_offsets) > 0] - 1
    nxt[ends] = -1
    return nxt


def multi_hot(ids: torch.Tensor, num_experts: int, values: torch.Tensor | None = None) -> torch.Tensor:
    """[..., K] ids (-1 = none) -> [..., E] float, 1 (or `values`) at each id."""
    valid = ids >= 0
    src = valid.float() if values is None else torch.where(valid, values.float(), 0.0)
    out = torch.zeros(*ids.shape[:-1], num_experts + 1, dtype=torch.float32, device=ids.device)
    out.scatter_add_(-1, torch.where(valid, ids, num_experts), src)
    return out[..., :num_experts]


def normalized(weights: torch.Tensor) -> torch.Tensor:
    """Gate weights rescaled to sum to 1 per token and layer ([..., K]); families differ in scale."""
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-6)


class Predictor(ABC):
    """Scores over the experts of the next layers (or the next token), fitted on traces."""

    name: str = "base"
    needs_hidden: bool = False  # True: predict() requires state.hidden
    adapts: bool = False  # True: observe() learns, so evaluation must replay in time order (prequential)
    # The keys of **params that this class's own code reads or writes (self.params[...], .get(...)): a
    # class lists its own next to that code, and takes its bases' too (accepted_params(), over the MRO).
    # Any other key is refused: a misspelt one would otherwise be ignored and its default used.
    PARAMS: frozenset[str] = frozenset()
    PARAM_LIMITS: dict[str, Limit] = {}  # each PARAMS key's kind and range (predictors/param_limits.py)

    @classmethod
    def accepted_params(cls) -> frozenset[str]:
        """Every parameter key this predictor takes: its PARAMS and those of the classes it extends."""
        return frozenset().union(*(vars(c).get("PARAMS", ()) for c in cls.__mro__))

    @classmethod
    def param_limits(cls) -> dict[str, Limit]:
        """Every parameter's Limit: this class's PARAM_LIMITS and those of the classes it extends."""
        return {k: v for c in reversed(cls.__mro__) for k, v in vars(c).get("PARAM_LIMITS", {}).items()}

    @classmethod
    def check_params(cls, params) -> None:
        """ValueError naming the keys of `params` this predictor does not read, and those it does, or
        the first value outside its limit (naming the key and the limit)."""
        accepted = cls.accepted_params()
        unknown = [k for k in params if k not in accepted]
        if not unknown:
            check_values(cls.name, cls.param_limits(), params)
            return
        lower = {a.lower(): a for a in sorted(accepted)}  # did you mean: case-blind (c -> C)
        close = [lower[m] for k in unknown for m in difflib.get_close_matches(str(k).lower(), lower, n=1)]
        raise ValueError(
            f"{cls.name} does not take parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            + (f"it takes: {', '.join(sorted(accepted))}" if accepted else "it takes no parameters")
            + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
        )

    def __init__(self, num_layers: int, num_experts: int, top_k: int, lookahead: int = 1, **params):
        type(self).check_params(params)
        for field, value, low in (("num_layers", num_layers, 1), ("num_experts", num_experts, 1), ("top_k", top_k, 1), ("lookahead", lookahead, 0)):
            if int(value) < low:
                raise ValueError(f"{self.name}: {field} must be >= {low}, got {value}")
        if top_k > num_experts:
            raise ValueError(f"{self.name}: top_k={top_k} exceeds num_experts={num_experts}")
        if int(lookahead) > int(num_layers) - 1 and int(lookahead) > 0:  # no layer has a target that far ahead
            raise ValueError(f"{self.name}: lookahead must be at most num_layers - 1 = {int(num_layers) - 1} (the "
                             f"targets are later MoE layers of the same token), got {lookahead}")
        self.num_layers, self.num_experts, self.top_k, self.lookahead = int(num_layers), int(num_experts), int(top_k), int(lookahead)
        self.params = dict(params)
        self.fitted = False

    # ---- what subclasses implement ------------------------------------------------------------
    @abstractmethod
    def fit(self, traces: list[RoutingTrace]) -> "Predictor":
        """Fit on whole traces (callers split by sequences, never by rows); returns self."""

    @abstractmethod
    def predict(self, state: RoutingState, layer: int) -> torch.Tensor:
        """float [B, D, E] scores (higher = more likely) for the slots of `target_layers(layer)`."""

    @abstractmethod
    def arrays(self) -> dict[str, torch.Tensor]:
        """The fitted state as named tensors (what `save` writes)."""

    @abstractmethod
    def load_arrays(self, arrays: dict[str, torch.Tensor]) -> None:
        """Restore the fitted state written by `arrays`."""

    def array_shapes(self) -> dict[str, tuple]:
        """{name: shape} of the arrays `load_arrays` needs, from the config alone (None: any size)."""
        return {}

    def check_arrays(self, arrays: dict[str, torch.Tensor]) -> None:
        """ValueError naming the first array of `array_shapes` missing from `arrays` or of another shape
        (a file whose arrays do not match its own header: loaded, it failed only when first used)."""
        for name, want in self.array_shapes().items():
            if name not in arrays:
                raise ValueError(f"{self.name}: array {name!r} is missing (the file has {sorted(arrays)})")
            got = tuple(arrays[name].shape)
            if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
                need = "(" + ", ".join("any" if w is None else str(w) for w in want) + ")"
                raise ValueError(f"{self.name}: array {name!r} has shape {got}; its config (MoE layers {self.num_layers}, "
                                 f"experts {self.num_experts}, lookahead {self.lookahead}) needs {need}")

    def observe(self, experts: torch.Tensor, weights: torch.Tensor, prev_experts: torch.Tensor,
                prev_weights: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> None:
        """Learn from tokens whose routing is now complete (online adaptation); a no-op unless overridden.

        experts, weights, prev_experts, prev_weights: [N, L, K] every layer of N finished tokens and of
        the token before each (-1 / 0 where none); hidden: [N, L, H] or None. Only routing that has already
        happened is ever passed here: a predictor that learns from it never sees the future.
        """

    # ---- shared helpers ----------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return max(self.lookahead, 1)

    @property
    def next_token(self) -> bool:
        return self.lookahead == 0

    @property
    def hidden_size(self) -> int | None:
        """H of the hidden states predict() reads (None: it reads none, or any size)."""
        return None

    def target_layers(self, layer: int) -> list[int]:
        """Target MoE layer of each slot (may run past the last layer: those slots score zeros)."""
        return [layer] if self.next_token else [layer + 1 + j for j in range(self.lookahead)]

    def check(self, state: RoutingState, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"{self.name}: layer must lie in [0, {self.num_layers}), got {layer}")
        if state.experts.shape[1] != self.num_layers:
            raise ValueError(f"{self.name}: state has {state.experts.shape[1]} layers, predictor {self.num_layers}")
        if self.needs_hidden and state.hidden is None:
            raise ValueError(f"{self.name}: needs state.hidden (the hidden state entering the router)")
        if self.needs_hidden and self.hidden_size is not None and state.hidden.shape[1] != self.hidden_size:
            raise ValueError(f"{self.name}: fitted on hidden size {self.hidden_size}, state.hidden has {state.hidden.shape[1]}")
        if not self.fitted:
            raise ValueError(f"{self.name}: predict() before fit()")

    def check_traces(self, traces: list[RoutingTrace]) -> None:
        if not traces:
            raise ValueError(f"{self.name}: fit() needs at least one trace")
        if not any(t.num_tokens for t in traces):  # nothing to count or learn: a fit would be all zeros
            n = len(traces)
            raise ValueError(f"{self.name}: fit() needs at least one token; the {n} trace{'s hold' if n > 1 else ' holds'} none")
        for i, t in enumerate(traces):
            for field in ("weights", "hidden"):  # one NaN would make every fitted weight NaN, silently
                bad = None if getattr(t, field) is None else ~np.isfinite(getattr(t, field))
                if bad is not None and bad.any():
                    row, layer = (int(x[0]) for x in np.nonzero(bad)[:2])
                    raise ValueError(f"{self.name}: trace {i} has {int(bad.sum())} NaN/inf value{'s' if bad.sum() > 1 else ''} "
                                     f"in {field!r} (first at row {row}, MoE layer {layer})")
            if (t.num_layers, t.num_experts, t.top_k) != (self.num_layers, self.num_experts, self.top_k):
                raise ValueError(
                    f"{self.name}: trace has (layers, experts, top_k)=({t.num_layers}, {t.num_experts}, {t.top_k}), "
                    f"predictor ({self.num_layers}, {self.num_experts}, {self.top_k})"
                )
            if self.needs_hidden and t.hidden is None:
                raise ValueError(f"{self.name}: fit() needs traces with hidden states (record with --record-hidden)")
        sizes = [(i, t.hidden.shape[-1]) for i, t in enumerate(traces) if t.hidden is not None]
        for i, H in sizes:  # fits concatenate them: one model's hidden states, one size
            if H != sizes[0][1]:
                raise ValueError(f"{self.name}: trace {i} has hidden states of size {H}, trace {sizes[0][0]} of size {sizes[0][1]}")

    def config(self) -> dict:
        return dict(
            predictor=self.name, num_layers=self.num_layers, num_experts=self.num_experts,
            top_k=self.top_k, lookahead=self.lookahead, params=self.params, format_version=FORMAT_VERSION,
        )

    def save(self, path: str | Path) -> None:
        """One safetensors file: the arrays, and the JSON config in its header. Loading runs no code."""
        if not self.fitted:
            raise ValueError(f"{self.name}: save() before fit()")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.arrays().items()}
        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"predictor file {path}: directory {path.parent} does not exist")
        try:  # safetensors writes beside the file and renames: a failed write leaves the old file whole
            save_file(tensors, str(path), metadata={"predictor": json.dumps(self.config())})
        except SafetensorError as exc:  # its own type, not an OSError: the CLI showed a traceback
            raise OSError(f"predictor file {path}: could not write ({exc})") from exc
