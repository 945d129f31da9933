"""`moe-serve`: one entry point, one module per subcommand.

Each module in COMMANDS exposes `register(subparsers)`, which adds its subcommand and sets
`func` (called with the parsed arguments; its return value is the exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "moe_serve.cli.generate",  # generate, info, record-trace
    "moe_serve.cli.serve",  # serve
    "moe_serve.cli.cache_sim",  # cache-sim
    "moe_serve.cli.predict",  # predict fit, predict eval
    "moe_serve.cli.place",  # place, place eval
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-serve", description="Serve Mixture-of-Experts models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; a ValueError (bad flag value, bad checkpoint file) or any OSError (a file
    absent, unreadable or unwritable, a directory, a name too long, a full disk) is one line naming the
    problem (an OSError: its path) and exit code 2, not a traceback. Anything else (a TypeError, ...) is a
    bug and keeps its traceback."""
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"moe-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"moe-serve {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2


def os_error_line(exc: OSError) -> str:
    """'PATH: strerror' (both paths of a rename or link); our own messages (no filename) as they are."""
    if exc.filename is None or not exc.strerror:
        return str(exc) or type(exc).__name__
    paths = str(exc.filename) if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"{paths}: {exc.strerror}"


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
