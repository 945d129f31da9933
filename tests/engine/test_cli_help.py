"""`moe-serve <command> --help` for the commands built from the config tree (generate, record-trace, serve)
and info: every flag has help text, and the default it shows is the one a run takes."""
from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from moe_serve.cli.main import build_parser
from moe_serve.config import EngineConfig

COMMANDS = ["generate", "record-trace", "serve", "info"]
FIELDS = {f.name: f for cls in EngineConfig.sections().values() for f in dataclasses.fields(cls)}


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def config_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags made from config fields: those of the groups named after a config section."""
    sections = {cls.__name__ for cls in EngineConfig.sections().values()}
    return [a for g in parser._action_groups if g.title.removeprefix("engine: ") in sections
            for a in g._group_actions]


def shown_defaults(help_text: str) -> list[str]:
    return re.findall(r"\(default: ([^)]*)\)", help_text)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_and_says_its_default(command):
    for action in subparser(command)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"{command} {name} has no help text"
        # a flag that is off unless given (store_true) or collects values needs no default
        if action.required or isinstance(action, (argparse._StoreTrueAction, argparse._AppendAction,
                                                  argparse._ExtendAction)):
            continue
        assert "default" in action.help, f"{command} {name}: help does not say its default: {action.help!r}"


@pytest.mark.parametrize("command", ["generate", "record-trace", "serve"])
def test_config_flag_defaults_shown_are_the_fields_defaults(command):
    for action in config_actions(subparser(command)):
        field = FIELDS[action.dest]
        shown = shown_defaults(action.help)
        flag = action.option_strings[0]
        if field.default is None and "default" in field.metadata.get("help", ""):
            # the field's own help says what None means ('default: the model's context'): nothing more
            assert "None" not in shown, f"{command} {flag}: says 'default: None' beside its own: {action.help!r}"
        else:
            assert shown == [str(field.default)], f"{command} {flag}: shows {shown}, the field's is {field.default}"


def test_the_on_by_default_switch_says_so():
    """--expert-load-stats is on unless --no-expert-load-stats: the help said neither."""
    help_text = next(a.help for a in subparser("generate")._actions if a.dest == "expert_load_stats")
    assert help_text.endswith("(default: True)")


def test_sampling_and_info_defaults_are_the_parsers():
    parsed = subparser("generate").parse_args([])
    actions = {a.dest: a for a in subparser("generate")._actions}
    assert shown_defaults(actions["top_k"].help) == [str(parsed.top_k)] == ["-1"]
    assert parsed.seed is None and "unseeded" in actions["seed"].help
    assert "Once upon a time" in actions["prompt"].help  # what runs without --prompt / --prompts-file
    info = {a.dest: a for a in subparser("info")._actions}["model_dir"]
    assert "moe_serve/default_model" in info.help
