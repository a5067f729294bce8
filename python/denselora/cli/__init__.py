"""The ``denselora`` command line. Each command lives in its own module under ``denselora.cli``
and registers a subparser through ``register(subparsers)``; errors become one clear line and a
non-zero exit status, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from ..errors import DenseLoRAError

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES: list[str] = ["train"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denselora", description="DenseLoRA adapters: train, store, combine, serve.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def run(handler_args: argparse.Namespace) -> int:
    try:
        return int(handler_args.handler(handler_args) or 0)
    except (DenseLoRAError, OSError) as exc:
        print(f"denselora {handler_args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"denselora {handler_args.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def pack_main(argv: Optional[Sequence[str]] = None) -> int:
    """``denselora-pack``: the same as ``denselora pack``."""
    return main(["pack", *(sys.argv[1:] if argv is None else argv)])
