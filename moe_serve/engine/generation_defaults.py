"""The sampling defaults a checkpoint recommends in its generation_config.json, read as vLLM reads them.

vLLM (`--generation-config auto`, `ModelConfig.get_diff_sampling_param`) takes `temperature`, `top_p`,
`top_k`, `repetition_penalty` and `max_new_tokens` (as `max_tokens`) from the file for every field a
request leaves unset. It also takes `min_p`, which this engine does not implement: it is ignored.

`do_sample` is ignored too, as vLLM ignores it: in transformers `do_sample: false` means greedy whatever
the temperature, but checkpoints often ship `do_sample: false` next to the temperature their authors
recommend, and vLLM users get that temperature; following vLLM keeps a request's output the same on both.

The file is checked once, when the engine starts: a value `SamplingParams` would refuse is an error
naming the file, the field and the limit then, not a failure of every request that omits the field.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

GENERATION_CONFIG = "generation_config.json"


def _number(value) -> bool:  # True is an int to Python, but no temperature
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# file field -> (SamplingParams field, check, the limit as the error states it); limits are SamplingParams'
_FIELDS = {
    "temperature": ("temperature", lambda v: _number(v) and 0 <= v <= 100, "a number in [0, 100]"),
    "top_p": ("top_p", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": ("top_k", lambda v: _integer(v) and v >= -1, "an integer >= -1 (-1 or 0: all tokens)"),
    "max_new_tokens": ("max_tokens", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "repetition_penalty": ("repetition_penalty", lambda v: _number(v) and v > 0, "a finite number > 0"),
}


def read_generation_defaults(model_dir: str | Path) -> dict:
    """SamplingParams keyword arguments from `<model_dir>/generation_config.json`; {} without the file.

    Raises ValueError naming the file (and the field and its limit) for a file that is not a JSON
    object or holds a value of the wrong type or out of range. A null value counts as unset."""
    path = Path(model_dir) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a JSON object, got {type(data).__name__}")
    defaults = {}
    for key, (name, ok, limit) in _FIELDS.items():
        value = data.get(key)
        if value is None:
            continue
        if not ok(value):
            raise ValueError(f"{path}: {key} must be {limit}, got {value!r}")
        defaults[name] = value
    return defaults
