"""Adapter algebra against the same computation written in PyTorch, side by side.

Ten random adapters shaped like SmolLM2-135M with DenseLoRA r=16 on q,k,v,up,down (30 layers):
- linear average of the ten;
- aligned average (Hungarian matching of encoder rows, products D M_l averaged and refactored by
  QR + SVD of the stacked core), PyTorch side using scipy's linear_sum_assignment;
- truncation of one adapter from r=16 to r=8.
Both sides start from the same in-memory torch tensors and end with torch tensors; the results are
compared for agreement. Times are the best of --repeat runs; the ratio is what to read.

Usage: python benches/bench_algebra.py [--repeat 3]   (writes benches/results/algebra.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

import denselora as dl

HERE = Path(__file__).resolve().parent
SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "up_proj": (576, 1536), "down_proj": (1536, 576)}
LAYERS = 30


def random_adapter(seed: int, r: int = 16):
    g = torch.Generator().manual_seed(seed)
    tensors, groups = {}, {}
    for group, (fan_in, fan_out) in SHAPES.items():
        tensors[f"shared.{group}.encoder"] = torch.randn(r, fan_in, generator=g) / fan_in**0.5
        tensors[f"shared.{group}.decoder"] = torch.randn(fan_out, r, generator=g) * 0.01
        for layer in range(LAYERS):
            module = f"model.layers.{layer}.{'mlp' if group in ('up_proj', 'down_proj') else 'self_attn'}.{group}"
            tensors[f"{module}.m"] = torch.randn(r, r, generator=g) / r**0.5
            groups[module] = group
    config = dl.DenseLoRAConfig(r=r, activation="gelu", init_fingerprint=f"seed{seed}").to_dict()
    config["groups"] = groups
    return config, tensors


def modules_of(config, group):
    return sorted(m for m, g in config["groups"].items() if g == group)


# -- the PyTorch side ---------------------------------------------------------------------------


def torch_linear(adapters):
    w = 1.0 / len(adapters)
    return {k: sum(t[k].double() * w for _, t in adapters).float() for k in adapters[0][1]}


def torch_aligned(adapters):
    config = adapters[0][0]
    w = 1.0 / len(adapters)
    out = {}
    for group in SHAPES:
        modules = modules_of(config, group)
        es = [t[f"shared.{group}.encoder"].double() for _, t in adapters]
        ds = [t[f"shared.{group}.decoder"].double() for _, t in adapters]
        ms = [[t[f"{m}.m"].double() for m in modules] for _, t in adapters]
        r = ds[0].shape[1]
        ref = es[0] / es[0].norm(dim=1, keepdim=True)
        aligned_e, aligned_m = [], []
        for e, m_list in zip(es, ms):
            cos = ref @ (e / e.norm(dim=1, keepdim=True)).T
            _, perm = linear_sum_assignment(-cos.numpy())
            perm = torch.from_numpy(perm)
            aligned_e.append(e[perm])
            aligned_m.append([m[:, perm] for m in m_list])
        q, rr = torch.linalg.qr(torch.cat(ds, 1))
        avg = [sum(w * rr[:, k * r : (k + 1) * r] @ aligned_m[k][j] for k in range(len(adapters))) for j in range(len(modules))]
        u = torch.linalg.svd(torch.cat(avg, 1), full_matrices=False)[0][:, :r]
        gauge = u.T @ rr[:, :r]
        out[f"shared.{group}.encoder"] = sum(w * e for e in aligned_e).float()
        out[f"shared.{group}.decoder"] = (q @ u @ gauge).float()
        for module, a in zip(modules, avg):
            out[f"{module}.m"] = torch.linalg.solve(gauge, u.T @ a).float()
    return out


def torch_truncate(adapter, rank):
    config, tensors = adapter
    out = {}
    for group in SHAPES:
        modules = modules_of(config, group)
        e = tensors[f"shared.{group}.encoder"].double()
        d = tensors[f"shared.{group}.decoder"].double()
        q, rr = torch.linalg.qr(d)
        products = [rr @ tensors[f"{m}.m"].double() for m in modules]
        importance = e.pow(2).sum(1) * sum(p.pow(2).sum(0) for p in products)
        kept = torch.sort(torch.argsort(-importance, stable=True)[:rank]).values
        selected = [p[:, kept] for p in products]
        u = torch.linalg.svd(torch.cat(selected, 1), full_matrices=False)[0][:, :rank]
        scale = (d.pow(2).sum() / d.shape[1]).sqrt()
        out[f"shared.{group}.encoder"] = e[kept].float()
        out[f"shared.{group}.decoder"] = (q @ u * scale).float()
        for module, s in zip(modules, selected):
            out[f"{module}.m"] = (u.T @ s / scale).float()
    return out


# -- agreement ----------------------------------------------------------------------------------


def product_gap(config, a, b):
    """Largest relative difference of D M_l between two results (the basis-free quantity)."""
    worst = 0.0
    for group in SHAPES:
        for module in modules_of(config, group):
            pa = a[f"shared.{group}.decoder"].double() @ a[f"{module}.m"].double()
            pb = b[f"shared.{group}.decoder"].double() @ b[f"{module}.m"].double()
            worst = max(worst, float((pa - pb).norm() / pb.norm()))
    return worst


def best_of(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the Rust core runs one task per group on all cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    adapters = [random_adapter(seed) for seed in range(args.adapters)]
    config = adapters[0][0]
    rows = []

    cases = [
        ("linear average", lambda: dl.average(adapters, mode="linear").tensors, lambda: torch_linear(adapters)),
        ("aligned average", lambda: dl.average(adapters, mode="aligned").tensors, lambda: torch_aligned(adapters)),
        ("truncate r=16 -> 8", lambda: dl.truncate(adapters[0], rank=8).tensors, lambda: torch_truncate(adapters[0], 8)),
    ]
    for name, ours, reference in cases:
        t_ours, out_ours = best_of(ours, args.repeat)
        t_ref, out_ref = best_of(reference, args.repeat)
        if name.startswith("linear"):
            gap = max(float((out_ours[k] - out_ref[k]).abs().max()) for k in out_ref)
        else:
            gap = product_gap(config, out_ours, out_ref)
        rows.append({"operation": name, "denselora_s": t_ours, "pytorch_s": t_ref, "speedup": t_ref / t_ours, "max_gap": gap})

    print(f"{args.adapters} adapters shaped like SmolLM2-135M, r=16, 5 groups x {LAYERS} layers; torch threads {torch.get_num_threads()}")
    print(f"{'operation':<22} {'denselora (s)':>14} {'pytorch (s)':>12} {'speedup':>8} {'agreement':>10}")
    for row in rows:
        print(f"{row['operation']:<22} {row['denselora_s']:>14.4f} {row['pytorch_s']:>12.4f} {row['speedup']:>7.2f}x {row['max_gap']:>10.1e}")
    result = {
        "adapters": args.adapters,
        "rank": 16,
        "layers": LAYERS,
        "groups": {k: list(v) for k, v in SHAPES.items()},
        "torch_threads": torch.get_num_threads(),
        "repeat": args.repeat,
        "rows": rows,
        "note": "best of --repeat; both sides from in-memory torch tensors to torch tensors; 'agreement' is the largest relative difference of D M_l (max abs difference for linear)",
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "algebra.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {HERE / 'results' / 'algebra.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
