"""``denselora merge`` and ``denselora truncate``: the adapter algebra from the command line."""

from __future__ import annotations

import argparse

from .. import algebra
from ..errors import ArgumentError


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be numbers separated by commas, got {text!r}") from None


def _merge(args: argparse.Namespace) -> int:
    if args.weights is not None and len(args.weights) != len(args.inputs):
        raise ArgumentError(f"--weights: {len(args.weights)} weights for {len(args.inputs)} adapters")
    report = algebra.average(
        args.inputs, args.output, weights=args.weights, mode=args.mode, ema=args.ema, decoder_alignment=args.decoder_alignment
    )
    print(report.table())
    print(f"wrote {args.output}")
    return 0


def _truncate(args: argparse.Namespace) -> int:
    report = algebra.truncate(args.input, args.output, rank=args.rank, energy=args.energy)
    print(report.table())
    print(f"wrote {args.output}")
    return 0


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """The arguments and the handler of ``merge`` or ``truncate``."""
    if name == "merge":
        parser.description = "Average adapters. The first input is the reference the others are aligned to."
        parser.add_argument("inputs", nargs="+", metavar="IN", help="adapter directories or bundle.dl:name entries")
        parser.add_argument("-o", "--output", required=True, help="output directory or bundle.dl:name")
        parser.add_argument("--weights", type=_weights, help="comma-separated weights, one per input (default: uniform)")
        parser.add_argument("--mode", choices=algebra.MODES, default="auto", help="default: auto (linear for runs with the same init)")
        parser.add_argument("--ema", type=float, help="exponential moving average with this decay (inputs oldest first)")
        parser.add_argument(
            "--decoder-alignment", choices=algebra.DECODER_ALIGNMENTS, default="product", help="aligned mode's decoder side"
        )
        parser.set_defaults(handler=_merge)
        return
    parser.description = "Reduce each group's rank; prints the error per layer."
    parser.add_argument("input", metavar="IN", help="adapter directory or bundle.dl:name entry")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("-r", "--rank", type=int, help="new rank (at most, per side and group)")
    target.add_argument("--energy", type=float, help="keep this fraction (0, 1] of each spectrum's energy")
    parser.add_argument("-o", "--output", required=True, help="output directory or bundle.dl:name")
    parser.set_defaults(handler=_truncate)
