"""Training step time and memory: PEFT LoRA vs DenseLoRA (plain autograd path) vs DenseLoRA
(efficient path), in the library's default and in the paper's configuration, side by side in one
process.

Two models: SmolLM2-135M (`denselora.pretrained.load_model()`) and a stack of LLaMA-7B-shaped decoder
layers built from a config (hidden 4096, intermediate 11008, 32 heads; random weights, small
vocabulary). Targets q, k, v, up, down; r = 16, alpha = 32, dropout 0.05 for every method. The
variants share the frozen base weights; repetitions are interleaved (the order rotates each round)
and medians are reported, with ratios to LoRA.

One step is forward, backward, AdamW step and zero_grad. Memory, measured in separate steps:
- saved activations: bytes of the distinct tensors autograd keeps for backward (seen through
  ``torch.autograd.graph.saved_tensors_hooks``), parameters left out: exact and device-independent;
- peak: on CUDA ``torch.cuda.max_memory_allocated`` above the memory allocated before the step; on
  the CPU the peak resident-set size above the one before the step, sampled every 0.2 ms, with
  glibc's mmap threshold fixed at 64 KiB so that freed tensors go back to the system at once.

    python benches/bench_train.py                        # CPU, both models (about 5-8 minutes)
    python benches/bench_train.py --device cuda --dtype bfloat16 --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from _study.steps import LLAMA2_7B, cuda_step_peak, make_step, make_variant, random_llama, sync, trainable  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# DenseLoRA in the library's default configuration (identity on both sides, rsLoRA scaling) and in
# the paper's (GELU on both sides, s = alpha / r), each on the plain and the efficient path.
VARIANTS = ("peft-lora", "default-plain", "default-efficient", "paper-plain", "paper-efficient")


def fix_malloc_threshold() -> bool:
    """Serve every allocation of 64 KiB or more with mmap (returned to the system when freed), so
    that the resident-set size follows the live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Hand memory that freed tensors left in malloc's heap back to the system."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Peak RSS above the value at entry, sampled by a thread."""

    def __enter__(self) -> RssPeak:
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0002)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def build_7b_stack(layers: int) -> torch.nn.Module:
    return random_llama(layers, vocab_size=512, **LLAMA2_7B)


def variant_model(base: torch.nn.Module, variant: str, r: int) -> torch.nn.Module:
    # "plain": the reference ops
    return make_variant(base, variant.replace("-plain", "-reference"), r=r)


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor, autocast: bool) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=tokens, labels=tokens).loss
    total = sum(storages.values())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_step_peak(step, device)[1]
    with RssPeak() as peak:
        step()
    return peak.delta


def bench_model(name: str, base: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    base.to(device=device, dtype=getattr(torch, args.dtype))
    vocab = base.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    models = {v: variant_model(base, v, args.r) for v in VARIANTS}
    steps = {v: make_step(m, tokens, args.autocast) for v, m in models.items()}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: dict[str, list[int]] = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up: optimizer state, allocator, first-call costs
        steps[v]()
    order = list(VARIANTS)
    for rep in range(args.reps):
        order = order[1:] + order[:1]
        for v in order:
            sync(device)
            start = time.perf_counter()
            steps[v]()
            sync(device)
            times[v].append(time.perf_counter() - start)
        print(f"  {name} round {rep + 1}/{args.reps}: " + ", ".join(f"{v} {times[v][-1]:.3f}s" for v in VARIANTS), flush=True)
    if device.type == "cpu":
        args.malloc_fixed = fix_malloc_threshold()  # after the timed steps: mmap for every tensor is slower
    for _ in range(args.memory_reps):
        for v in VARIANTS:
            release_free_memory()
            peaks[v].append(peak_bytes(steps[v], device))
    rows = []
    lora_time = statistics.median(times["peft-lora"])
    lora_peak = statistics.median(peaks["peft-lora"])
    saved = {v: saved_activation_bytes(models[v], tokens, args.autocast) for v in VARIANTS}
    for v in VARIANTS:
        t = statistics.median(times[v])
        p = statistics.median(peaks[v])
        rows.append(
            {
                "variant": v,
                "trainable_params": sum(x.numel() for x in trainable(models[v])),
                "step_s_median": t,
                "step_s_all": times[v],
                "step_time_vs_lora": t / lora_time,
                "saved_activations_mb": saved[v] / 2**20,
                "saved_vs_lora": saved[v] / saved["peft-lora"],
                "peak_mb_median": p / 2**20,
                "peak_mb_all": [x / 2**20 for x in peaks[v]],
                "peak_vs_lora": p / lora_peak if lora_peak > 0 else None,
            }
        )
    del models, steps
    return {"model": name, "tokens": [args.batch, args.seq], "rows": rows}


def print_table(result: dict[str, Any], peak_name: str) -> None:
    print(f"\n{result['model']}  (batch x seq = {result['tokens'][0]} x {result['tokens'][1]})")
    header = f"{'variant':<22}{'trainable':>12}{'step s':>9}{'x LoRA':>8}{'saved MB':>10}{'x LoRA':>8}{peak_name:>13}{'x LoRA':>8}"
    print(header)
    for row in result["rows"]:
        ratio = row["peak_vs_lora"]
        print(
            f"{row['variant']:<22}{row['trainable_params']:>12,d}{row['step_s_median']:>9.3f}{row['step_time_vs_lora']:>8.2f}"
            f"{row['saved_activations_mb']:>10.1f}{row['saved_vs_lora']:>8.2f}{row['peak_mb_median']:>13.1f}"
            f"{(f'{ratio:.2f}' if ratio is not None else '-'):>8}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="base weights")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast around the forward")
    # One thread: on a machine shared with other work, two threads that wait on each other at every
    # small op make each step many times slower and the timings meaningless.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seq-7b", type=int, default=32, help="sequence length for the 7B-shaped stack (batch 1)")
    parser.add_argument("--layers-7b", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--memory-reps", type=int, default=2)
    parser.add_argument("--models", default="smollm2,llama7b-stack")
    parser.add_argument("--out", default=str(ROOT / "benches" / "results" / "train.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak_name = "peak MB" if device.type == "cuda" else "peak RSS MB"
    results = []
    for name in args.models.split(","):
        if name == "smollm2":
            from denselora.pretrained import load_model

            base, _ = load_model()
            results.append(bench_model("SmolLM2-135M", base, args, device))
        elif name == "llama7b-stack":
            saved = (args.batch, args.seq)
            args.batch, args.seq = 1, args.seq_7b
            base = build_7b_stack(args.layers_7b)
            results.append(bench_model(f"LLaMA-7B-shaped, {args.layers_7b} layers", base, args, device))
            args.batch, args.seq = saved
        else:
            parser.error(f"unknown model {name!r}")
        del base
        print_table(results[-1], peak_name)

    payload = {
        "benchmark": "train step: PEFT LoRA vs DenseLoRA plain vs efficient path, default and paper configs",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": args.threads,
        "dtype": args.dtype,
        "autocast": args.autocast,
        "r": args.r,
        "targets": TARGETS,
        "reps": args.reps,
        "peak_memory": "torch.cuda.max_memory_allocated above the step's start" if device.type == "cuda" else "peak RSS above the step's start (sampled every 0.2 ms, mmap threshold 64 KiB)" if getattr(args, "malloc_fixed", False) else "peak RSS above the step's start (sampled)",
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
