"""``denselora merge``, ``denselora truncate`` and ``denselora family build``: the adapter algebra
from the command line."""

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


def _family_build(args: argparse.Namespace) -> int:
    names = None if args.names is None else [n.strip() for n in args.names.split(",")]
    report = algebra.build_family(
        args.inputs, args.output, rank=args.rank, names=names, nonlinear=args.nonlinear, samples=args.samples, seed=args.seed
    )
    print(report.table())
    print(f"wrote {args.output}: basis {report.basis!r} and {len(report.errors)} tenants")
    return 0


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """The arguments and the handler of ``merge``, ``truncate`` or ``family``."""
    if name == "family":
        parser.description = "Families of adapters on one shared basis."
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        build = actions.add_parser(
            "build",
            help="compress full adapters of one base model into a family bundle",
            description=(
                "Compress full adapters of one base model into a .dl bundle holding one shared basis (entry "
                "'basis') and each adapter as a tenant (its cores only). Linear adapters: exact up to the rank; "
                "non-linear ones: aligned, averaged and refit. Prints the relative error per adapter and layer."
            ),
        )
        build.add_argument("inputs", nargs="+", metavar="IN", help="adapter directories or bundle.dl:name entries")
        build.add_argument("-o", "--output", required=True, help="the family bundle to write (e.g. fam.dl)")
        build.add_argument("-r", "--rank", type=int, help="rank of the shared basis (default: exact, the joint rank)")
        build.add_argument("--names", help="comma-separated tenant names (default: the directory or entry names)")
        build.add_argument(
            "--nonlinear", choices=algebra.NONLINEAR_METHODS, default="aligned",
            help="GELU/SiLU adapters: 'aligned' (a basis of rank r, cores refit; lossy) or 'stack' (exact, cores of the summed ranks)",
        )
        build.add_argument("--samples", type=int, default=1024, help="random inputs to refit and judge non-linear cores")
        build.add_argument("--seed", type=int, default=0, help="seed of those inputs")
        build.set_defaults(handler=_family_build)
        return
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
