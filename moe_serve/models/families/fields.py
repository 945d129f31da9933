"""config.json values checked one by one: a failure names the field, the limit and the value found.

Values of the wrong JSON type used to go through `bool()`, `int()` or `float()`: the string "false"
became True (tied embeddings, renormalized routing), "x" an error naming no field, a list a TypeError
traceback, and a negative count a model that failed deep in torch, or loaded and computed nonsense.
"""
from __future__ import annotations

import math


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int to Python, `true` no count


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flag(cfg: dict, name: str, default: bool, label: str | None = None) -> bool:
    """A boolean field: JSON true or false; absent/null means `default`. `label`: the name errors give
    (a key of a nested object, as `rope_parameters.truncate`)."""
    value = cfg.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config.json field '{label or name}' must be true or false, got {value!r}")
    return value


def count(cfg: dict, name: str, default: int, minimum: int = 0) -> int:
    """An integer field >= `minimum`; absent/null means `default`."""
    value = cfg.get(name)
    if value is None:
        return default
    if not is_int(value) or value < minimum:
        raise ValueError(f"config.json field '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


def number(value, name: str, default: float | None = None, above: float | None = 0.0) -> float | None:
    """A finite number (field `name`), greater than `above` unless that is None; None means `default`."""
    if value is None:
        return default
    if not is_number(value) or (above is not None and not value > above):
        limit = "a number" if above is None else f"a number > {above:g}"
        raise ValueError(f"config.json field '{name}' must be {limit}, got {value!r}")
    return float(value)


def token_id(cfg: dict, name: str) -> int | None:
    value = cfg.get(name)
    if value is not None and (not is_int(value) or value < 0):
        raise ValueError(f"config.json field '{name}' must be a token id (an integer >= 0) or null, got {value!r}")
    return value


def token_ids(cfg: dict, name: str) -> tuple[int, ...]:
    """A token id or a list of them (eos_token_id); absent/null: none."""
    value = cfg.get(name)
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if not all(is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"config.json field '{name}' must be a token id or a list of token ids, got {value!r}")
    return tuple(ids)


def layer_ids(cfg: dict, name: str, num_layers: int) -> set[int]:
    """A list of layer ids in [0, num_layers) (mlp_only_layers); absent/null: none."""
    value = cfg.get(name)
    if value is None:
        return set()
    if not isinstance(value, list) or not all(is_int(i) and 0 <= i < num_layers for i in value):
        raise ValueError(f"config.json field '{name}' must be a list of layer ids in [0, {num_layers}) "
                         f"(num_hidden_layers), got {value!r}")
    return set(value)
