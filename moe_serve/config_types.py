"""Flat engine options (`LLM(max_num_seqs=...)`, `EngineConfig.from_flat`) checked against the types of
the numeric and boolean config fields they set, before each section's own checks.

Those checks compare numbers: `LLM(max_num_seqs="8")` (a value read from the environment, say) failed in
them with "'>=' not supported between instances of 'str' and 'int'", naming no option, and a float
`max_model_len` got as far as allocating the KV cache. The error here names the field and its type, in
the format of `config.require`. Other numeric types (numpy's) are taken. String fields are left to their
sections (a path or a torch.device works where a string is used).
"""
from __future__ import annotations

import numbers
import types
import typing

# a field's type -> (does a value fit it, the limit as the error states it)
_TYPES = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"),
}


def check_types(section: str, section_cls, values: dict) -> None:
    """Raise ValueError "<section>.<field> must be <type>, got <value>" for the first value in `values`
    (field name -> value, fields of the dataclass `section_cls`) that its field's type does not take."""
    hints = typing.get_type_hints(section_cls)
    for name, value in values.items():
        hint = hints[name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = typing.get_args(hint) if union else (hint,)  # int | None -> (int, NoneType); list[int] as it is
        optional = type(None) in kinds
        fits, limit = _TYPES.get(next(k for k in kinds if k is not type(None)), (lambda v: True, ""))
        if not (fits(value) or (optional and value is None)):
            raise ValueError(f"{section}.{name} must be {limit}{' or None' if optional else ''}, got {value!r}")
