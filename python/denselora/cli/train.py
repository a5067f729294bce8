"""``denselora train``, ``denselora eval`` and ``denselora demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from ..errors import ArgumentError

DEVICES = ("auto", "cpu", "cuda")


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """The arguments and the handler of ``train``, ``eval`` or ``demo``."""
    {"train": _configure_train, "eval": _configure_eval, "demo": _configure_demo}[name](parser)


# -- shared flags --------------------------------------------------------------------------------


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="a local transformers model folder, or 'default' (the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when available (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def _add_split_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation/test split (default: 0)")
    parser.add_argument("--val-size", type=float, default=None, help="validation examples: a count, or a fraction below 1 (default: 0.1 for BIG-bench tasks, 0.05 for instruction files)")
    parser.add_argument("--test-size", type=float, default=None, help="test examples held out, never trained on: a count or a fraction (default: 0.2 for BIG-bench tasks, 0 for instruction files)")


def _size(value: Optional[float], default: float) -> int | float:
    if value is None:
        return default
    return int(value) if value >= 1 else float(value)


def load_splits(args: argparse.Namespace) -> Any:
    from ..training.data import load_examples, split_examples

    examples = load_examples(args.data)
    is_choice = all(e.is_multiple_choice for e in examples)
    val_default, test_default = (0.1, 0.2) if is_choice else (0.05, 0)
    return split_examples(
        examples,
        seed=args.split_seed,
        validation=_size(args.val_size, val_default),
        test=_size(args.test_size, test_default),
    )


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device cuda: no CUDA device is available")
    return name


def _setup_distributed(device: str) -> tuple[int, int, str]:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return torch.distributed.get_rank(), world, device


def _load_base(args: argparse.Namespace, device: str) -> tuple[Any, Any]:
    import torch

    from ..pretrained import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model not in ("default", "smollm2-135m") and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such model folder (or pass 'default')")
    return load_model(args.model, device=device)


# -- train ---------------------------------------------------------------------------------------


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.description = "Fine-tune a DenseLoRA adapter on an Alpaca / LLM-Adapters JSON file or a BIG-bench task.json. Runs under torchrun unchanged."
    _add_model_flags(p)
    p.add_argument("--data", required=True, help="Alpaca / LLM-Adapters JSON (instruction, input, output) or a BIG-bench task.json")
    p.add_argument("--output", required=True, help="output folder: adapter/ (best by validation loss), final/, checkpoints/, train_log.json, loss_curve.png")
    p.add_argument("--basis", default=None, metavar="ADAPTER", help="train a tenant: only the per-layer cores M train, on the frozen shared encoders/decoders of this adapter (a folder or 'bundle.dl:name'); the output adapters are tenants of it, and the configuration flags below come from it")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,up_proj,down_proj", help="comma-separated module names")
    p.add_argument("--preset", default="default", choices=("default", "paper"), help="DenseLoRA configuration to start from: the library's default or the paper's code (GELU both sides, alpha/r, Kaiming M); the flags below override it")
    p.add_argument("--activation", default=None, choices=("gelu", "identity", "silu"), help="both sides (default: the preset's)")
    p.add_argument("--encoder-activation", default=None, choices=("gelu", "identity", "silu"))
    p.add_argument("--decoder-activation", default=None, choices=("gelu", "identity", "silu"))
    p.add_argument("--scaling", default=None, choices=("standard", "rslora"), help="alpha/r or alpha/sqrt(r) (default: the preset's)")
    p.add_argument("--m-init", default=None, choices=("kaiming", "orthogonal", "identity"))
    p.add_argument("--shared-lr-ratio", type=float, default=None, help="learning-rate multiplier of the shared encoders/decoders")
    p.add_argument("--m-lr-ratio", type=float, default=None, help="learning-rate multiplier of the per-layer M")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 3e-3, denselora.optim.DEFAULT_LR; the paper preset: 1e-2, PAPER_LR)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (ignored with --epochs)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--train-on-inputs", action="store_true", help="also train on the prompt's tokens")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", default="linear", choices=("linear", "cosine", "constant"))
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=float, default=1.0, help="train on this seeded fraction of the training split")
    p.add_argument("--eval-every", type=int, default=0, help="validation every N steps (0: at the end)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT", help="a checkpoint folder, or 'latest' under --output")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--no-progress", action="store_true")
    _add_split_flags(p)
    p.set_defaults(handler=run_train)


def dense_options(args: argparse.Namespace) -> dict[str, Any]:
    """The DenseLoRA preset and the configuration flags given on the command line."""
    options: dict[str, Any] = {"preset": args.preset}
    for name in ("activation", "encoder_activation", "decoder_activation", "scaling", "m_init", "shared_lr_ratio", "m_lr_ratio"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    return options


def run_train(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, build_adapter_model, train
    from ..training.data import TokenizedDataset, subsample
    from ..training.optim import PRESET_LRS

    config = TrainConfig(
        lr=args.lr if args.lr is not None else PRESET_LRS[args.preset],
        max_steps=args.steps,
        epochs=args.epochs,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        precision=args.precision,
        progress=not args.no_progress,
    )
    config.validate()  # before the slow parts
    splits = load_splits(args)
    train_examples = splits.train if args.train_fraction >= 1 else subsample(splits.train, args.train_fraction, seed=args.seed)
    rank, world, device = _setup_distributed(_device(args.device))
    base, tokenizer = _load_base(args, device)
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if args.basis is not None:
        from ..method.model import DenseLoRAModel

        model = DenseLoRAModel.from_pretrained(base, args.basis, freeze_shared=True)
    else:
        model = build_adapter_model(base, r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=targets, **dense_options(args))
    trainable, total = model.get_nb_trainable_parameters()
    train_data = TokenizedDataset(train_examples, tokenizer, cutoff_len=args.cutoff_len, train_on_inputs=args.train_on_inputs)
    val_data = TokenizedDataset(splits.validation, tokenizer, cutoff_len=args.cutoff_len) if splits.validation else None
    if rank == 0:
        print(f"denselora: {trainable:,d} trainable parameters of {total:,d} ({100 * trainable / total:.4f}%)")
        print(f"data: {len(train_data)} train, {len(splits.validation)} validation, {len(splits.test)} test (held out) from {args.data}")
    result = train(model, tokenizer, train_data, config, val_data=val_data, output_dir=args.output, resume_from=args.resume)
    if rank == 0:
        best = f", best validation loss {result.best_val_loss:.4f} at step {result.best_step}" if result.best_val_loss is not None else ""
        print(f"trained {result.steps} steps in {result.seconds:.1f} s ({result.tokens_per_second:.0f} tokens/s){best}")
        print(f"adapter: {result.adapter_dir}")
    return 0


# -- eval ----------------------------------------------------------------------------------------


def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.description = "Multiple-choice accuracy by the log-likelihood of each option (BIG-bench tasks), or generation with answer extraction in the LLM-Adapters style (their commonsense test files)."
    _add_model_flags(p)
    p.add_argument("--adapter", default=None, help="an adapter folder (DenseLoRA or PEFT LoRA) or a bundle entry 'bundle.dl:name'; omit for the base model")
    p.add_argument("--basis", default=None, metavar="ADAPTER", help="the basis of a tenant given with --adapter (a folder or 'bundle.dl:name'; default: found in the tenant's bundle)")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default=None, choices=("train", "validation", "test", "all"), help="which split (default: test for BIG-bench tasks, all for instruction files)")
    p.add_argument("--mode", default="auto", choices=("auto", "choice", "generate"), help="auto: choice for multiple-choice data, else generate")
    p.add_argument("--answer-format", default=None, help="generation mode: the dataset whose answer format to extract (boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Challenge, ARC-Easy, openbookqa); default: guessed from the file path")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of the split")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--normalize", action="store_true", help="choice mode: average log-probability per option token instead of the sum")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--output", default=None, help="write predictions and accuracy as JSON here")
    _add_split_flags(p)
    p.set_defaults(handler=run_eval)


def attach_adapter(base: Any, source: Optional[str], basis: Optional[str] = None) -> Any:
    """``base`` with the adapter at ``source`` (DenseLoRA directory or bundle entry, or a PEFT
    LoRA directory) attached for inference; ``basis``: the basis of a tenant (else found in its
    bundle)."""
    if source is None:
        return base
    from ..io.peft import is_peft_lora
    from ..io.sources import split_source
    from ..method.model import DenseLoRAModel

    path, _ = split_source(source)
    if is_peft_lora(path):
        from peft import PeftModel

        return PeftModel.from_pretrained(base, os.fspath(path)).eval()
    return DenseLoRAModel.from_pretrained(base, source, basis=basis)


def run_eval(args: argparse.Namespace) -> int:
    from ..training.evaluation import dataset_kind, generation_accuracy, multiple_choice_accuracy

    splits = load_splits(args)
    is_choice = all(e.is_multiple_choice for e in splits.train + splits.validation + splits.test)
    split = args.split or ("test" if is_choice else "all")
    examples = splits.train + splits.validation + splits.test if split == "all" else getattr(splits, split)
    if args.limit is not None:
        if args.limit < 1:
            raise ArgumentError(f"--limit must be at least 1, got {args.limit}")
        examples = examples[: args.limit]
    if not examples:
        raise ArgumentError(f"the {split} split of {args.data} is empty (see --test-size / --val-size)")
    mode = args.mode if args.mode != "auto" else ("choice" if is_choice else "generate")
    if mode == "choice" and not is_choice:
        raise ArgumentError(f"{args.data}: --mode choice needs multiple-choice data (a BIG-bench task)")
    kind = None
    if mode == "generate":
        kind = args.answer_format or dataset_kind(str(args.data))
    device = _device(args.device)
    base, tokenizer = _load_base(args, device)
    model = attach_adapter(base, args.adapter, args.basis)
    report: dict[str, Any] = {"data": str(args.data), "split": split, "adapter": args.adapter, "mode": mode, "examples": len(examples)}
    if mode == "choice":
        result = multiple_choice_accuracy(model, tokenizer, examples, batch_size=args.batch_size, normalize=args.normalize)
        report.update(accuracy=result.accuracy, correct=result.correct, predictions=result.predictions)
    else:
        gen = generation_accuracy(model, tokenizer, examples, kind, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)  # type: ignore[arg-type]
        report.update(accuracy=gen.accuracy, correct=gen.correct, answer_format=kind, outputs=gen.outputs, extracted=gen.extracted)
    print(f"accuracy {report['accuracy']:.4f} ({report['correct']}/{len(examples)}) on the {split} split of {args.data} [{mode}]")
    if args.output:
        from .. import _core

        _core.write_text_atomic(os.fspath(args.output), json.dumps(report, indent=2) + "\n")
    return 0


# -- demo ----------------------------------------------------------------------------------------


def _configure_demo(p: argparse.ArgumentParser) -> None:
    from ..demo import DEFAULTS

    p.description = "Measures accuracy before, fine-tunes with DenseLoRA, measures accuracy after, saves and packs the adapter and reloads it for CPU inference. Offline; about 5-10 minutes on 2 CPU cores."
    p.add_argument("--task", default=DEFAULTS["task"], help=f"packaged task (default: {DEFAULTS['task']})")
    p.add_argument("--output", default="denselora-demo", help="folder for the adapter, the bundle, the log and the loss curve (default: ./denselora-demo)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--r", type=int, default=DEFAULTS["r"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--test-size", type=int, default=DEFAULTS["test_size"], help="held-out test examples scored before and after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default="default", help=argparse.SUPPRESS)
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from ..demo import run

    run(
        task=args.task,
        output=Path(args.output),
        steps=args.steps,
        lr=args.lr,
        r=args.r,
        batch_size=args.batch_size,
        test_size=args.test_size,
        seed=args.seed,
        threads=args.threads,
        model=args.model,
        out=sys.stdout,
    )
    return 0
