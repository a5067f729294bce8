"""Bundle commands: ``pack`` (also installed as ``denselora-pack``), ``inspect``, ``unpack`` and
``verify``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ..errors import ArgumentError
from ..io.basis import families as find_families
from ..io.bundle import Bundle, pack
from ..io.sources import CONFIG_FILE, TENSORS_FILE


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """The arguments and the handler of the bundle command ``name``."""
    if name == "pack":
        parser.description = (
            "Pack every adapter directory found directly under each SOURCE (named by its directory) into one "
            ".dl bundle. A SOURCE that is itself an adapter directory is packed as one adapter. An existing "
            "bundle at -o keeps its adapters; those of the same name are replaced."
        )
        parser.add_argument("sources", nargs="+", type=Path, metavar="SOURCE", help="a directory of adapter directories, or one adapter directory")
        parser.add_argument("-o", "--output", required=True, type=Path, help="the bundle to write (e.g. adapters.dl)")
        parser.add_argument("--dtype", choices=["f32", "f16", "bf16"], help="convert the packed adapters' tensors to this dtype (recorded in the bundle; adapters already in the bundle are kept as stored)")
        parser.add_argument("--overwrite", action="store_true", help="start a new bundle instead of adding to an existing one")
        parser.set_defaults(handler=_pack)
        return
    parser.add_argument("bundle", type=Path)
    if name == "unpack":
        parser.add_argument("-o", "--output", required=True, type=Path, help="directory that receives one directory per adapter")
        parser.add_argument("--name", action="append", dest="names", metavar="NAME", help="unpack only this adapter (repeatable)")
    parser.set_defaults(handler={"inspect": _inspect, "unpack": _unpack, "verify": _verify}[name])


def _is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).exists() or (path / TENSORS_FILE).exists()


def find_adapters(sources: list[Path]) -> dict[str, Path]:
    """``{name: directory}`` for the adapter directories in ``sources`` (see ``pack --help``).
    A directory holding only one of the two adapter files counts, so that packing it fails with
    the missing file named rather than skipping it silently."""
    found: dict[str, Path] = {}
    for source in sources:
        if not source.is_dir():
            if source.exists():
                raise NotADirectoryError(f"{source}: not a directory (give a directory of adapter directories, or one adapter directory)")
            raise FileNotFoundError(f"{source}: no such directory")
        if _is_adapter_dir(source):
            candidates = [source]
        else:
            candidates = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
            skipped = [p.name for p in candidates if not _is_adapter_dir(p)]
            if skipped:
                print(f"skipping {len(skipped)} director{'y' if len(skipped) == 1 else 'ies'} without "
                      f"{CONFIG_FILE} or {TENSORS_FILE} under {source}: {', '.join(skipped)}", file=sys.stderr)
            candidates = [p for p in candidates if _is_adapter_dir(p)]
            if not candidates:
                raise ArgumentError(f"{source}: no adapter directories found (each needs {CONFIG_FILE} and {TENSORS_FILE})")
        for path in candidates:
            name = path.resolve().name
            if name in found:
                raise ArgumentError(f"adapter name {name!r} comes from both {found[name]} and {path}")
            found[name] = path
    return found


def _progress_bar(total: int, unit: str, desc: str) -> tqdm:
    # tqdm turns itself off when stderr is not a terminal (disable=None).
    return tqdm(total=total, unit=unit, desc=desc, disable=None, leave=False, file=sys.stderr)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _pack(args: argparse.Namespace) -> int:
    adapters = find_adapters(args.sources)
    keep = not args.overwrite and args.output.exists()
    existing = len(Bundle(args.output)) if keep else 0
    with _progress_bar(existing + len(adapters), "adapter", "pack") as bar:
        stats = pack(args.output, adapters, dtype=args.dtype, keep_existing=keep, progress=lambda _: bar.update())
    saved = stats["logical_bytes"] - stats["stored_bytes"]
    print(
        # What the bundle holds now, as written under the writers' lock (another writer may have
        # added adapters since `existing` was counted for the progress bar).
        f"{args.output}: {stats['adapters']} adapters ({len(adapters)} packed"
        f"{' into the existing bundle' if keep else ''}), {stats['tensors']} tensors, "
        f"{_size(stats['file_bytes'])}; {stats['deduplicated']} shared tensors saved {_size(saved)}"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    bundle = Bundle(args.bundle)
    rows = []
    for name in bundle.names():
        groups = bundle.groups(name)
        info = bundle.tensor_info(name)
        ranks = sorted({g["encoder_rank"] for g in groups} | {g["decoder_rank"] for g in groups})
        dtypes = sorted({t["dtype"] for t in info})
        converted = sorted({t["converted_from"] for t in info if t["converted_from"]})
        params = sum(_numel(t["shape"]) for t in info)
        rows.append([
            name,
            "/".join(map(str, ranks)),
            str(len(groups)),
            str(sum(g["modules"] for g in groups)),
            f"{params:,d}",
            ",".join(dtypes) + (f" (from {','.join(converted)})" if converted else ""),
            _size(sum(t["length"] for t in info)),
        ])
    header = ["adapter", "rank", "groups", "modules", "params", "dtype", "size"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {1, 2, 3, 4, 6}
    for row in [header, *rows]:
        print("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    _print_families(bundle)
    s = bundle.stats()
    saved = s["logical_bytes"] - s["stored_bytes"]
    share = 100.0 * saved / s["logical_bytes"] if s["logical_bytes"] else 0.0
    print(
        f"\n{args.bundle}: {s['adapters']} adapters, {s['tensors']} tensors in {s['blobs']} distinct blobs; "
        f"file {_size(s['file_bytes'])}, tensors {_size(s['logical_bytes'])} stored as {_size(s['stored_bytes'])} "
        f"(deduplication saves {_size(saved)}, {share:.1f}%)"
    )
    return 0


def _print_families(bundle: Bundle) -> None:
    """Each basis (by fingerprint), its tenants and sizes; tenants whose basis is absent are flagged."""
    families = find_families(bundle)
    if not families:
        return
    print("\nfamilies:")
    for family in families:
        tenants = family.tenant_bytes
        if family.missing_basis:
            print(f"  MISSING BASIS {family.fingerprint}: not in this bundle; its {len(tenants)} tenants cannot load from it alone")
        else:
            print(f"  basis {', '.join(family.bases)} (fingerprint {family.fingerprint}): shared factors {_size(family.basis_bytes)}")
        width = max(len(t) for t in tenants)
        for tenant, size in tenants.items():
            print(f"    tenant {tenant.ljust(width)}  {_size(size)}")
        if tenants:
            mean = sum(tenants.values()) / len(tenants)
            print(f"    {len(tenants)} tenants, {_size(mean)} each on average")
    missing = [f for f in families if f.missing_basis]
    if missing:
        names = ", ".join(t for f in missing for t in f.tenants)
        print(f"warning: tenants without their basis in {bundle.path}: {names}", file=sys.stderr)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _unpack(args: argparse.Namespace) -> int:
    bundle = Bundle(args.bundle)
    names = args.names or bundle.names()
    with _progress_bar(len(names), "adapter", "unpack") as bar:
        written = bundle.unpack(args.output, names, progress=lambda _: bar.update())
    print(f"{args.output}: wrote {len(written)} adapter directories")
    return 0


def _verify(args: argparse.Namespace) -> int:
    bundle = Bundle(args.bundle)
    s = bundle.stats()
    with tqdm(total=s["stored_bytes"], unit="B", unit_scale=True, desc="verify", disable=None, leave=False, file=sys.stderr) as bar:
        bundle.verify(progress=lambda done, total: bar.update(done - bar.n))
    print(f"{args.bundle}: OK ({s['adapters']} adapters, {s['blobs']} blobs, {_size(s['file_bytes'])}, every checksum matches)")
    return 0
