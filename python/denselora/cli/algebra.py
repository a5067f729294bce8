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


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    merge = subparsers.add_parser(
        "merge",
        help="average adapters (runs, seeds, checkpoints) into one",
        description="Average adapters. The first input is the reference the others are aligned to.",
    )
    merge.add_argument("inputs", nargs="+", metavar="IN", help="adapter directories or bundle.dl:name entries")
    merge.add_argument("-o", "--output", required=True, help="output directory or bundle.dl:name")
    merge.add_argument("--weights", type=_weights, help="comma-separated weights, one per input (default: uniform)")
    merge.add_argument("--mode", choices=algebra.MODES, default="auto", help="default: auto (linear for runs with the same init)")
    merge.add_argument("--ema", type=float, help="exponential moving average with this decay (inputs oldest first)")
    merge.add_argument(
        "--decoder-alignment", choices=algebra.DECODER_ALIGNMENTS, default="product", help="aligned mode's decoder side"
    )
    merge.set_defaults(handler=_merge)

    trunc = subparsers.add_parser(
        "truncate", help="reduce an adapter's rank", description="Reduce each group's rank; prints the error per layer."
    )
    trunc.add_argument("input", metavar="IN", help="adapter directory or bundle.dl:name entry")
    target = trunc.add_mutually_exclusive_group(required=True)
    target.add_argument("-r", "--rank", type=int, help="new rank (at most, per side and group)")
    target.add_argument("--energy", type=float, help="keep this fraction (0, 1] of each spectrum's energy")
    trunc.add_argument("-o", "--output", required=True, help="output directory or bundle.dl:name")
    trunc.set_defaults(handler=_truncate)
