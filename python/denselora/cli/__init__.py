"""The ``denselora`` command line. Each command lives in a module of ``denselora.cli`` that builds
its arguments in ``configure(name, parser)``; a command's module is imported only when that command
runs (or its ``--help`` is asked for), so ``denselora --help`` and the bundle commands start without
PyTorch. Errors become one clear line and a non-zero exit status, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple, Optional, Sequence

from ..errors import DenseLoRAError


class Command(NamedTuple):
    module: str  # under denselora.cli
    summary: str


# In the order of --help.
COMMANDS: dict[str, Command] = {
    "train": Command("train", "fine-tune an adapter on instruction data or a BIG-bench task"),
    "eval": Command("train", "accuracy of a model with an adapter on multiple-choice or LLM-Adapters test data"),
    "demo": Command("train", "fine-tune the embedded SmolLM2-135M on a packaged BIG-bench task, CPU only, in minutes"),
    "pack": Command("bundle", "pack adapter directories into a .dl bundle"),
    "inspect": Command("bundle", "list a bundle's adapters, ranks, groups and sizes"),
    "unpack": Command("bundle", "write a bundle's adapters back as adapter directories"),
    "verify": Command("bundle", "check every checksum of a bundle"),
    "merge": Command("algebra", "average adapters (runs, seeds, checkpoints) into one"),
    "truncate": Command("algebra", "reduce an adapter's rank"),
    "family": Command("algebra", "build a family: adapters as tenants of one shared basis (family build)"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of ``command`` (the others are listed by name only)."""
    parser = argparse.ArgumentParser(prog="denselora", description="DenseLoRA adapters: train, store, combine, serve.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, entry in COMMANDS.items():
        sub = subparsers.add_parser(name, help=entry.summary)
        if name == command:
            importlib.import_module(f"{__name__}.{entry.module}").configure(name, sub)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command is the first argument: the top-level parser takes no option but --help.
    command = argv[0] if argv and argv[0] in COMMANDS else None
    return run(build_parser(command).parse_args(argv))


def pack_main(argv: Optional[Sequence[str]] = None) -> int:
    """``denselora-pack``: the same as ``denselora pack``."""
    return main(["pack", *(sys.argv[1:] if argv is None else argv)])
