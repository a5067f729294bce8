"""Accuracy against trainable parameters on a real model: SmolLM2-135M-Instruct, targets
q,k,v,up,down, multiple-choice BIG-bench tasks (train/validation/test split fixed by a seed; test
examples never trained on). The methods (``METHODS``): zero-shot, PEFT LoRA r = 1..16, PEFT VeRA,
DenseLoRA r = 8..64 in the library's default configuration and in the paper's; same steps, learning
rate per method family (``--no-tune``) or chosen on validation accuracy from a small grid, several
seeds.

Each run is its own subprocess (clean peak memory) and writes its JSON under
``benches/results/replicate/runs/``; rerunning skips finished runs, so the study can be stopped and
resumed. The summary goes to ``benches/results/<name>.json`` and ``.md``, and the plot of accuracy
against trainable parameters to ``benches/results/<name>.png``.

The curve of docs/method_study.md (hours on 2 CPU cores; minutes on one GPU):

    python benches/replicate.py --name curve --data-root benches/data \
        --tasks hyperbaton,logical_fallacy_detection,epistemic_reasoning \
        --methods zero-shot,lora-r1,lora-r4,lora-r16,vera-r256,denselora-r16-default,denselora-r64-default,denselora-r16 \
        --steps 120 --test-size 200 --val-size 100 --no-tune --fractions 1.0 --seeds 0,1,2 --threads 1
    python benches/replicate.py --name curve ... --report     # the same flags: table, JSON and plot only

The earlier 30-step protocol on social_iqa and strategyqa (``--name replicate``, the default):

    python benches/replicate.py --tasks social_iqa --steps 30 --test-size 200 --val-size 100 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = RESULTS / "replicate" / "runs"
# Each trained adapter (not committed: benches/results/replicate/adapters/ is ignored), for the
# tenants' bases and the subspace analysis.
ADAPTERS = RESULTS / "replicate" / "adapters"
# Steps at which a run measures, on a fixed probe batch, each adapted layer's update of its output
# (size relative to the base output, effective rank): the diagnosis past step 0.
DIAGNOSE_AT = (20, 50, 100)

# The curve of accuracy against trainable parameters: LoRA across ranks (r=1 trains about as many
# numbers as DenseLoRA r=16), PEFT's VeRA, and DenseLoRA across ranks in the library's default
# configuration and the paper's (GELU, alpha/r, Kaiming M).
METHODS: dict[str, dict[str, Any]] = {
    "zero-shot": {"method": "none", "r": 0, "lrs": "none"},
    **{f"lora-r{r}": {"method": "lora", "r": r, "lrs": "lora"} for r in (1, 2, 4, 8, 16)},
    "vera-r256": {"method": "vera", "r": 256, "lrs": "vera"},
    **{f"denselora-r{r}-default": {"method": "denselora", "r": r, "preset": "default", "lrs": "default"} for r in (8, 16, 32, 64)},
    **{f"denselora-r{r}": {"method": "denselora", "r": r, "preset": "paper", "lrs": "paper"} for r in (8, 16, 32, 64)},
    # The paper's configuration with one of its differences from the default undone at a time
    # (which of them carries its gain): its branch made linear, its M initialised orthogonal, its
    # scale alpha/sqrt(r). And the default with the paper's Kaiming M (init alone).
    "denselora-r16-identity": {"method": "denselora", "r": 16, "preset": "paper", "activation": "identity", "lrs": "paper"},
    "denselora-r16-orthogonal": {"method": "denselora", "r": 16, "preset": "paper", "m_init": "orthogonal", "lrs": "paper"},
    "denselora-r16-rslora": {"method": "denselora", "r": 16, "preset": "paper", "scaling": "rslora", "lrs": "default"},
    "denselora-r16-default-kaiming": {"method": "denselora", "r": 16, "preset": "default", "m_init": "kaiming", "lrs": "default"},
    # The paper's configuration linearised around zero: GELU has slope 1/2 there, so two of them
    # make s * gelu(D M gelu(E x)) about (s / 4) D M E x; a linear branch with alpha / 4.
    "denselora-r16-linearized": {"method": "denselora", "r": 16, "preset": "paper", "activation": "identity", "alpha": 8, "lrs": "paper"},
    # A tenant: only the per-layer cores M train (38,400 numbers at r=16), on the frozen shared
    # encoders and decoders of the default r=16 adapter trained (seed 0) on another task.
    "denselora-r16-tenant": {"method": "denselora", "r": 16, "preset": "default", "lrs": "default", "basis": "denselora-r16-default"},
    # The same on the paper configuration's basis (GELU branch) at its rate.
    "denselora-r16-paper-tenant": {"method": "denselora", "r": 16, "preset": "paper", "lrs": "paper", "basis": "denselora-r16"},
}
# Keys that make a method a variant of a configuration rather than a point of the curve.
VARIANT_KEYS = ("activation", "m_init", "scaling", "alpha", "basis")
# The task whose adapter serves as a tenant's basis.
BASIS_TASK = {"hyperbaton": "logical_fallacy_detection", "logical_fallacy_detection": "hyperbaton", "epistemic_reasoning": "hyperbaton"}
# Learning-rate grids: the paper's configuration moves the model about 25x less per step than LoRA
# at the same rate and wants far larger ones; the default configuration steps like LoRA; VeRA
# trains only scaling vectors and wants rates near 1e-2 (its paper).
LR_GRID = {"lora": [1e-3, 3e-3, 1e-2], "default": [1e-3, 3e-3, 1e-2], "paper": [3e-3, 1e-2, 3e-2], "vera": [3e-3, 1e-2, 3e-2]}
DEFAULT_LR = {"lora": 3e-3, "default": 3e-3, "paper": 1e-2, "vera": 1e-2, "none": 0.0}
LR_GRID["none"] = [0.0]


def data_path(root: str | None, task: str) -> Path:
    candidates = [Path(root) / task / "task.json"] if root else []
    candidates.append(HERE.parent.parent / "shared" / "data" / "bigbench" / task / "task.json")
    for path in candidates:
        if path.is_file():
            return path
    from denselora.training.data import packaged_task_path

    return packaged_task_path(task)


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one configuration (runs in its own process)."""
    import resource

    import torch

    from denselora.pretrained import load_model
    from denselora.training import TrainConfig, train
    from denselora.training.data import TokenizedDataset, load_examples, split_examples, subsample
    from denselora.training.evaluation import multiple_choice_accuracy

    from _study import diagnostics
    from _study.methods import build_adapter_model

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    examples = load_examples(spec["data"])
    splits = split_examples(examples, seed=spec["split_seed"], validation=spec["val_size"], test=spec["test_size"])
    train_examples = splits.train if spec["fraction"] >= 1 else subsample(splits.train, spec["fraction"], seed=spec["seed"])
    base, tokenizer = load_model(device=device)
    method = METHODS[spec["method"]]
    torch.manual_seed(spec["seed"])
    options = {k: v for k, v in method.items() if k in ("preset", "activation", "m_init", "scaling")}
    if method["method"] == "none":  # the base model as it is: the floor every method starts from
        model, trainable, total = base, 0, sum(p.numel() for p in base.parameters())
    elif "basis" in method:
        from denselora import DenseLoRAModel

        model = DenseLoRAModel.from_pretrained(base, spec["basis_dir"], freeze_shared=True)
        trainable, total = model.get_nb_trainable_parameters()
    else:
        model = build_adapter_model(base, method["method"], r=method["r"], alpha=method.get("alpha", 2 * method["r"]), **options)
        trainable, total = model.get_nb_trainable_parameters()
    config = TrainConfig(
        lr=spec["lr"], max_steps=spec["steps"], micro_batch_size=spec["batch_size"], warmup_steps=max(1, spec["steps"] // 10),
        seed=spec["seed"], progress=False, plot=False,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = None
    diagnosis: dict[str, Any] = {}
    agreement: dict[str, Any] = {}
    if method["method"] != "none":
        dataset = TokenizedDataset(train_examples, tokenizer, cutoff_len=256)
        probe = probe_batch(dataset, tokenizer, device)
        measured = method["method"] in ("denselora", "lora")  # the methods whose layers diagnostics reads
        # How far the layers sharing an encoder/decoder agree on its gradient, along the run.
        agreement_measured = method["method"] == "denselora"
        if agreement_measured:
            agreement["0"] = diagnostics.shared_agreement(model, probe)

        def on_step(step: int, _record: Any) -> None:
            if measured and step in DIAGNOSE_AT:
                diagnosis[str(step)] = diagnostics.summarize(diagnostics.layer_updates(model, probe))
            if agreement_measured and step in DIAGNOSE_AT:
                agreement[str(step)] = diagnostics.shared_agreement(model, probe)

        result = train(model, tokenizer, dataset, config, callback=on_step)
        if measured:
            diagnosis[str(spec["steps"])] = diagnostics.summarize(diagnostics.layer_updates(model, probe))
        if agreement_measured:
            agreement[str(spec["steps"])] = diagnostics.shared_agreement(model, probe)
        if spec.get("save_to"):
            model.save_pretrained(spec["save_to"])
    val = multiple_choice_accuracy(model, tokenizer, splits.validation) if spec["evaluate_validation"] else None
    test = multiple_choice_accuracy(model, tokenizer, splits.test) if spec["evaluate_test"] else None
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        **spec,
        "device": device,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / total,
        "train_examples": len(train_examples),
        "val_accuracy": val.accuracy if val else None,
        "test_accuracy": test.accuracy if test else None,
        "final_train_loss": result.final_train_loss if result else None,
        "step_seconds": result.seconds / max(result.steps, 1) if result else 0.0,
        "peak_memory_mib": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process max RSS",
        "layer_updates": diagnosis,
        "gradient_agreement": agreement,
    }


def probe_batch(dataset: Any, tokenizer: Any, device: str, size: int = 8) -> dict[str, Any]:
    """The first ``size`` training examples as one padded batch (with their labels): the fixed
    inputs on which the layer updates and the shared gradients' agreement are measured along a run."""
    from denselora.training.data import Collator, pad_id_of

    batch = Collator(pad_id_of(tokenizer))([dataset[i] for i in range(min(size, len(dataset)))])
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}


def run_name(spec: dict[str, Any]) -> str:
    return f"{spec['task']}-{spec['method']}-lr{spec['lr']:g}-s{spec['seed']}-f{spec['fraction']:g}-n{spec['steps']}-t{spec['test_size']}"


def ensure(spec: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """The result of ``spec``, from disk when it ran before, else by running it now (saving its
    adapter under ``ADAPTERS``)."""
    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / f"{run_name(spec)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if METHODS[spec["method"]]["method"] != "none":
        spec = dict(spec, save_to=str(ADAPTERS / run_name(spec)))
    claim = path.with_suffix(".running")  # several study processes can share the queue
    try:
        claim.open("x").close()
    except FileExistsError:
        print(f"skip {path.stem}: another process is running it ({claim})", flush=True)
        return None
    started = time.perf_counter()
    print(f"run {path.stem} ...", flush=True)
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--run-one", json.dumps(spec)], capture_output=True, text=True, timeout=timeout
        )
    finally:
        claim.unlink(missing_ok=True)
    if proc.returncode != 0:
        print(f"  failed:\n{proc.stderr[-2000:]}", flush=True)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - started
    for key in ("save_to", "basis_dir"):  # recorded relative to the repository
        if key in result:
            result[key] = os.path.relpath(result[key], HERE.parent)
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(staging, path)
    print(f"  test {result['test_accuracy']}, val {result['val_accuracy']}, {result['step_seconds']:.2f} s/step", flush=True)
    return result


def ensure_basis(args: argparse.Namespace, spec: dict[str, Any], name: str) -> str | None:
    """The adapter directory serving as the basis of tenant method ``name`` on ``spec``'s task:
    the seed-0 run of the basis method on `BASIS_TASK`, trained now if it is not on disk."""
    basis_method = METHODS[name]["basis"]
    task = BASIS_TASK[spec["task"]]
    basis_spec = dict(spec, task=task, data=str(data_path(args.data_root, task)), method=basis_method, seed=0,
                      lr=DEFAULT_LR[METHODS[basis_method]["lrs"]], fraction=1.0)
    folder = ADAPTERS / run_name(basis_spec)
    if not (folder / "adapter_config.json").is_file():
        (RUNS / f"{run_name(basis_spec)}.json").unlink(missing_ok=True)  # ran before adapters were kept: run again
        if ensure(basis_spec, args.timeout) is None:
            return None
    return str(folder)


SAME_PROTOCOL = ("steps", "batch_size", "test_size", "val_size", "split_seed")


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The finished runs on disk with this protocol (any task or method, whichever process ran
    them), keeping per task, method and data fraction the runs at the learning rate picked on the
    first seed's validation accuracy (full data) or at the full-data choice (reduced data); without
    a search, the runs at every rate."""
    runs = [json.loads(path.read_text()) for path in sorted(RUNS.glob("*.json"))] if RUNS.is_dir() else []
    runs = [r for r in runs if r.get("test_accuracy") is not None and all(r.get(k) == getattr(args, k) for k in SAME_PROTOCOL)]
    picked: dict[tuple[str, str], float] = {}
    selected = []
    for task, method, fraction in sorted({(r["task"], r["method"], r["fraction"]) for r in runs}, key=lambda k: (k[0], k[1], -k[2])):
        group = [r for r in runs if (r["task"], r["method"], r["fraction"]) == (task, method, fraction)]
        first = [r for r in group if r["seed"] == 0 and r.get("val_accuracy") is not None]
        if fraction >= 1 and first:
            picked[task, method] = max(first, key=lambda r: r["val_accuracy"])["lr"]
        if (task, method) in picked:
            selected += [r for r in group if r["lr"] == picked[task, method]]
        else:  # no learning-rate search: every rate run is its own row
            selected += group
    return selected


def summarize(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    order = {name: i for i, name in enumerate(METHODS)}
    keys = sorted({(r["task"], r["method"], r["fraction"], r["lr"]) for r in results}, key=lambda k: (k[0], order.get(k[1], len(order)), -k[2], k[3]))
    for task, method, fraction, lr in keys:
        runs = [r for r in results if (r["task"], r["method"], r["fraction"], r["lr"]) == (task, method, fraction, lr)]
        accs = [r["test_accuracy"] for r in runs]
        rows.append(
            {
                "task": task,
                "method": method,
                "fraction": fraction,
                "lr": runs[0]["lr"],
                "seeds": [r["seed"] for r in runs],
                "trainable_params": runs[0]["trainable_params"],
                "trainable_pct": runs[0]["trainable_pct"],
                "test_accuracy_mean": statistics.fmean(accs),
                "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "test_accuracies": accs,
                "step_seconds": statistics.fmean(r["step_seconds"] for r in runs),
                "peak_memory_mib": max(r["peak_memory_mib"] for r in runs),
                "peak_memory_kind": runs[0]["peak_memory_kind"],
                "device": runs[0]["device"],
            }
        )
    return {"config": {k: v for k, v in vars(args).items() if k != "run_one"}, "rows": rows}


def markdown_table(summary: dict[str, Any]) -> str:
    lines = [
        "| task | method | data | lr | trainable | % | test accuracy (%) | seeds | s / step | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        acc = f"{100 * row['test_accuracy_mean']:.1f} ± {100 * row['test_accuracy_std']:.1f}"
        lines.append(
            f"| {row['task']} | {row['method']} | {row['fraction']:.0%} | {row['lr']:.0e} | {row['trainable_params']:,d} | "
            f"{row['trainable_pct']:.3f} | {acc} | {len(row['seeds'])} | {row['step_seconds']:.2f} | {row['peak_memory_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def diagnosis(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Past step 0, from the runs that recorded it: each method's layer updates along the run (mean
    over layers of the size relative to the base output and of the effective rank), and
    how much of LoRA r=16's update lies in DenseLoRA r=16's shared subspaces (same task and seed)
    and in another seed's LoRA subspaces, per module name (`diagnostics.basis_capture`)."""
    from _study import diagnostics

    along = [
        {"task": r["task"], "method": r["method"], "seed": r["seed"], "step": int(step), **values["all"]}
        for r in results
        for step, values in sorted(r.get("layer_updates", {}).items(), key=lambda kv: int(kv[0]))
    ]
    capture = []
    for r in results:
        if r["method"] != "lora-r16":
            continue
        lora = ADAPTERS / run_name(r)
        # References: DenseLoRA's shared subspaces, and LoRA's own of another seed (how much two
        # LoRA runs agree sets the scale).
        twins = [d for d in results if d["task"] == r["task"] and (
            (d["method"] in ("denselora-r16-default", "denselora-r16") and d["seed"] == r["seed"])
            or (d["method"] == "lora-r16" and d["seed"] != r["seed"]))]
        for twin in twins:
            reference = ADAPTERS / run_name(twin)
            if not (lora / "adapter_model.safetensors").is_file() or not reference.is_dir():
                continue
            per_layer = diagnostics.basis_capture(str(lora), str(reference))
            modules = sorted({m.rsplit(".", 1)[-1] for m in per_layer})
            for module in modules + ["all"]:
                rows = [v for m, v in per_layer.items() if module == "all" or m.endswith(f".{module}")]
                capture.append(
                    {"task": r["task"], "seed": r["seed"], "reference": f"{twin['method']} seed {twin['seed']}", "module": module,
                     "captured": statistics.fmean(v["captured"] for v in rows), "random": statistics.fmean(v["random"] for v in rows)}
                )
    agreement = [
        {"task": r["task"], "method": r["method"], "seed": r["seed"], "step": int(step),
         **{key: statistics.fmean(g[key] for g in groups.values()) for key in ("encoder_l1", "decoder_l1", "encoder_cosine", "decoder_cosine")},
         "layers": statistics.fmean(g["layers"] for g in groups.values())}
        for r in results
        for step, groups in sorted(r.get("gradient_agreement", {}).items(), key=lambda kv: int(kv[0]))
        if groups
    ]
    return {"layer_updates": along, "basis_capture": capture, "gradient_agreement": agreement}


def diagnosis_tables(found: dict[str, Any]) -> str:
    lines = ["| task | method | seed | step | update / base output | effective rank (entropy) | rank for 99% energy |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in found["layer_updates"]:
        lines.append(f"| {row['task']} | {row['method']} | {row['seed']} | {row['step']} | {row['relative_norm']:.4f} | {row['entropy_rank']:.1f} | {row['energy_rank']:.1f} |")
    lines += ["", "| task | LoRA r16 seed | subspaces of | module | share of LoRA's update inside them | random subspaces |", "|---|---:|---|---|---:|---:|"]
    for row in found["basis_capture"]:
        lines.append(f"| {row['task']} | {row['seed']} | {row['reference']} | {row['module']} | {row['captured']:.3f} | {row['random']:.3f} |")
    # Mean over the groups; an L1 agreement of 1 means every layer pulls each entry the same way,
    # a cosine near 1/sqrt(layers) that the layers' shares point in unrelated directions.
    lines += ["", "| task | method | seed | step | encoder agreement (L1) | decoder agreement (L1) | encoder cosine | decoder cosine | 1/sqrt(layers) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in found.get("gradient_agreement", []):
        lines.append(f"| {row['task']} | {row['method']} | {row['seed']} | {row['step']} | {row['encoder_l1']:.3f} | {row['decoder_l1']:.3f} | "
                     f"{row['encoder_cosine']:.3f} | {row['decoder_cosine']:.3f} | {row['layers'] ** -0.5:.3f} |")
    return "\n".join(lines) + "\n"


FAMILIES = {  # curve label, colour, marker
    "lora": ("PEFT LoRA r=1..16", "tab:gray", "o"),
    "vera": ("PEFT VeRA r=256", "tab:green", "s"),
    "default": ("DenseLoRA default r=8..64", "tab:blue", "D"),
    "paper": ("DenseLoRA paper r=8..64", "tab:orange", "^"),
}


def plot(summary: dict[str, Any], path: Path) -> None:
    """Accuracy against trainable parameters (log scale), one panel per task: a line per method
    family across ranks, error bars over seeds, zero-shot as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["fraction"] >= 1]
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        here = [r for r in rows if r["task"] == task]
        for family, (label, color, marker) in FAMILIES.items():
            # One point per method on a curve: when several rates ran without a search, its family's.
            points = sorted(
                (r for r in here if METHODS.get(r["method"], {}).get("lrs") == family
                 and not any(k in METHODS[r["method"]] for k in VARIANT_KEYS)
                 and (len({x["lr"] for x in here if x["method"] == r["method"]}) == 1 or r["lr"] == DEFAULT_LR[family])),
                key=lambda r: r["trainable_params"],
            )
            if points:
                ax.errorbar(
                    [r["trainable_params"] for r in points],
                    [100 * r["test_accuracy_mean"] for r in points],
                    yerr=[100 * r["test_accuracy_std"] for r in points],
                    label=label, color=color, marker=marker, capsize=3,
                )
        for r in here:
            if "basis" in METHODS.get(r["method"], {}):  # tenants: cores only, on another task's basis
                ax.errorbar([r["trainable_params"]], [100 * r["test_accuracy_mean"]], yerr=[100 * r["test_accuracy_std"]],
                            color="tab:purple", marker="*", markersize=10, capsize=3, linestyle="none",
                            label=f"DenseLoRA tenant (M only), lr {r['lr']:g}")
            if r["method"] == "zero-shot":
                ax.axhline(100 * r["test_accuracy_mean"], color="black", linestyle="--", linewidth=1, label="zero-shot")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"SmolLM2-135M, {task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", default="social_iqa,strategyqa")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data-root", default=None, help="folder with <task>/task.json (default: ../shared/data/bigbench, else the packaged slices)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="1.0,0.1", help="fractions of the training split (the data-efficiency point)")
    parser.add_argument("--fraction-methods", default="lora-r16,denselora-r16-default", help="methods trained on the reduced fractions")
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--no-tune", action="store_true", help="skip the learning-rate search; use one lr per method family")
    parser.add_argument("--lr", type=float, default=None, help="with --no-tune: this learning rate for every method instead of its family's")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--report", action="store_true", help="only summarize the finished runs of this protocol (table, JSON, plot)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    parser.add_argument("--name", default="replicate", help="stem of the summary files under benches/results (JSON, table, plot)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "python"))
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return 0

    if not args.report:
        run_all(args)
    results = collect(args)
    if not results:
        print("no finished runs")
        return 1
    summary = summarize(results, args)
    summary["diagnosis"] = diagnosis(results)
    table = markdown_table(summary)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    written = ((f"{args.name}.json", json.dumps(summary, indent=2) + "\n"), (f"{args.name}.md", table),
               (f"{args.name}-diagnosis.md", diagnosis_tables(summary["diagnosis"])))
    for name, text in written:
        staging = RESULTS / f"{name}.tmp"
        staging.write_text(text)
        os.replace(staging, RESULTS / name)
    try:
        plot(summary, RESULTS / f"{args.name}.png")
    except ImportError:
        print("matplotlib is not installed: no plot")
    return 0


def run_all(args: argparse.Namespace) -> None:
    """Every run of the protocol that is not on disk yet: the learning-rate search, the seeds, the
    reduced-data rows."""
    reduced_methods = args.fraction_methods.split(",")
    for task in args.tasks.split(","):
        data = str(data_path(args.data_root, task))
        picked: dict[str, float] = {}
        for fraction in [float(f) for f in args.fractions.split(",")]:
            full = fraction >= 1
            for name in args.methods.split(",") if full else [m for m in args.methods.split(",") if m in reduced_methods]:
                family = METHODS[name]["lrs"]
                base = dict(task=task, data=data, method=name, steps=args.steps, batch_size=args.batch_size, fraction=fraction,
                            test_size=args.test_size, val_size=args.val_size, split_seed=args.split_seed, threads=args.threads,
                            evaluate_validation=not args.no_tune, evaluate_test=True)
                if "basis" in METHODS[name]:
                    basis = ensure_basis(args, base, name)
                    if basis is None:
                        continue
                    base["basis_dir"] = basis
                if not full:
                    lr = picked.get(name, DEFAULT_LR[family])  # the reduced-data runs keep the full-data choice
                elif args.no_tune:
                    lr = DEFAULT_LR[family] if args.lr is None else args.lr
                else:
                    # Picked on validation accuracy with the first seed (the test accuracy of these runs
                    # plays no part in the choice; the chosen one is also the first seed's result).
                    tuned = [ensure(dict(base, lr=lr, seed=0), args.timeout) for lr in LR_GRID[family]]
                    tuned = [t for t in tuned if t is not None]
                    if not tuned:
                        continue
                    lr = max(tuned, key=lambda t: t["val_accuracy"])["lr"]
                picked[name] = lr
                for seed in [int(s) for s in args.seeds.split(",")]:
                    ensure(dict(base, lr=lr, seed=seed), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
