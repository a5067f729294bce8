"""The CUDA check: denselora on one NVIDIA GPU, within a fixed time, on random models (nothing is
downloaded). docs/gpu.md says how to run it on a GPU machine that has no network.

    bash benches/gpu_check.sh                    # on the GPU machine: installs dist/*.whl, then runs this
    python benches/gpu_check.py                  # the same, with denselora already importable
    python benches/gpu_check.py --dry-run        # CPU, tiny shapes, compile skipped: what CI runs

Sections, in the order they run; each gets a share of the time left (--budget seconds from the start
of the process), marks what does not fit as skipped, and is recorded even when another one breaks:

- correctness: every training branch path (reference, efficient, compiled) on the device against a
  float64 CPU reference of the formula: the branch and the gradients of x, E, M and D, in float32
  and under bf16 autocast, for every pair of activations; then, with dropout on, the same seed gives
  the same branch and gradients, and another seed does not;
- train: ``denselora train`` on a tiny random LLaMA (bf16 autocast on CUDA) for 6 steps with a
  checkpoint at step 3, then a new process resumed from that checkpoint: its adapter and losses
  must equal the uninterrupted run's, bit for bit;
- routed: a mixed batch routed to several tenants against each row run alone on its own tenant,
  and its time against the same batch on one adapter (skipped until ``DenseLoRAModel.route``
  exists);
- performance: step time (forward, backward, AdamW; CUDA-synchronised, warm-up excluded, median)
  and peak memory (``torch.cuda.max_memory_allocated``, reset for the measured step) of PEFT LoRA r16
  and of DenseLoRA in the default and the paper configuration on each branch path, on LLaMA-2-7B
  shaped decoder layers and on a 2-layer LLaMA-3-8B shaped model (bf16 weights, bf16 autocast,
  batch 16 x 256).

Writes one JSON (--out) and prints markdown tables. Every item is ``pass``, ``fail``, ``skip`` or
``error``. Exit status 1 when a check fails or a section breaks, 0 otherwise (skips included).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

STARTED = time.monotonic()  # the budget counts from here: the imports below take seconds

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import denselora as dl  # noqa: E402
from denselora.method import paths as branch_paths  # noqa: E402
from denselora.method.model import DenseLoRAModel  # noqa: E402

from _study.steps import LLAMA2_7B, LLAMA3_8B, cuda_step_peak, make_step, make_variant, random_llama, share_base, sync, trainable  # noqa: E402
from _study.tiny import VOCAB, char_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PASS, FAIL, SKIP, ERROR = "pass", "fail", "skip", "error"

# Sections in the order they run, with their shares of the time left when each starts (the
# performance section, last, takes what the others leave).
SHARES = {"correctness": 0.35, "train": 0.15, "routed": 0.08, "performance": 0.42}
SHOWN = ("correctness", "performance", "train", "routed")  # the order of the printed tables
WATCHDOG_GRACE_S = 20.0


# -- time ----------------------------------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = max(0.0, seconds)
        self.end = time.monotonic() + self.seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s

    def skip(self, estimate_s: float) -> dict[str, Any]:
        return {"status": SKIP, "reason": f"budget: {max(0.0, self.left()):.0f} s left of {self.seconds:.0f} s, needs about {estimate_s:.0f} s"}


def section_seconds(total_s: float, name: str, to_run: list[str]) -> float:
    """``name``'s share of the time left, among the sections still to run."""
    left = total_s - (time.monotonic() - STARTED)
    later = to_run[to_run.index(name) :]
    return left * SHARES[name] / sum(SHARES[n] for n in later)


# -- the report ----------------------------------------------------------------------------------


class Report:
    """The JSON document, written whole after each section (and by the watchdog)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**meta, "status": "running", "sections": {}}

    def write(self) -> None:
        for _ in range(5):  # the watchdog thread may catch the main thread adding an entry
            try:
                text = json.dumps(self.data, indent=2, default=str) + "\n"
                break
            except RuntimeError:
                time.sleep(0.05)
        else:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        staging.write_text(text)
        os.replace(staging, self.path)


def counts(items: list[dict[str, Any]]) -> dict[str, int]:
    return {s: sum(1 for item in items if item.get("status") == s) for s in (PASS, FAIL, SKIP, ERROR)}


def section_status(section: dict[str, Any]) -> str:
    c = section["counts"]
    if "error" in section or c[ERROR]:
        return ERROR
    if c[FAIL]:
        return FAIL
    return PASS if c[PASS] else SKIP


def run_section(report: Report, name: str, fn: Callable[..., None], seconds: float, args: argparse.Namespace) -> None:
    section: dict[str, Any] = {"status": "running", "budget_s": round(seconds, 1), "items": []}
    report.data["sections"][name] = section
    report.write()
    print(f"[{time.monotonic() - STARTED:5.0f} s] {name}: up to {seconds:.0f} s", flush=True)
    started = time.monotonic()
    try:
        fn(section, Deadline(seconds), args)
    except Exception as exc:
        section["error"] = f"{type(exc).__name__}: {exc}"
        section["traceback"] = traceback.format_exc(limit=12)
        print(section["traceback"], file=sys.stderr, flush=True)
    section["elapsed_s"] = round(time.monotonic() - started, 1)
    section["counts"] = counts(section["items"])
    section["status"] = section_status(section)
    report.write()


def item_error(exc: BaseException) -> dict[str, Any]:
    return {"status": ERROR, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}


def start_watchdog(report: Report, seconds: float) -> threading.Timer:
    """Ends the process ``seconds`` after its start, whatever it is doing, with the report written:
    a compile or a kernel that hangs cannot take the run past its bound."""

    def fire() -> None:
        report.data["status"] = FAIL
        report.data["interrupted"] = f"stopped by the watchdog {seconds:.0f} s after the start (budget {report.data['budget_s']} s)"
        report.write()
        with contextlib.suppress(Exception):
            print("\n" + tables(report.data), flush=True)
        print(f"\n{report.data['interrupted']}; partial results in {report.path}", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(max(0.0, seconds - (time.monotonic() - STARTED)), fire)
    timer.daemon = True
    timer.start()
    return timer


# -- (a) correctness -----------------------------------------------------------------------------

ACTIVATIONS = ("gelu", "identity", "silu")
PAIRS = list(itertools.product(ACTIVATIONS, repeat=2))
PRECISIONS = ("float32", "bf16-autocast")
# Allowed max|got - ref| / max|ref| per tensor against the float64 reference.
# float32 (IEEE matmuls): unit roundoff u = 6e-8; the longest chain (the gradient of x: five
# products, one of them over 1024 terms) loses about sqrt(1024) u = 2e-6 and at worst a few
# 1024 u = 6e-5. 1e-4 passes that, while a silent downcast fails (TF32: u = 5e-4; bf16: 4e-3).
# bf16 autocast: u = 2**-9 = 2e-3; the inputs, the factors and each product's result are rounded,
# and the gradients chain up to five products, so errors of several u (about 1e-2) are expected.
# 3e-2 passes those, while a wrong factor, scale, activation or mask (errors of order 1) fails.
TOLERANCE = {"float32": 1e-4, "bf16-autocast": 3e-2}
DETERMINISM_PAIRS = [("gelu", "gelu"), ("identity", "identity")]
DETERMINISM_DROPOUT = 0.1
PRESET_PAIRS = [("identity", "identity"), ("gelu", "gelu")]  # the default and the paper's: compiled first

_REFERENCE_ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda t: 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0))),
    "identity": lambda t: t,
    "silu": lambda t: t * torch.sigmoid(t),
}


@dataclass
class BranchShape:
    lead: tuple[int, ...]  # leading dimensions of x (batch, tokens)
    in_features: int
    out_features: int
    r: int


def reference64(x: torch.Tensor, e: torch.Tensor, m: torch.Tensor, d: torch.Tensor, w: torch.Tensor, scale: float, pair: tuple[str, str]) -> dict[str, torch.Tensor]:
    """The branch ``s * act_d(D M act_e(E x))`` and the gradients of ``sum(branch * w)``, in float64
    on the CPU, from the formula (not from the library)."""
    xx, ee, mm, dd = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (x, e, m, d))
    y = scale * _REFERENCE_ACT[pair[1]](_REFERENCE_ACT[pair[0]](xx @ ee.T) @ mm.T @ dd.T)
    (y * w.detach().to("cpu", torch.float64)).sum().backward()
    return {"y": y.detach(), "x": xx.grad, "E": ee.grad, "M": mm.grad, "D": dd.grad}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got64 = got.detach().to("cpu", torch.float64)
    return float((got64 - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


class BranchCase:
    """One adapted linear layer of an activation pair, with fixed random factors (D non-zero, so
    every gradient is), an input and the weights of the loss ``sum(branch * w)``."""

    def __init__(self, pair: tuple[str, str], shape: BranchShape, device: torch.device) -> None:
        self.pair = pair
        holder = nn.ModuleDict({"proj": nn.Linear(shape.in_features, shape.out_features, bias=False)}).to(device)
        config = dl.DenseLoRAConfig(
            r=shape.r, alpha=2 * shape.r, dropout=0.0, target_modules=["proj"], encoder_activation=pair[0], decoder_activation=pair[1]
        )
        self.model = dl.get_denselora_model(holder, config)
        self.layer = self.model.base_model.proj
        g = torch.Generator().manual_seed(1 + PAIRS.index(pair))
        shared = self.layer.shared
        values = (
            torch.randn(shape.r, shape.in_features, generator=g) / math.sqrt(shape.in_features),
            torch.randn(shape.r, shape.r, generator=g) / math.sqrt(shape.r),
            torch.randn(shape.out_features, shape.r, generator=g) / math.sqrt(shape.r),
        )
        with torch.no_grad():
            for param, value in zip((shared.encoder, self.layer.m, shared.decoder), values):
                param.copy_(value)
        self.params = (shared.encoder, self.layer.m, shared.decoder)
        self.x = torch.randn(*shape.lead, shape.in_features, generator=g).to(device)
        self.w = torch.randn(*shape.lead, shape.out_features, generator=g).to(device)
        self.layer.train()
        self._reference: Optional[dict[str, torch.Tensor]] = None

    @property
    def reference(self) -> dict[str, torch.Tensor]:
        if self._reference is None:
            self._reference = reference64(self.x, *self.params, self.w, self.layer.scaling, self.pair)
        return self._reference

    def run(self, path: str, autocast: bool, seed: Optional[int] = None) -> dict[str, torch.Tensor]:
        """The branch through ``layer.branch`` on ``path`` and the gradients of ``sum(branch * w)``."""
        self.model.set_branch_path(path)
        for param in self.params:
            param.grad = None
        if seed is not None:
            torch.manual_seed(seed)
        x = self.x.clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = self.layer.branch(x)
        (y.float() * self.w).sum().backward()
        out = {"y": y.detach(), "x": x.grad}
        out.update({name: param.grad for name, param in zip("EMD", self.params)})
        return out


def check_against_reference(case: BranchCase, path: str, precision: str) -> dict[str, Any]:
    autocast = precision == "bf16-autocast"
    got = case.run(path, autocast)
    ref = case.reference
    errors = {name: relative_error(got[name], ref[name]) for name in ref}
    expected_y = torch.bfloat16 if autocast else torch.float32
    dtypes_ok = got["y"].dtype == expected_y and all(got[n].dtype == torch.float32 for n in "xEMD")
    finite = all(bool(torch.isfinite(t).all()) for t in got.values())
    ok = dtypes_ok and finite and max(errors.values()) <= TOLERANCE[precision]
    item = {
        "status": PASS if ok else FAIL,
        "errors": {k: float(f"{v:.3g}") for k, v in errors.items()},
        "tolerance": TOLERANCE[precision],
    }
    if not dtypes_ok:
        item["dtypes"] = {k: str(v.dtype).replace("torch.", "") for k, v in got.items()}
    if not finite:
        item["finite"] = False
    return item


def check_determinism(case: BranchCase, path: str) -> dict[str, Any]:
    """Dropout on: the same seed gives the same branch and gradients bit for bit; another seed, or
    dropout off, gives a different branch (so the check can fail)."""
    case.layer.dropout = DETERMINISM_DROPOUT
    try:
        first, again, other = (case.run(path, autocast=False, seed=s) for s in (1234, 1234, 4321))
    finally:
        case.layer.dropout = 0.0
    off = case.run(path, autocast=False)
    same = {name: bool(torch.equal(first[name], again[name])) for name in first}
    acts = not torch.equal(first["y"], other["y"]) and not torch.equal(first["y"], off["y"])
    return {"status": PASS if all(same.values()) and acts else FAIL, "bitwise_equal": same, "dropout_acts": acts}


def compile_fell_back() -> bool:
    # The compiled path falls back to the efficient one for the whole process when torch.compile
    # fails (with a RuntimeWarning); a case that ran so did not test the compiled path.
    return bool(getattr(branch_paths, "_compile_failed", False))


def allow_recompiles(limit: int = 64) -> None:
    """Each activation pair, dtype and dropout setting is one more compiled graph of the branch;
    dynamo's default limit (8 per function) would quietly run the rest uncompiled."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def section_correctness(section: dict[str, Any], deadline: Deadline, args: argparse.Namespace) -> None:
    device = args.device
    shape = BranchShape((2, 5), 24, 20, 4) if args.dry_run else BranchShape((4, 64), 1024, 768, 16)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # float32 means IEEE float32 here (TF32 would fail)
    section.update(
        shape={"x": [*shape.lead, shape.in_features], "out_features": shape.out_features, "r": shape.r},
        tolerance=TOLERANCE,
        reference="float64 on the CPU, from the formula; the branch as DenseLoRALayer.branch computes it, in training mode, dropout 0",
    )
    cases: dict[tuple[str, str], BranchCase] = {}

    def case_of(pair: tuple[str, str]) -> BranchCase:
        if pair not in cases:
            cases[pair] = BranchCase(pair, shape, device)
        return cases[pair]

    # Every compiled case compiles a graph (tens of seconds): the library's two presets first, then
    # dropout, then the other pairs under autocast (how CUDA trains), then in float32.
    others = [p for p in PAIRS if p not in PRESET_PAIRS]
    plan: list[tuple[str, str, tuple[str, str], str]] = []
    for path in ("reference", "efficient"):
        plan += [("reference", path, pair, precision) for precision in PRECISIONS for pair in PAIRS]
        plan += [("determinism", path, pair, "float32") for pair in DETERMINISM_PAIRS]
    plan += [("reference", "compiled", pair, precision) for pair in PRESET_PAIRS for precision in PRECISIONS]
    plan += [("determinism", "compiled", pair, "float32") for pair in DETERMINISM_PAIRS]
    plan += [("reference", "compiled", pair, precision) for precision in reversed(PRECISIONS) for pair in others]

    compile_s = 90.0 if device.type == "cpu" else 25.0  # one graph's forward and backward, cold
    try:
        for kind, path, pair, precision in plan:
            item: dict[str, Any] = {"check": kind, "path": path, "activation": list(pair), "precision": precision}
            section["items"].append(item)
            estimate = compile_s if path == "compiled" else 2.0
            if path == "compiled" and not args.compile:
                item.update(status=SKIP, reason="torch.compile skipped in --dry-run (pass --compile)")
            elif not deadline.allows(estimate):
                item.update(deadline.skip(estimate))
            else:
                try:
                    case = case_of(pair)
                    item.update(check_against_reference(case, path, precision) if kind == "reference" else check_determinism(case, path))
                    if path == "compiled" and compile_fell_back():
                        item.update(status=FAIL, reason="torch.compile failed, so the efficient path ran instead (see the warning above)")
                except Exception as exc:
                    item.update(item_error(exc))
            if item["status"] in (FAIL, ERROR):
                print(f"  {kind} {path} {pair} {precision}: {item['status']} {item.get('errors', item.get('error', ''))}", flush=True)
    finally:
        torch.set_float32_matmul_precision(previous)


# -- (c) the command-line trainer: checkpoint and exact resume -------------------------------------


def write_tiny_model(folder: Path) -> Path:
    """A 2-layer random LLaMA with the character tokenizer, saved as a transformers folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    # Eager attention: SDPA's memory-efficient backward adds with atomics on CUDA, so two identical
    # runs differ in the last bits; the comparison here is bit for bit. (transformers does not save
    # the choice, but reads it from config.json.)
    config_file = folder / "config.json"
    saved = json.loads(config_file.read_text())
    saved["attn_implementation"] = "eager"
    config_file.write_text(json.dumps(saved, indent=2))
    return folder


def write_task(path: Path, n: int = 40) -> Path:
    """A BIG-bench style multiple-choice task: is the number even or odd."""
    examples = [{"input": f"{i} is?", "target_scores": {"even": int(i % 2 == 0), "odd": int(i % 2 == 1)}} for i in range(n)]
    path.write_text(json.dumps({"name": "parity", "examples": examples}))
    return path


def run_train_cli(arguments: list[str], deadline: Deadline, env: dict[str, str]) -> dict[str, Any]:
    started = time.monotonic()
    command = [sys.executable, "-m", "denselora.cli", "train", *arguments]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=max(1.0, deadline.left()))
    except subprocess.TimeoutExpired:
        return {"status": ERROR, "error": f"did not finish within the section's {deadline.seconds:.0f} s", "command": command[2:]}
    result = {"returncode": done.returncode, "seconds": round(time.monotonic() - started, 1), "command": command[2:]}
    if done.returncode != 0:
        result.update(status=FAIL, stderr=done.stderr[-3000:], stdout=done.stdout[-1000:])
    return result


def history(output: Path) -> list[tuple[int, float, float]]:
    log = json.loads((output / "train_log.json").read_text())
    return [(h["step"], h["loss"], h["lr"]) for h in log["history"]]


def section_train(section: dict[str, Any], deadline: Deadline, args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    device = args.device
    precision = "bf16" if device.type == "cuda" else "fp32"
    steps, save_at = 6, 3
    section.update(steps=steps, checkpoint_step=save_at, precision=precision, device=device.type, attention="eager")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    with tempfile.TemporaryDirectory(prefix="denselora-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = write_tiny_model(tmp / "model")
        task = write_task(tmp / "task.json")
        common = [
            "--model", str(model_dir), "--data", str(task), "--device", device.type, "--precision", precision,
            "--steps", str(steps), "--save-every", str(save_at), "--micro-batch-size", "8", "--lr", "1e-2", "--r", "8",
            "--seed", "0", "--test-size", "8", "--val-size", "4", "--no-progress",
        ]  # fmt: skip
        if device.type == "cpu":
            common += ["--threads", str(torch.get_num_threads())]
        full_dir, resumed_dir = tmp / "full", tmp / "resumed"
        checkpoint = full_dir / "checkpoints" / f"step-{save_at}"

        full = {"check": f"train {steps} steps with a checkpoint at step {save_at}", **run_train_cli([*common, "--output", str(full_dir)], deadline, env)}
        section["items"].append(full)
        if "status" not in full:
            final = load_file(full_dir / "final" / "adapter.safetensors")
            at_checkpoint = load_file(checkpoint / "adapter" / "adapter.safetensors")
            losses = [loss for _, loss, _ in history(full_dir)]
            moved = any(not torch.equal(final[k], at_checkpoint[k]) for k in final)
            finite = all(math.isfinite(v) for v in losses) and all(bool(torch.isfinite(t).all()) for t in final.values())
            full.update(status=PASS if moved and finite else FAIL, losses=losses, adapter_moved_after_checkpoint=moved, finite=finite)

        resumed: dict[str, Any] = {"check": f"resume from step {save_at} in a new process: adapter and losses equal the uninterrupted run's"}
        section["items"].append(resumed)
        if full["status"] != PASS:
            resumed.update(status=SKIP, reason="the uninterrupted run did not pass")
            return
        resumed.update(run_train_cli([*common, "--output", str(resumed_dir), "--resume", str(checkpoint)], deadline, env))
        if "status" in resumed:
            return
        expected = load_file(full_dir / "final" / "adapter.safetensors")
        got = load_file(resumed_dir / "final" / "adapter.safetensors")
        unequal = {k: float((got[k].double() - v.double()).abs().max()) for k, v in expected.items() if k not in got or not torch.equal(got[k], v)}
        same_names = set(got) == set(expected)
        same_history = history(resumed_dir) == history(full_dir)
        resumed.update(
            status=PASS if same_names and not unequal and same_history else FAIL,
            tensors=len(expected),
            unequal_tensors_max_abs_diff=unequal,
            same_tensor_names=same_names,
            same_losses=same_history,
        )


# -- (d) the routed multi-tenant path ------------------------------------------------------------


def routed_missing() -> Optional[str]:
    """Why the routed section cannot run yet, or None when denselora has the routed path."""
    absent = [name for name in ("route", "load_adapter") if not hasattr(DenseLoRAModel, name)]
    if absent:
        return f"denselora has no routed multi-tenant path yet (DenseLoRAModel lacks {', '.join(absent)}); this section runs once it does"
    return None


def randomize_(tensors: list[torch.Tensor], seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g) * std)


def section_routed(section: dict[str, Any], deadline: Deadline, args: argparse.Namespace) -> None:
    why = routed_missing()
    if why is not None:
        section["message"] = why
        section["items"].append({"check": "routed mixed batch", "status": SKIP, "reason": why})
        return
    device = args.device
    tenants, batch, seq, reps = (2, 3, 8, 2) if args.dry_run else (4, 16, 128, 10)
    dims = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    if not args.dry_run:
        dims.update(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16)
    base = random_llama(2, device=device, **dims)
    names: list[Optional[str]] = [f"t{i % tenants}" for i in range(batch - 1)] + [None]  # the last row: the base model
    tokens = torch.randint(0, dims["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    section.update(tenants=tenants, rows=names, tokens=[batch, seq], model=dims)
    try:
        with tempfile.TemporaryDirectory(prefix="denselora-gpu-check-") as tmp_name:
            tmp = Path(tmp_name)
            basis = dl.get_denselora_model(share_base(base), dl.DenseLoRAConfig(r=8, activation="gelu", dropout=0.0))
            randomize_(list(basis.adapter_state().values()), seed=1)
            basis.save_pretrained(tmp / "basis")
            for t in range(tenants):
                tenant = DenseLoRAModel.from_pretrained(share_base(base), tmp / "basis", freeze_shared=True, is_trainable=True)
                randomize_([layer.m for _, layer in tenant.adapter_layers()], seed=10 + t)
                tenant.save_pretrained(tmp / f"t{t}")
            served = DenseLoRAModel.from_pretrained(share_base(base), tmp / "basis")
            for t in range(tenants):
                served.load_adapter(tmp / f"t{t}", adapter_name=f"t{t}", basis=tmp / "basis")
            singles = {f"t{t}": DenseLoRAModel.from_pretrained(share_base(base), tmp / f"t{t}", basis=tmp / "basis") for t in range(tenants)}
    except (TypeError, AttributeError) as exc:
        raise RuntimeError(f"the routed API differs from the one this section expects ({exc}); update section_routed") from exc

    with torch.no_grad():
        with served.route(names):
            routed = served(input_ids=tokens).logits.float()
        errors = []
        for i, name in enumerate(names):
            alone = (base if name is None else singles[name])(input_ids=tokens[i : i + 1]).logits.float()
            errors.append(float((routed[i : i + 1] - alone).abs().max() / alone.abs().max()))
    section["items"].append(
        {"check": "routed mixed batch equals each row alone on its own tenant (float32)", "status": PASS if max(errors) <= 1e-4 else FAIL, "errors": errors, "tolerance": 1e-4}
    )

    def timed(fn: Callable[[], Any]) -> list[float]:
        times = []
        with torch.no_grad():
            fn()
            for _ in range(reps):
                sync(device)
                started = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - started)
        return times

    if not deadline.allows(10.0):
        section["items"].append({"check": "routed batch time vs one adapter", **deadline.skip(10.0)})
        return

    def routed_forward() -> Any:
        with served.route(names):
            return served(input_ids=tokens)

    routed_s = statistics.median(timed(routed_forward))
    single_s = statistics.median(timed(lambda: singles["t0"](input_ids=tokens)))
    section["items"].append(
        {"check": "routed batch time vs one adapter", "status": PASS, "routed_ms": routed_s * 1e3, "one_adapter_ms": single_s * 1e3, "ratio": routed_s / single_s}
    )


# -- (b) performance -----------------------------------------------------------------------------

VARIANTS = ("peft-lora", "default-efficient", "default-reference", "paper-efficient", "paper-reference", "default-compiled", "paper-compiled")


def perf_models(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    if args.dry_run:
        return [
            ("LLaMA-2-7B-shaped layers, tiny (dry run)", dict(layers=2, vocab_size=512, hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4)),
            ("LLaMA-3-8B-shaped, tiny (dry run)", dict(layers=2, vocab_size=1024, hidden_size=64, intermediate_size=224, num_attention_heads=8, num_key_value_heads=2)),
        ]
    return [
        (f"LLaMA-2-7B-shaped, {args.layers_7b} layers (vocabulary 512)", dict(layers=args.layers_7b, vocab_size=512, **LLAMA2_7B)),
        ("LLaMA-3-8B-shaped, 2 layers", dict(layers=2, **LLAMA3_8B)),
    ]


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_variant(base: nn.Module, variant: str, tokens: torch.Tensor, args: argparse.Namespace, deadline: Deadline) -> dict[str, Any]:
    device = tokens.device
    model = make_variant(base, variant, r=16, dropout=0.05)
    try:
        step = make_step(model, tokens, autocast=True)
        started = time.perf_counter()
        for _ in range(args.warmup):  # the optimizer's state, the allocator, compiling
            step()
        sync(device)
        warmup_s = time.perf_counter() - started
        times: list[float] = []
        for _ in range(args.reps):
            if len(times) >= 3 and not deadline.allows(2 * statistics.median(times)):
                break
            sync(device)
            started = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - started)
        row: dict[str, Any] = {
            "status": PASS,
            "trainable_params": sum(p.numel() for p in trainable(model)),
            "warmup_s": round(warmup_s, 2),
            "reps": len(times),
            "step_ms_median": statistics.median(times) * 1e3,
            "step_ms_all": [round(t * 1e3, 3) for t in times],
        }
        if device.type == "cuda":
            peak, above = cuda_step_peak(step, device)
            row.update(peak_mb=peak / 2**20, step_peak_mb=above / 2**20)
        return row
    finally:
        del model
        release(device)


def section_performance(section: dict[str, Any], deadline: Deadline, args: argparse.Namespace) -> None:
    device = args.device
    batch, seq = (2, 16) if args.dry_run else (args.batch, args.seq)
    section.update(
        tokens=[batch, seq],
        r=16,
        alpha=32,
        dropout=0.05,
        targets=list(dl.DEFAULT_TARGET_MODULES),
        base_dtype="bfloat16",
        autocast="bfloat16",
        warmup=args.warmup,
        auto_path=branch_paths.tensor_path("auto", device, needs_grad=True),
        step="forward, backward, AdamW step, zero_grad; CUDA-synchronised wall time, warm-up excluded; median",
        memory="torch.cuda.max_memory_allocated during one step after a reset (peak_mb), and above the memory allocated before it (step_peak_mb)"
        if device.type == "cuda"
        else "not measured on the CPU",
        models=[],
    )
    models = perf_models(args)
    for index, (name, spec) in enumerate(models):
        model_deadline = Deadline(deadline.left() / (len(models) - index))
        entry: dict[str, Any] = {"model": name, "spec": spec, "rows": []}
        section["models"].append(entry)
        print(f"  {name}", flush=True)
        try:
            spec = dict(spec)
            base = random_llama(spec.pop("layers"), device=device, dtype=torch.bfloat16, **spec)
            tokens = torch.randint(0, spec["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
        except Exception as exc:
            entry["rows"].append({"variant": "base model", **item_error(exc)})
            section["items"].append(entry["rows"][-1])
            continue
        last_step_s = 5.0 if device.type == "cuda" else 2.0
        for variant in VARIANTS:
            row: dict[str, Any] = {"variant": variant}
            estimate = (args.warmup + 4) * last_step_s + (30.0 if variant.endswith("compiled") else 0.0)
            if variant.endswith("compiled") and not args.compile:
                row.update(status=SKIP, reason="torch.compile skipped in --dry-run (pass --compile)")
            elif not model_deadline.allows(estimate):
                row.update(model_deadline.skip(estimate))
            else:
                try:
                    row.update(measure_variant(base, variant, tokens, args, model_deadline))
                    last_step_s = row["step_ms_median"] / 1e3
                    if variant.endswith("compiled") and compile_fell_back():
                        row.update(status=FAIL, reason="torch.compile failed, so the efficient path ran instead")
                except Exception as exc:
                    row.update(item_error(exc))
                    release(device)
            entry["rows"].append(row)
            section["items"].append(row)
            shown = f"{row['step_ms_median']:.1f} ms" if "step_ms_median" in row else row.get("reason", row.get("error", ""))
            print(f"    {variant}: {row['status']} {shown}", flush=True)
        add_ratios(entry["rows"])
        del base, tokens
        release(device)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    lora = next((r for r in rows if r["variant"] == "peft-lora" and r["status"] == PASS), None)
    if lora is None:
        return
    for row in rows:
        if row["status"] != PASS:
            continue
        row["step_time_vs_lora"] = row["step_ms_median"] / lora["step_ms_median"]
        for key in ("peak_mb", "step_peak_mb"):
            if key in row and lora.get(key):
                row[f"{key.replace('_mb', '')}_vs_lora"] = row[key] / lora[key]


# -- tables --------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def tables(data: dict[str, Any]) -> str:
    sections = data["sections"]
    out = [f"## GPU check: {data['device_name']} ({data['mode']}), torch {data['torch']}, denselora {data['denselora']}", ""]
    out += ["| section | status | pass | fail | skip | error | seconds (budget) |", "|---|---|---|---|---|---|---|"]
    for name in SHOWN:
        s = sections.get(name)
        if s is None:
            out.append(f"| {name} | not run | | | | | |")
            continue
        c = s.get("counts", counts(s.get("items", [])))
        out.append(f"| {name} | {s['status']} | {c[PASS]} | {c[FAIL]} | {c[SKIP]} | {c[ERROR]} | {s.get('elapsed_s', '-')} ({s['budget_s']}) |")
    if "interrupted" in data:
        out += ["", f"**{data['interrupted']}**"]

    s = sections.get("correctness")
    if s and s.get("items"):
        out += ["", "### Correctness against float64 (max |got - ref| / max |ref| over the branch and the gradients of x, E, M, D)", ""]
        out += ["| path | check | precision | pass / run / planned | worst error | tolerance |", "|---|---|---|---|---|---|"]
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for item in s["items"]:
            groups.setdefault((item["path"], item["check"], item["precision"]), []).append(item)
        for (path, check, precision), items in groups.items():
            ran = [i for i in items if i["status"] != SKIP]
            passed = sum(i["status"] == PASS for i in items)
            worst = max((max(i["errors"].values()) for i in ran if "errors" in i), default=None)
            tol = TOLERANCE[precision] if check == "reference" else "bitwise"
            out.append(f"| {path} | {check} | {precision} | {passed} / {len(ran)} / {len(items)} | {fmt(worst)} | {tol} |")
        for item in s["items"]:
            if item["status"] in (FAIL, ERROR):
                out.append(f"\n- {item['status']}: {item['path']} {item['check']} {item['activation']} {item['precision']}: {item.get('errors', '')}{item.get('reason', '')}{item.get('error', '')}")

    s = sections.get("performance")
    if s:
        for entry in s.get("models", []):
            out += ["", f"### {entry['model']}: batch {s['tokens'][0]} x {s['tokens'][1]}, bf16 weights and autocast, r 16 (median step; x LoRA = ratio to PEFT LoRA)", ""]
            out += ["| variant | trainable | step ms | x LoRA | peak MB | x LoRA | step peak MB | x LoRA | status |", "|---|---|---|---|---|---|---|---|---|"]
            for r in entry["rows"]:
                out.append(
                    f"| {r['variant']} | {fmt(r.get('trainable_params'), ',d')} | {fmt(r.get('step_ms_median'), '.1f')} | {fmt(r.get('step_time_vs_lora'), '.2f')} "
                    f"| {fmt(r.get('peak_mb'), '.0f')} | {fmt(r.get('peak_vs_lora'), '.2f')} | {fmt(r.get('step_peak_mb'), '.0f')} | {fmt(r.get('step_peak_vs_lora'), '.2f')} "
                    f"| {r['status']}{(': ' + r.get('reason', r.get('error', ''))) if r['status'] != PASS else ''} |"
                )
        if s.get("auto_path"):
            out.append(f"\nThe default branch path (`auto`) trains on `{s['auto_path']}` on this device.")

    for name in ("train", "routed"):
        s = sections.get(name)
        if s and s.get("items"):
            out += ["", f"### {name}", "", "| check | status | detail |", "|---|---|---|"]
            for item in s["items"]:
                detail = item.get("reason") or item.get("error") or ", ".join(
                    f"{k} {v}" for k, v in item.items() if k in ("seconds", "same_losses", "unequal_tensors_max_abs_diff", "errors", "ratio", "routed_ms", "one_adapter_ms")
                )
                out.append(f"| {item.get('check', '')} | {item['status']} | {detail} |")
    for name in SHOWN:
        s = sections.get(name)
        if s and "error" in s:
            out.append(f"\n**{name} broke**: {s['error']}")
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------


def versions() -> dict[str, Any]:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "denselora": dl.__version__,
        "denselora_from": str(Path(dl.__file__).resolve().parent),
        "python": platform.python_version(),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few iterations, compile skipped unless --compile: exercises every code path (CI)")
    parser.add_argument("--compile", action="store_true", help="with --dry-run: run the torch.compile cases too (minutes on a CPU)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run, from the start of the process (default: 420)")
    parser.add_argument("--out", default=None, help="the JSON (default: benches/results/gpu_check.json, or gpu_check_dry_run.json with --dry-run)")
    parser.add_argument("--sections", default=",".join(SHARES), help=f"comma-separated, of {', '.join(SHARES)} (default: all)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per variant (default: 10, 2 with --dry-run)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default: 3, 1 with --dry-run)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers-7b", type=int, default=8, help="decoder layers of the LLaMA-2-7B-shaped model (default: 8)")
    args = parser.parse_args(argv)

    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SHARES))
    if unknown:
        parser.error(f"unknown sections {unknown}; expected some of {list(SHARES)}")
    to_run = [s for s in SHARES if s in wanted]
    if args.dry_run:
        args.device = torch.device("cpu")
        # Tiny shapes: one thread is fastest, and two threads that wait on each other at every small
        # op on a machine shared with other work make each step many times slower.
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: this check is for a GPU machine (use --dry-run to exercise it on a CPU)")
    else:
        args.device = torch.device("cuda", torch.cuda.current_device())
        args.compile = True
    args.reps = args.reps or (2 if args.dry_run else 10)
    args.warmup = args.warmup or (1 if args.dry_run else 3)
    out = Path(args.out) if args.out else ROOT / "benches" / "results" / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")

    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else f"CPU ({platform.machine()})"
    report = Report(
        out,
        {
            "check": "benches/gpu_check.py",
            "mode": "dry-run" if args.dry_run else "gpu",
            "device": str(args.device),
            "device_name": device_name,
            **versions(),
            "budget_s": args.budget,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
    )
    if args.compile:
        allow_recompiles()
    watchdog = start_watchdog(report, args.budget + WATCHDOG_GRACE_S)
    functions = {"correctness": section_correctness, "train": section_train, "routed": section_routed, "performance": section_performance}
    try:
        for name in to_run:
            run_section(report, name, functions[name], section_seconds(args.budget, name, to_run), args)
    finally:
        watchdog.cancel()

    statuses = [report.data["sections"][name]["status"] for name in to_run]
    report.data["status"] = FAIL if any(s in (FAIL, ERROR) for s in statuses) else PASS
    report.data["elapsed_s"] = round(time.monotonic() - STARTED, 1)
    report.write()
    print("\n" + tables(report.data))
    print(f"\n{report.data['status']} in {report.data['elapsed_s']} s; wrote {out}")
    return 0 if report.data["status"] == PASS else 1


if __name__ == "__main__":
    sys.exit(main())
