"""`python -m moe_serve.server ARGS`: the same as `moe-serve serve ARGS`."""
import argparse
import sys

from moe_serve.cli import serve
from moe_serve.cli.main import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_serve.server")
    serve.register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
