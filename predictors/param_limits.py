"""The values a predictor parameter may take: its kind and range, checked when a predictor is made.

Each predictor class lists `PARAM_LIMITS` (key -> Limit) next to its `PARAMS`; a value outside its
limit is a ValueError naming the predictor, the key and the limit, before any fit. Without this,
`batch=0` ended in a ZeroDivisionError, `dim=-3` in a torch RuntimeError, `smoothing=0` in NaN
tables and `epochs=0` in a saved, untrained net.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """kind: "int", "float" (an int is fine too), "bool", "str", "names" (a non-empty list of strings),
    "dict" or "list"; for numbers, bounds: ge/le inclusive, gt/lt exclusive (None: none)."""

    kind: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return "one of " + ", ".join(map(repr, self.choices)) if self.choices else "a string"
        if self.kind == "names":
            return "a non-empty list of predictor names"
        if self.kind in ("dict", "list"):
            return "a JSON object" if self.kind == "dict" else "a list"
        what = "an integer" if self.kind == "int" else "a number"
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"{what} in {low}, {high}"
        if low:
            return f"{what} {'>=' if self.ge is not None else '>'} {low[1:]}"
        if high:
            return f"{what} {'<=' if self.le is not None else '<'} {high[:-1]}"
        return what

    def accepts(self, value) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and (not self.choices or value in self.choices)
        if self.kind == "names":
            return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)
        if self.kind in ("dict", "list"):
            return isinstance(value, dict if self.kind == "dict" else (list, tuple))
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # True is no count of epochs
            return False
        if self.kind == "int" and not (isinstance(value, int) or float(value).is_integer()):
            return False  # 2.5 epochs would run as 2, silently
        if not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


def check_values(owner: str, limits: dict[str, Limit], params: dict) -> None:
    """ValueError naming the first parameter of `params` whose value its limit refuses."""
    for key, value in params.items():
        limit = limits.get(key)
        if limit is not None and not limit.accepts(value):
            raise ValueError(f"{owner}: parameter {key!r} must be {limit.describe()}, got {value!r}")
