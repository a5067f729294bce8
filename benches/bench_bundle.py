"""The .dl bundle against separate files, side by side in one run.

1,000 SmolLM2-135M-shaped adapters (r=8 on q, k, v, up and down of 30 layers: 64,896 parameters,
254 KiB in f32 each) are written three ways: one bundle, one safetensors adapter directory each, and
one torch.save file each. Then:

- open + fetch one: open the collection and get one adapter's tensors (bundle: open the file,
  validate the catalog of 1,000 adapters, hand out zero-copy views and check their checksums;
  safetensors / torch: read that adapter's file);
- switch: with the collection already open, fetch another adapter: one used for the first time
  (its record is parsed and validated, its blobs checksummed) and one used before;
- pack: `pack` of the 1,000 adapter directories against a plain copy of a file of the same size
  (both fsynced), and the peak memory growth of a process packing all of them.

Files are in the page cache (warm); times are medians. Usage:
    python benches/bench_bundle.py [--adapters 1000] [--out benches/results/bundle.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as st_load_numpy
from safetensors.torch import load_file as st_load_torch

import denselora
from denselora import _core
from denselora.io.bundle import Bundle, pack

LAYERS, HIDDEN, INTERMEDIATE, KV, RANK = 30, 576, 1536, 192, 8
MODULES = {  # name: (in, out, module path template)
    "q_proj": (HIDDEN, HIDDEN, "model.layers.{}.self_attn.q_proj"),
    "k_proj": (HIDDEN, KV, "model.layers.{}.self_attn.k_proj"),
    "v_proj": (HIDDEN, KV, "model.layers.{}.self_attn.v_proj"),
    "up_proj": (HIDDEN, INTERMEDIATE, "model.layers.{}.mlp.up_proj"),
    "down_proj": (INTERMEDIATE, HIDDEN, "model.layers.{}.mlp.down_proj"),
}


def make_adapter(rng: np.random.Generator) -> tuple[dict, dict[str, np.ndarray]]:
    groups, tensors = {}, {}
    for group, (fan_in, fan_out, template) in MODULES.items():
        tensors[f"shared.{group}.encoder"] = rng.standard_normal((RANK, fan_in), dtype=np.float32)
        tensors[f"shared.{group}.decoder"] = rng.standard_normal((fan_out, RANK), dtype=np.float32)
        for layer in range(LAYERS):
            path = template.format(layer)
            groups[path] = group
            tensors[f"{path}.m"] = rng.standard_normal((RANK, RANK), dtype=np.float32)
    config = {"r": RANK, "alpha": 2 * RANK, "activations": ["gelu", "gelu"], "groups": groups}
    return config, tensors


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_fsync(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bundle.json")
    args = parser.parse_args()
    if args.adapters < 2:
        parser.error("--adapters must be at least 2 (adapters used before and never used are timed apart)")
    n = args.adapters
    rng = np.random.default_rng(0)
    names = [f"task-{i:04d}" for i in range(n)]

    with tempfile.TemporaryDirectory(prefix="bench-bundle-") as tmp:
        root = Path(tmp)
        dirs, pts = root / "adapters", root / "pt"
        pts.mkdir()
        t0 = time.perf_counter()
        for name in names:
            config, tensors = make_adapter(rng)
            _core.save_adapter(os.fspath(dirs / name), json.dumps(config), tensors)
            torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, pts / f"{name}.pt")
        print(f"wrote {n} adapters as directories and .pt files in {time.perf_counter() - t0:.1f} s")
        adapter_bytes = sum(a.nbytes for a in make_adapter(np.random.default_rng(1))[1].values())

        # -- pack throughput vs a plain copy of the same number of bytes --
        bundle_path = root / "all.dl"
        sources = {name: dirs / name for name in names}
        pack_times, copy_times = [], []
        for _ in range(5):  # interleaved, so that both see the same disk weather
            if bundle_path.exists():
                bundle_path.unlink()
            start = time.perf_counter()
            stats = pack(bundle_path, sources)
            pack_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            copy_fsync(bundle_path, root / "copy.dl")
            copy_times.append(time.perf_counter() - start)
            (root / "copy.dl").unlink()
        pack_s, copy_s = statistics.median(pack_times), statistics.median(copy_times)
        # Memory stays flat while packing: peak RSS growth of a fresh process packing everything.
        # ru_maxrss survives fork/exec, so the probe resets the kernel's peak (clear_refs 5) and
        # reads VmHWM (Linux).
        probe = (
            "import importlib.util, sys, os\n"
            "spec = importlib.util.spec_from_file_location('denselora._core', sys.argv[3])\n"
            "_core = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(_core)\n"
            "def status(key):\n"
            "    line = next(l for l in open('/proc/self/status') if l.startswith(key))\n"
            "    return int(line.split()[1]) / 1024\n"
            "names = sorted(os.listdir(sys.argv[1]))\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"
            "before = status('VmHWM:')\n"
            "_core.pack_bundle(sys.argv[2], [(n, os.path.join(sys.argv[1], n)) for n in names])\n"
            "print(before, status('VmHWM:'))\n"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        # The extension alone (no torch import), so that the baseline peak is small.
        extension = os.fspath(next(Path(denselora.__file__).parent.glob("_core*.so")))
        done = subprocess.run(
            [sys.executable, "-c", probe, dirs, root / "rss.dl", extension], env=env, capture_output=True, text=True, check=True
        )
        rss_before_mib, rss_peak_mib = map(float, done.stdout.split())
        (root / "rss.dl").unlink()
        file_mb = stats["file_bytes"] / 2**20
        print(f"pack: {file_mb / pack_s:.0f} MiB/s, plain copy: {file_mb / copy_s:.0f} MiB/s ({file_mb:.0f} MiB)")

        # -- open the collection and fetch one adapter --
        picks = random.Random(0).sample(names, min(args.repeats, n))
        it = itertools.cycle(picks)  # four timed loops of --repeats calls each

        def bundle_open_fetch():
            b = Bundle(bundle_path)
            arrays = b.tensors(next(it))
            assert len(arrays) == 160

        def bundle_open_only():
            Bundle(bundle_path)

        def safetensors_numpy():
            arrays = st_load_numpy(dirs / next(it) / "adapter.safetensors")
            assert len(arrays) == 160

        def safetensors_torch():
            st_load_torch(dirs / next(it) / "adapter.safetensors")

        def torch_load():
            torch.load(pts / f"{next(it)}.pt", weights_only=True)

        open_fetch = {
            "bundle (open + zero-copy fetch, checksums checked)": median_time(bundle_open_fetch, args.repeats),
            "bundle (open only)": median_time(bundle_open_only, args.repeats),
            "safetensors.numpy.load_file": median_time(safetensors_numpy, args.repeats),
            "safetensors.torch.load_file": median_time(safetensors_torch, args.repeats),
            "torch.load (weights_only)": median_time(torch_load, args.repeats),
        }

        # -- switching adapters with the collection open --
        # First use of an adapter parses and validates its record and checks its blobs once;
        # later uses hand out views straight away. Both are measured, on distinct adapters.
        bundle = Bundle(bundle_path)
        # Disjoint sets (any --adapters >= 2): up to 50 adapters used before, up to 300 never used.
        shuffled = random.Random(1).sample(names, n)
        again_names = shuffled[: min(50, n // 2)]
        fresh_names = shuffled[len(again_names) :][:300]
        fresh = iter(fresh_names)
        for name in again_names:
            bundle.tensors(name)
        again = iter(again_names * (700 // len(again_names) + 1))
        other = itertools.cycle(random.Random(3).sample(names, min(200, n)))
        switch = {
            "bundle.tensors, first use of the adapter": median_time(lambda: bundle.tensors(next(fresh)), len(fresh_names)),
            "bundle.tensors, adapter used before": median_time(lambda: bundle.tensors(next(again)), 500),
            "bundle.torch_tensors (copies, used before)": median_time(lambda: bundle.torch_tensors(next(again)), 200),
            "safetensors.numpy.load_file": median_time(lambda: st_load_numpy(dirs / next(other) / "adapter.safetensors"), 100),
            "safetensors.torch.load_file": median_time(lambda: st_load_torch(dirs / next(other) / "adapter.safetensors"), 100),
            "torch.load (weights_only)": median_time(lambda: torch.load(pts / f"{next(other)}.pt", weights_only=True), 100),
        }

    result = {
        "what": f"{n} SmolLM2-135M-shaped DenseLoRA adapters (r={RANK}, q/k/v/up/down x {LAYERS} layers, f32), warm page cache",
        "adapter_bytes": adapter_bytes,
        "bundle_file_bytes": stats["file_bytes"],
        "pack": {
            "pack_s": pack_s,
            "plain_copy_s": copy_s,
            "pack_mib_per_s": file_mb / pack_s,
            "plain_copy_mib_per_s": file_mb / copy_s,
            "pack_over_copy_throughput": copy_s / pack_s,
            "pack_process_peak_rss_mib_before": rss_before_mib,
            "pack_process_peak_rss_mib_after": rss_peak_mib,
        },
        "open_and_fetch_one_ms": {k: v * 1e3 for k, v in open_fetch.items()},
        "switch_adapter_ms": {k: v * 1e3 for k, v in switch.items()},
        "ratios": {
            "open_fetch_safetensors_numpy_over_bundle": open_fetch["safetensors.numpy.load_file"]
            / open_fetch["bundle (open + zero-copy fetch, checksums checked)"],
            "open_fetch_torch_load_over_bundle": open_fetch["torch.load (weights_only)"]
            / open_fetch["bundle (open + zero-copy fetch, checksums checked)"],
            "switch_first_use_safetensors_numpy_over_bundle": switch["safetensors.numpy.load_file"]
            / switch["bundle.tensors, first use of the adapter"],
            "switch_first_use_torch_load_over_bundle": switch["torch.load (weights_only)"]
            / switch["bundle.tensors, first use of the adapter"],
            "switch_used_before_safetensors_numpy_over_bundle": switch["safetensors.numpy.load_file"]
            / switch["bundle.tensors, adapter used before"],
            "switch_used_before_torch_load_over_bundle": switch["torch.load (weights_only)"]
            / switch["bundle.tensors, adapter used before"],
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "denselora": denselora.__version__},
        "command": "python benches/bench_bundle.py",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{result['what']}; one adapter = {adapter_bytes / 2**10:.0f} KiB, bundle = {file_mb:.0f} MiB")
    print(f"\n{'open the collection + fetch one adapter':<56}{'median ms':>10}")
    for k, v in open_fetch.items():
        print(f"  {k:<54}{v * 1e3:>10.3f}")
    print(f"\n{'switch adapters (collection open)':<56}{'median ms':>10}")
    for k, v in switch.items():
        print(f"  {k:<54}{v * 1e3:>10.3f}")
    print(f"\npack {result['pack']['pack_mib_per_s']:.0f} MiB/s vs plain copy {result['pack']['plain_copy_mib_per_s']:.0f} MiB/s "
          f"(pack/copy throughput {result['pack']['pack_over_copy_throughput']:.2f}); "
          f"peak RSS of the packing process {rss_before_mib:.1f} MiB before, {rss_peak_mib:.1f} MiB after packing {file_mb:.0f} MiB")
    for k, v in result["ratios"].items():
        print(f"  {k}: {v:.1f}x")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
