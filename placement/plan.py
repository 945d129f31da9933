"""The placement plan: for every MoE layer, which rank hosts which physical experts.

Physical slots are numbered rank-major: slot p lives on rank `p // slots_per_rank`, so a plan is fully
described by `phy2log[L, P]` (P = num_ranks * slots_per_rank). `log2phy` and `replica_count` are its
inverse views, kept in the file too because the runtime indexes them directly:

    phy2log        int64 [L, P]          logical expert of each physical slot
    log2phy        int64 [L, E, Rmax]    slots holding each logical expert, ascending, -1 padded
    replica_count  int64 [L, E]          copies of each logical expert (>= 1)

Files are JSON (small plans, human readable) or safetensors with the sizes in its metadata; never pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "moe-serve-placement-plan/1"


@dataclass
class PlacementPlan:
    phy2log: np.ndarray  # int64 [L, P]
    log2phy: np.ndarray  # int64 [L, E, Rmax], -1 padded
    replica_count: np.ndarray  # int64 [L, E]
    num_ranks: int
    slots_per_rank: int
    meta: dict = field(default_factory=dict)  # algorithm, solver_seconds, ... (free-form, JSON-able)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_phy2log(cls, phy2log, num_experts: int, num_ranks: int, meta: dict | None = None) -> "PlacementPlan":
        """Build the inverse maps from `phy2log` [L, P]; every other constructor goes through here."""
        phy2log = np.asarray(phy2log, dtype=np.int64)
        if phy2log.ndim != 2:
            raise ValueError(f"plan: phy2log must be [L, P], got shape {phy2log.shape}")
        num_layers, num_slots = phy2log.shape
        if num_ranks < 1 or num_slots % num_ranks:
            raise ValueError(f"plan: P={num_slots} slots must split evenly over num_ranks={num_ranks}")
        if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= num_experts):
            raise ValueError(
                f"plan: phy2log ids must lie in [0, num_experts={num_experts}), got [{phy2log.min()}, {phy2log.max()}]"
            )
        count = np.zeros((num_layers, num_experts), dtype=np.int64)
        for l in range(num_layers):
            count[l] = np.bincount(phy2log[l], minlength=num_experts)
        rmax = max(1, int(count.max()) if count.size else 1)
        log2phy = np.full((num_layers, num_experts, rmax), -1, dtype=np.int64)
        for l in range(num_layers):
            order = np.argsort(phy2log[l], kind="stable")  # slots grouped by expert, ascending slot
            experts = phy2log[l, order]
            starts = np.concatenate([[0], np.cumsum(count[l])[:-1]])
            rank_in_expert = np.arange(num_slots) - starts[experts]
            log2phy[l, experts, rank_in_expert] = order
        return cls(phy2log, log2phy, count, num_ranks, num_slots // num_ranks, dict(meta or {}))

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.replica_count.shape[1])

    def rank_of_slot(self, p):
        """Rank hosting physical slot(s) `p` (slots are rank-major)."""
        return np.asarray(p) // self.slots_per_rank

    def expert_ranks(self) -> np.ndarray:
        """bool [L, E, N]: whether rank n holds at least one copy of expert e at layer l."""
        out = np.zeros((self.num_layers, self.num_experts, self.num_ranks), dtype=bool)
        layer = np.repeat(np.arange(self.num_layers), self.num_slots)
        rank = np.tile(np.arange(self.num_slots) // self.slots_per_rank, self.num_layers)
        out[layer, self.phy2log.ravel(), rank] = True
        return out

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> "PlacementPlan":
        """Raise ValueError naming the layer and expert when the plan is inconsistent; return self."""
        L, P = self.phy2log.shape
        E = self.replica_count.shape[1] if self.replica_count.ndim == 2 else -1
        if self.num_ranks < 1 or self.slots_per_rank < 1:
            raise ValueError(f"plan: num_ranks={self.num_ranks} and slots_per_rank={self.slots_per_rank} must be >= 1")
        if P > self.num_ranks * self.slots_per_rank:
            raise ValueError(
                f"plan: {P} physical slots overfill {self.num_ranks} ranks x {self.slots_per_rank} slots_per_rank"
            )
        if P < self.num_ranks * self.slots_per_rank:
            raise ValueError(f"plan: {P} physical slots leave slots of {self.num_ranks} x {self.slots_per_rank} empty")
        if self.replica_count.shape != (L, E) or self.log2phy.shape[:2] != (L, E):
            raise ValueError(
                f"plan: replica_count {self.replica_count.shape} / log2phy {self.log2phy.shape} "
                f"disagree with phy2log [L={L}, P={P}]"
            )
        for l in range(L):
            bad = (self.phy2log[l] < 0) | (self.phy2log[l] >= E)
            if bad.any():
                p = int(np.argmax(bad))
                raise ValueError(f"plan: layer {l} slot {p} holds expert {self.phy2log[l, p]} outside [0, {E})")
            actual = np.bincount(self.phy2log[l], minlength=E)
            for e in np.flatnonzero(actual == 0):
                raise ValueError(f"plan: layer {l} expert {e} is not placed in any slot")
            for e in np.flatnonzero(actual != self.replica_count[l]):
                raise ValueError(
                    f"plan: layer {l} expert {e} has replica_count {self.replica_count[l, e]} "
                    f"but {actual[e]} slots hold it"
                )
            for e in range(E):
                slots = self.log2phy[l, e]
                real = slots[slots >= 0]
                if np.any(real >= P):
                    raise ValueError(f"plan: layer {l} expert {e}: log2phy {slots.tolist()} names a slot past P={P}")
                if len(real) != actual[e] or np.any(self.phy2log[l, real] != e) or np.any(slots[len(real):] != -1):
                    raise ValueError(
                        f"plan: layer {l} expert {e}: log2phy {slots.tolist()} disagrees with phy2log "
                        f"(replica_count {actual[e]})"
                    )
        return self

    # ---- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """`.safetensors` -> tensors + JSON metadata; anything else -> one JSON document."""
        path = Path(path)
        header = dict(format=FORMAT, num_ranks=self.num_ranks, slots_per_rank=self.slots_per_rank,
                      num_layers=self.num_layers, num_experts=self.num_experts, meta=self.meta)
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(
                {"phy2log": self.phy2log, "log2phy": self.log2phy, "replica_count": self.replica_count},
                str(path), metadata={"placement": json.dumps(header)},
            )
            return
        doc = dict(header, phy2log=self.phy2log.tolist(), log2phy=self.log2phy.tolist(),
                   replica_count=self.replica_count.tolist())
        path.write_text(json.dumps(doc))

    @classmethod
    def load(cls, path: str | Path) -> "PlacementPlan":
        """Read a plan file; anything malformed is a ValueError naming the file and the field."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"plan file {path} does not exist")
        try:
            return cls._load(path)
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith(f"plan file {path}") else f"plan file {path}: {msg}") from None

    @classmethod
    def _load(cls, path: Path) -> "PlacementPlan":
        keys = ("phy2log", "log2phy", "replica_count")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="numpy") as f:
                    header = json.loads((f.metadata() or {}).get("placement", "{}"))
                    missing = [k for k in keys if k not in f.keys()]
                    if missing:
                        raise ValueError(f"missing tensors {missing}")
                    arrays = {k: f.get_tensor(k) for k in keys}
            except SafetensorError as exc:
                raise ValueError(f"not a readable safetensors file ({exc})") from None
        else:
            try:
                header = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"not JSON ({exc})") from None
            arrays = None
        if not isinstance(header, dict):
            raise ValueError(f"must hold a JSON object, got {type(header).__name__}")
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r} is not {FORMAT!r}")
        if arrays is None:
            missing = [k for k in keys if k not in header]
            if missing:
                raise ValueError(f"missing {missing}")
            arrays = {k: header[k] for k in keys}
        ndim = dict(phy2log=2, log2phy=3, replica_count=2)
        arrays = {k: int_array(k, arrays[k], ndim[k]) for k in keys}
        sizes = {}
        for k in ("num_ranks", "slots_per_rank"):
            v = header.get(k)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{k} must be an integer, got {v!r}")
            sizes[k] = v
        meta = header.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"meta must be a JSON object, got {type(meta).__name__}")
        plan = cls(arrays["phy2log"], arrays["log2phy"], arrays["replica_count"], sizes["num_ranks"],
                   sizes["slots_per_rank"], dict(meta))
        plan.validate()
        for k in ("num_layers", "num_experts"):  # optional in the header; when there, it must be the arrays'
            if k in header and header[k] != getattr(plan, k):
                raise ValueError(f"{k}={header[k]!r} in the header, but the arrays hold {getattr(plan, k)}")
        return plan


def int_array(name: str, value, ndim: int) -> np.ndarray:
    """int64 array of `ndim` dimensions from a plan file's or a placement command's field; fractional,
    non-numeric or ragged is a ValueError naming the field."""
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged nested lists
        raise ValueError(f"{name} is not a rectangular array") from None
    if arr.dtype == object or arr.ndim != ndim:
        raise ValueError(f"{name} must be a rectangular {ndim}-D array of integers, got "
                         + (f"shape {arr.shape}" if arr.dtype != object else "non-numeric or oversized values"))
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} holds non-integer values")
    elif arr.dtype.kind not in "iu" and arr.size:
        raise ValueError(f"{name} must hold integers, got {arr.dtype}")
    if arr.size and arr.dtype.kind in "fu" and np.abs(arr).max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds values past int64")
    return arr.astype(np.int64)


def plan_from_rank_lists(ranks: list[list[list[int]]], num_experts: int, meta: dict | None = None) -> PlacementPlan:
    """Build a plan from `ranks[l][n]` = the logical experts rank n hosts at layer l (equal lengths)."""
    phy2log = np.array([[e for rank in layer for e in rank] for layer in ranks], dtype=np.int64)
    return PlacementPlan.from_phy2log(phy2log, num_experts, len(ranks[0]), meta)
