"""Placement algorithms, one signature, a registry by name.

    algorithm(load [L, E], num_ranks, slots_per_rank, coact=None, transitions=None, **options) -> PlacementPlan

`load` may be any non-negative per-expert weight (token counts, window counts, predicted loads).
Algorithms ignore options they do not use, so callers can pass the same statistics to all of them.
An algorithm's own options are the keyword parameters of its signature (`options(name)`); a user's
options (`moe-serve place --param`) go through `check_options` first, so a misspelt one, a value of another
type than the default or one outside LIMITS is an error.
"""
from __future__ import annotations

import difflib
import inspect

from placement.algorithms.affinity import affinity
from placement.algorithms.eplb import eplb
from placement.algorithms.simple import contiguous, round_robin

ALGORITHMS = {
    "contiguous": contiguous,
    "round_robin": round_robin,
    "eplb": eplb,
    "affinity": affinity,
}


def get_algorithm(name: str):
    if name not in ALGORITHMS:
        raise ValueError(f"placement: algorithm {name!r} is not one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


# the common interface (statistics every algorithm is handed), not options of any one algorithm
COMMON = ("load", "num_ranks", "slots_per_rank", "coact", "transitions", "tokens")


def options(name: str) -> list[str]:
    """The options algorithm `name` reads: the keyword parameters of its signature past COMMON (any
    other keyword lands in its `**_` and is ignored)."""
    return sorted(p.name for p in inspect.signature(get_algorithm(name)).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in COMMON)


# limits of the options that have them: (lowest, highest), None = unbounded
LIMITS = {
    "max_tokens": (1, None), "max_iters": (0, None), "rounds": (0, None), "window_tokens": (0, None),
    "uniform_blend": (0, 1), "balance_tol": (0, None), "explore_tol": (0, None), "balance_weight": (0, None),
    "cross_layer_weight": (0, None), "num_groups": (1, None),
}


def _check_value(name: str, key: str, value, default) -> None:
    """ValueError unless `value` has the type of the option's default (a number where it is a float, an
    integer where it is an int or None, a bool where it is a bool) and lies in LIMITS."""
    def fail(what):
        raise ValueError(f"placement algorithm {name}: {key}={value!r} must be {what}")

    if default is None and value is None:
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail("true or false")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail("an integer" if default is None or isinstance(default, int) else "a number")
    if (default is None or isinstance(default, int)) and not isinstance(value, int):
        fail("an integer")
    if value != value or value in (float("inf"), float("-inf")):
        fail("finite")
    lo, hi = LIMITS.get(key, (None, None))
    if lo is not None and value < lo:
        fail(f">= {lo}")
    if hi is not None and value > hi:
        fail(f"<= {hi}")


def check_options(name: str, given, set_by: dict[str, str] | None = None) -> None:
    """ValueError naming the keys of `given` that algorithm `name` does not read, and those it does.
    `set_by`: options the caller sets itself (option -> how, e.g. {"num_nodes": "--num-nodes"})."""
    set_by = set_by or {}
    for key in given:
        if key in set_by:
            raise ValueError(f"placement algorithm {name}: {key} is set by {set_by[key]}, not as a parameter")
    accepted = [k for k in options(name) if k not in set_by]
    unknown = [k for k in given if k not in accepted]
    if not unknown:
        defaults = {p.name: p.default for p in inspect.signature(get_algorithm(name)).parameters.values()}
        for key, value in given.items():
            _check_value(name, key, value, defaults[key])
        return
    lower = {a.lower(): a for a in sorted(accepted)}  # did you mean: case-blind (c -> C)
    close = [lower[m] for k in unknown for m in difflib.get_close_matches(str(k).lower(), lower, n=1)]
    raise ValueError(
        f"placement algorithm {name} does not take parameter{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(map(repr, unknown))}; "
        + (f"it takes: {', '.join(accepted)}" if accepted else "it takes no parameters")
        + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
    )
