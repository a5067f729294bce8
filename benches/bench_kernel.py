"""The fused Rust kernel against PyTorch eager for the same DenseLoRA branch, side by side.

Micro: ``out += s * gelu(D @ M @ gelu(E @ x))`` at LLaMA-7B and SmolLM2-135M projection shapes,
r in {16, 32, 64}, n in {1, 8, 128, 512} rows, float32 and bfloat16 (activations and weights in the
dtype). Both sides run on the same number of threads (``--threads``, default 1). The machine's
peak is the best single-precision matmul rate torch reaches on it; the table gives the share of
it the kernel reaches at n = 512.

End to end: tokens per second of greedy generation with SmolLM2-135M-Instruct: the base model
alone, with a DenseLoRA adapter (r = 16, GELU, q/k/v/up/down) on the PyTorch path, and on the
Rust path.

    python benches/bench_kernel.py [--threads 1] [--quick] [--isa avx2,avx512bf16]

``--isa`` measures several kernel backends side by side in one run (each against the same torch
timings, all alternated); by default only the one in use. Prints a table per backend and writes
benches/results/kernel.json.

Routed (``--routed``): a batch whose rows belong to different adapters on one basis, r = 16, n in
{1, 8, 32, 64, 512} rows at the same projection shapes, float32 and bfloat16. Side by side: the
routed kernel with every row on its own core (and, at n = 512, rows as sequences of 64 tokens,
one core per sequence), the single-adapter kernel on the same rows with one core, and PyTorch
doing the routed branch with a gather of the cores and a batched product. Both kernels are timed
through their prepared forms (the adapted layers' path); on one thread by the thread's CPU time.
Writes benches/results/kernel_routed.json.

    python benches/bench_kernel.py --routed [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import denselora as dl
from denselora import _core, kernels
from denselora.io import arrays
from denselora.method.functional import dense_branch as torch_branch

LLAMA = [(4096, 4096), (4096, 11008), (11008, 4096)]
SMOL = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
RANKS = [16, 32, 64]
ROWS = [1, 8, 128, 512]
GOALS = {1: 3.0, 8: 1.5, 128: 1.0, 512: 1.0}
RESULTS = Path(__file__).parent / "results"


def _per_call(fn: Callable[[], object], reps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    for _ in range(reps):
        fn()
    return (clock() - start) / reps


def compare(fa: Callable[[], object], fb: Callable[[], object], budget: float, rounds: int = 7) -> tuple[float, float]:
    """Seconds per call of ``fa`` and ``fb``, measured in alternating batches; the best batch of
    each counts (the least disturbed by other work on a shared machine)."""
    fa(), fb()
    once = max(_per_call(fa, 1), _per_call(fb, 1), 1e-7)
    reps = max(1, int(budget / (2 * rounds) / once))
    ta = tb = float("inf")
    for _ in range(rounds):
        ta = min(ta, _per_call(fa, reps))
        tb = min(tb, _per_call(fb, reps))
    return ta, tb


def compare_many(
    fns: list[tuple[Callable[[], object], Callable[[], object]]],
    budget: float,
    rounds: int = 7,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Seconds per call of each ``(setup, fn)`` by ``clock``: ``setup()`` runs before each batch
    of ``fn``; batches alternate between the functions and the best batch of each counts."""
    once = 1e-7
    for setup, fn in fns:
        setup()
        fn()
        once = max(once, _per_call(fn, 1))
    reps = max(1, int(budget / (len(fns) * rounds) / once))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, (setup, fn) in enumerate(fns):
            setup()
            best[i] = min(best[i], _per_call(fn, reps, clock))
    return best


def timeit(fn: Callable[[], object], budget: float) -> float:
    return compare(fn, fn, budget)[0]


def peak_gflops(budget: float) -> dict:
    """The best float32 matmul rate torch reaches here (its own GEMM, on the same threads)."""
    best, where = 0.0, None
    for size in (512, 1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        c = torch.empty(size, size)
        t = compare(functools.partial(torch.mm, a, b, out=c), lambda: None, budget, rounds=9)[0]
        rate = 2 * size**3 / t / 1e9
        if rate > best:
            best, where = rate, f"torch.mm {size}x{size}x{size} float32"
    return {"gflops": best, "how": where}


def _torch_add(out: torch.Tensor, x: torch.Tensor, e: torch.Tensor, m: torch.Tensor, d: torch.Tensor) -> None:
    out.add_(torch_branch(x, e, m, d, scale=2.0, activation="gelu"))


def micro(budget: float, shapes, ranks, rows, dtypes, peak: float, isas: list[str]) -> list[dict]:
    results = []
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        for d_in, d_out in shapes:
            for r in ranks:
                e = (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(tdtype)
                m = (torch.randn(r, r, generator=gen) / r**0.5).to(tdtype)
                d = (torch.randn(d_out, r, generator=gen) / r**0.5).to(tdtype)
                en, mn, dn = arrays.view(e, "e"), arrays.view(m, "m"), arrays.view(d, "d")
                for n in rows:
                    x = torch.randn(n, d_in, generator=gen).to(tdtype)
                    out = torch.zeros(n, d_out, dtype=tdtype)
                    xn, outn = arrays.view(x, "x"), arrays.view(out, "out")
                    run_torch = functools.partial(_torch_add, out, x, e, m, d)
                    run_rust = functools.partial(kernels.fused_branch, xn, en, mn, dn, scale=2.0, activation="gelu", out=outn)

                    def use(isa: str) -> Callable[[], None]:
                        return lambda: kernels.set_isa(isa)

                    with torch.no_grad():
                        times = compare_many(
                            [(lambda: None, run_torch)] + [(use(isa), run_rust) for isa in isas], budget * len(isas)
                        )
                    kernels.set_isa(None)
                    t_torch = times[0]
                    flops = 2 * n * (d_in * r + r * r + r * d_out)
                    for isa, t_rust in zip(isas, times[1:]):
                        row = {
                            "isa": isa,
                            "dtype": dtype,
                            "in": d_in,
                            "out": d_out,
                            "r": r,
                            "n": n,
                            "torch_us": t_torch * 1e6,
                            "rust_us": t_rust * 1e6,
                            "speedup": t_torch / t_rust,
                            "rust_gflops": flops / t_rust / 1e9,
                            "torch_gflops": flops / t_torch / 1e9,
                            "rust_peak_share": flops / t_rust / 1e9 / peak,
                        }
                        results.append(row)
                        print(
                            f"{isa:10s} {dtype:8s} {d_in:5d}->{d_out:<5d} r={r:<2d} n={n:<3d} torch {t_torch*1e6:9.1f} us  "
                            f"rust {t_rust*1e6:9.1f} us  x{t_torch/t_rust:5.2f}  ({flops/t_rust/1e9:6.1f} GFLOP/s)",
                            flush=True,
                        )
    return results


ROUTED_ROWS = [1, 8, 32, 64, 512]
ROUTED_RANK = 16
#: Tokens per sequence when the rows of a prefill batch are sequences (one core each).
ROUTED_SEQUENCE = 64
ROUTED_GOAL = 0.9


def _torch_routed_add(out, x, e, cores, index, d, scale: float) -> None:
    """The routed branch in PyTorch: a gather of each row's core and a batched product."""
    h = torch.nn.functional.gelu(x @ e.T)
    z = torch.bmm(cores[index], h.unsqueeze(-1)).squeeze(-1)
    out.add_(torch.nn.functional.gelu(z @ d.T), alpha=scale)


def routed_clock() -> Callable[[], float]:
    """On one thread, the calling thread's CPU time: the kernels differ by a few percent at most,
    less than what other processes' share of a busy machine adds to wall time."""
    return time.thread_time if kernels.get_num_threads() == 1 and torch.get_num_threads() == 1 else time.perf_counter


def routed(budget: float, shapes, rows, dtypes) -> list[dict]:
    """The routed kernel against the single-adapter kernel and PyTorch gather + bmm."""
    results = []
    gen = torch.Generator().manual_seed(0)
    r, scale = ROUTED_RANK, 2.0
    clock = routed_clock()
    for dtype in dtypes:
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        code = {"float32": "f32", "bfloat16": "bf16"}[dtype]
        for d_in, d_out in shapes:
            e = (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(tdtype)
            d = (torch.randn(d_out, r, generator=gen) / r**0.5).to(tdtype)
            cores = (torch.randn(max(rows), r, r, generator=gen) / r**0.5).to(tdtype)
            single = _core.PreparedBranch(
                arrays.view(e, "encoder"), arrays.view(cores[0], "m"), arrays.view(d, "decoder"), scale=scale, encoder_activation="gelu", decoder_activation="gelu"
            )
            stack = _core.PreparedRoutedBranch(
                arrays.view(e, "encoder"), arrays.view(cores, "cores"), arrays.view(d, "decoder"), scale=scale, encoder_activation="gelu", decoder_activation="gelu"
            )
            for n in rows:
                x = torch.randn(n, d_in, generator=gen).to(tdtype)
                out = torch.zeros(n, d_out, dtype=tdtype)
                layouts = [("distinct", torch.arange(n, dtype=torch.int32))]
                if n >= 2 * ROUTED_SEQUENCE:
                    layouts.append((f"seq{ROUTED_SEQUENCE}", torch.arange(n, dtype=torch.int32) // ROUTED_SEQUENCE))
                threads = kernels.get_num_threads()
                for layout, index in layouts:
                    run_single = functools.partial(single.add_unchecked, x.data_ptr(), out.data_ptr(), n, code, threads)
                    run_routed = functools.partial(stack.add_unchecked, x.data_ptr(), out.data_ptr(), index.data_ptr(), n, code, threads)
                    run_torch = functools.partial(_torch_routed_add, out, x, e, cores, index.long(), d, scale)
                    none = lambda: None  # noqa: E731
                    with torch.no_grad():
                        fns = [(none, run_single), (none, run_routed), (none, run_torch)]
                        t_single, t_routed, t_torch = compare_many(fns, 3 * budget, rounds=15, clock=clock)
                    row = {
                        "dtype": dtype,
                        "in": d_in,
                        "out": d_out,
                        "r": r,
                        "n": n,
                        "rows": layout,
                        "cores": int(index.max()) + 1,
                        "single_us": t_single * 1e6,
                        "routed_us": t_routed * 1e6,
                        "torch_gather_bmm_us": t_torch * 1e6,
                        "routed_vs_single": t_single / t_routed,
                        "routed_vs_torch": t_torch / t_routed,
                    }
                    results.append(row)
                    print(
                        f"{dtype:8s} {d_in:5d}->{d_out:<5d} n={n:<3d} {layout:8s} single {t_single*1e6:9.1f} us  routed {t_routed*1e6:9.1f} us "
                        f"(x{row['routed_vs_single']:4.2f} of single)  torch gather+bmm {t_torch*1e6:9.1f} us (routed x{row['routed_vs_torch']:5.2f})",
                        flush=True,
                    )
    return results


def routed_summary(results: list[dict]) -> list[dict]:
    rows = []
    geomean = lambda v: float(np.exp(np.mean(np.log(v))))  # noqa: E731
    for dtype in dict.fromkeys(r["dtype"] for r in results):
        for n, layout in dict.fromkeys((r["n"], r["rows"]) for r in results):
            for model, test in (("SmolLM2-135M", lambda r: r["in"] < 4096), ("LLaMA-7B", lambda r: r["in"] >= 4096)):
                sel = [r for r in results if r["dtype"] == dtype and r["n"] == n and r["rows"] == layout and test(r)]
                if not sel:
                    continue
                rows.append({
                    "dtype": dtype,
                    "n": n,
                    "rows": layout,
                    "shapes": model,
                    "cores": sel[0]["cores"],
                    "min_vs_single": min(r["routed_vs_single"] for r in sel),
                    "geomean_vs_single": geomean([r["routed_vs_single"] for r in sel]),
                    "geomean_vs_torch": geomean([r["routed_vs_torch"] for r in sel]),
                    "min_vs_torch": min(r["routed_vs_torch"] for r in sel),
                })
    return rows


def write_record(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out}")


def run_routed(args, shapes: list, budget: float) -> None:
    print(f"routed branch, r = {ROUTED_RANK}, GELU both sides; kernel ISA: {kernels.isa()}, {args.threads} thread(s)")
    results = routed(budget, shapes, ROUTED_ROWS, ["float32", "bfloat16"])
    table = routed_summary(results)
    print()
    print("routed speed as a share of the single-adapter kernel's on the same rows (goal >= "
          f"{ROUTED_GOAL}), and as a multiple of PyTorch gather + bmm")
    print(f"{'dtype':9s} {'shapes':13s} {'n':>4s} {'rows':9s} {'cores':>5s} {'vs single min':>14s} {'geomean':>8s} {'vs torch min':>13s} {'geomean':>8s}")
    for row in table:
        print(
            f"{row['dtype']:9s} {row['shapes']:13s} {row['n']:4d} {row['rows']:9s} {row['cores']:5d} {row['min_vs_single']:14.2f} "
            f"{row['geomean_vs_single']:8.2f} {row['min_vs_torch']:13.2f} {row['geomean_vs_torch']:8.2f}"
        )
    record = {
        "threads": args.threads,
        "quick": args.quick,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "kernel_isa": kernels.isa()},
        "note": (
            "vs_single: single-adapter kernel time / routed kernel time on the same rows (both prepared); "
            "vs_torch: torch gather + bmm time / routed kernel time; same thread count; best of alternated batches; "
            f"times are {routed_clock().__name__}"
        ),
        "goal_vs_single": ROUTED_GOAL,
        "summary": table,
        "micro": results,
    }
    write_record(record, Path(args.output or RESULTS / "kernel_routed.json"))


def end_to_end(new_tokens: int, repeats: int) -> dict:
    from denselora.pretrained import load_model

    base, tokenizer = load_model()
    adapted, _ = load_model()
    base.eval()
    prompt = tokenizer("The quick brown fox jumps over the lazy dog because it", return_tensors="pt").input_ids
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=tokenizer.eos_token_id
    )
    # GELU on both sides (the paper preset): a branch that cannot be merged into the weights.
    wrapped = dl.get_denselora_model(adapted, dl.DenseLoRAConfig.paper(r=16, alpha=32))
    wrapped.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in wrapped.adapter_state().values():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
    layers = sum(1 for _ in wrapped.adapter_layers())

    def seconds(model, path: Optional[str]) -> float:
        if path is not None:
            wrapped.set_branch_path(path)
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        return time.perf_counter() - start

    runs = {"base": (base, None), "torch": (wrapped, "reference"), "rust": (wrapped, "fused")}
    best = {name: float("inf") for name in runs}
    texts = {}
    with torch.no_grad():
        for name, (model, path) in runs.items():  # warm-up, and the greedy outputs
            if path is not None:
                wrapped.set_branch_path(path)
            texts[name] = model.generate(prompt, **kwargs)[0].tolist()
        for _ in range(repeats):  # interleaved, best of each
            for name, (model, path) in runs.items():
                best[name] = min(best[name], seconds(model, path))
    rate = {name: new_tokens / t for name, t in best.items()}
    return {
        "model": "SmolLM2-135M-Instruct",
        "adapter": "r=16, alpha=32, GELU, q/k/v/up/down",
        "adapted_layers": layers,
        "prompt_tokens": int(prompt.shape[1]),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "base_tokens_per_s": rate["base"],
        "torch_path_tokens_per_s": rate["torch"],
        "rust_path_tokens_per_s": rate["rust"],
        "torch_path_overhead": best["torch"] / best["base"] - 1,
        "rust_path_overhead": best["rust"] / best["base"] - 1,
        "rust_and_torch_paths_generate_the_same_tokens": texts["torch"] == texts["rust"],
    }


def summary(results: list[dict]) -> list[dict]:
    rows = []
    isas = list(dict.fromkeys(r["isa"] for r in results))
    for isa in isas:
        for dtype in sorted({r["dtype"] for r in results}):
            for n in sorted({r["n"] for r in results}):
                sel = [r for r in results if r["isa"] == isa and r["dtype"] == dtype and r["n"] == n]
                speed = [r["speedup"] for r in sel]
                rows.append({
                    "isa": isa,
                    "dtype": dtype,
                    "n": n,
                    "min_speedup": min(speed),
                    "geomean_speedup": float(np.exp(np.mean(np.log(speed)))),
                    "max_speedup": max(speed),
                    "goal": GOALS.get(n),
                    "best_peak_share": max(r["rust_peak_share"] for r in sel),
                    "geomean_peak_share_llama": float(np.exp(np.mean(np.log([r["rust_peak_share"] for r in sel if r["in"] >= 4096] or [1])))),
                })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    parser.add_argument("--budget", type=float, default=0.12, help="seconds per measurement and side")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--isa", default=None, help="comma-separated kernel backends to measure side by side (default: the one in use)")
    parser.add_argument("--e2e-only", action="store_true")
    parser.add_argument("--routed", action="store_true", help="the routed branch of mixed-adapter batches instead")
    parser.add_argument("--output", default=None, help="JSON path (default benches/results/kernel.json, or kernel_routed.json)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    shapes, ranks = (LLAMA + SMOL, RANKS)
    budget = args.budget
    if args.quick:
        shapes, ranks, budget = [LLAMA[1], SMOL[0]], [16, 64], budget / 3
    if args.e2e_only:
        print(json.dumps(end_to_end(args.new_tokens, repeats=3), indent=2))
        return
    if args.routed:
        run_routed(args, [LLAMA[1], SMOL[0]] if args.quick else LLAMA + SMOL, budget)
        return
    isas = args.isa.split(",") if args.isa else [kernels.isa()]
    for isa in isas:
        if isa not in kernels.available_isas():
            parser.error(f"--isa: this CPU cannot run {isa!r} (available: {', '.join(kernels.available_isas())})")
    peak = peak_gflops(max(budget, 0.3))
    print(f"peak: {peak['gflops']:.1f} GFLOP/s ({peak['how']}, {args.threads} thread(s)); kernel ISA: {kernels.isa()}")
    results = micro(budget, shapes, ranks, ROWS, ["float32", "bfloat16"], peak["gflops"], isas)
    # Measured again after the runs: on a shared machine the best of the two is the closer one.
    again = peak_gflops(max(budget, 0.3))
    if again["gflops"] > peak["gflops"]:
        for row in results:
            row["rust_peak_share"] *= peak["gflops"] / again["gflops"]
        peak = again
    print(f"peak (best of two measurements): {peak['gflops']:.1f} GFLOP/s")
    table = summary(results)
    print()
    print(f"{'isa':10s} {'dtype':9s} {'n':>4s} {'min x':>7s} {'geomean x':>10s} {'max x':>7s} {'goal':>5s} {'peak share (best)':>18s}")
    for row in table:
        print(
            f"{row['isa']:10s} {row['dtype']:9s} {row['n']:4d} {row['min_speedup']:7.2f} {row['geomean_speedup']:10.2f} {row['max_speedup']:7.2f} "
            f"{row['goal']:5.1f} {row['best_peak_share']*100:17.1f}%"
        )
    e2e = None
    if not args.skip_e2e:
        e2e = end_to_end(args.new_tokens, repeats=2 if args.quick else 4)
        print()
        print(
            f"SmolLM2-135M greedy generation ({e2e['new_tokens']} new tokens, {e2e['adapted_layers']} adapted layers): "
            f"base {e2e['base_tokens_per_s']:.2f} tok/s, torch path {e2e['torch_path_tokens_per_s']:.2f} tok/s "
            f"(+{e2e['torch_path_overhead']*100:.1f}% time), rust path {e2e['rust_path_tokens_per_s']:.2f} tok/s "
            f"(+{e2e['rust_path_overhead']*100:.1f}% time)"
        )
    record = {
        "threads": args.threads,
        "quick": args.quick,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "kernel_isa": kernels.isa(), "isas_measured": isas},
        "peak": peak,
        "note": "ratios are torch time / rust time on the same thread count; shares are of the peak above",
        "summary": table,
        "micro": results,
        "end_to_end": e2e,
    }
    write_record(record, Path(args.output or RESULTS / "kernel.json"))


if __name__ == "__main__":
    main()
