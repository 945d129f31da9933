"""CLI flags derived from the config dataclasses: one flag per field, its help the field's doc."""
from __future__ import annotations

import argparse
import json
import dataclasses
import typing

from moe_serve.config import check_output_file
from moe_serve.config_fields import same_file


def add_config_flags(parser: argparse.ArgumentParser, config_cls, skip: tuple[str, ...] = ()) -> None:
    """Add `--field-name` for every field of `config_cls` (a flat section dataclass)."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        help_text = f.metadata.get("help", "") + default_note(f.metadata.get("help", ""), f.default)
        # the parser's default is None, so that config_kwargs passes on only the flags the user gave
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=None, help=help_text)


def default_note(help_text: str, default) -> str:
    """' (default: X)' for a field's help. A None default whose help already says what it means ('default:
    the model's context') gets nothing: ' (default: None)' beside it read as a second, contradicting one."""
    if default is None and "default" in help_text:
        return ""
    return f" (default: {default})"


def config_kwargs(args: argparse.Namespace, *config_classes) -> dict:
    """The flags the user gave (not None) for the fields of `config_classes`, as keyword arguments."""
    names = {f.name for cls in config_classes for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def key_value_params(items: list[str] | None) -> dict:
    """--param KEY=VALUE (VALUE parsed as JSON when it parses, else kept as a string). A key given twice
    is refused: only the last value would count, while the earlier one looked taken."""
    out, given = {}, {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--param must look like KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key in given:
            raise ValueError(f"--param: {key} given twice ({given[key]}, {item}); give each key once")
        given[key] = item
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def output_file(path: str | None, flag: str) -> None:
    """Check an output file flag before the work that fills it; creates its parent directories."""
    if path is not None:
        check_output_file(path, flag)


def not_an_input(out_flag: str, out: str | None, inputs: list[tuple[str, str]]) -> None:
    """ValueError when output file `out` is one of the `inputs` (flag, path) under any spelling: the run
    would replace that input with its results (a plan or a predictor written over a trace, scores over a plan)."""
    for flag, path in inputs:
        if out and same_file(out, path):
            raise ValueError(f"{out_flag} {out} is also an input ({flag} {path}): name another output file")


def same_trace_shape(paths: list[str], traces: list, flags: str) -> None:
    """Every routing trace must have the first one's (MoE layers, experts, top_k): a predictor or a plan
    fitted on one shape scores another's experts as nonsense, without an error of its own."""
    want = (traces[0].num_layers, traces[0].num_experts, traces[0].top_k)
    for path, t in zip(paths, traces):
        got = (t.num_layers, t.num_experts, t.top_k)
        if got != want:
            raise ValueError(f"{flags}: {path} has (MoE layers, experts, top_k)={got}, {paths[0]} has {want}")
