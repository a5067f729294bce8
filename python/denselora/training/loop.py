"""A plain PyTorch training loop for DenseLoRA adapters (any model whose trainable parameters are
its adapter trains too, e.g. a PEFT model; checkpoints need a DenseLoRA one).

- Micro-batches with gradient accumulation. The loss of a step is the sum of token losses over the
  whole global batch divided by its number of answer tokens, so accumulating ``k`` micro-batches
  gives the same gradient as one batch ``k`` times larger, and DDP ranks together give the same
  gradient as one process.
- AdamW over the adapter's parameter groups (`denselora.training.optim.create_optimizer`), warmup
  then a linear, cosine or constant schedule, gradient clipping, bf16/fp16 autocast on CUDA.
- Validation loss every ``eval_every`` steps; the best adapter is kept under ``output_dir/adapter``.
- Checkpoints under ``output_dir/checkpoints`` (`denselora.training.checkpoint`); ``resume_from``
  continues exactly where a run stopped.
- Distributed: when ``torch.distributed`` is initialised (``torchrun``), each rank takes its share
  of every global batch and the model is wrapped in ``DistributedDataParallel``; only rank 0 writes.
  A model already wrapped in FSDP (with `fsdp_auto_wrap_policy`) is trained as it is; its adapter
  is gathered for saving (periodic checkpoints are not available there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _core
from ..errors import ArgumentError, ConfigError
from ..method.model import DenseLoRAModel
from .checkpoint import (
    ADAPTER_DIR,
    checkpoints_dir,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_adapter,
    rng_state,
    save_checkpoint,
    save_on_main,
    set_rng_state,
)
from .config import TrainConfig, TrainResult
from .data import IGNORE_INDEX, Collator, TokenizedDataset, pad_id_of
from .distributed import all_gather, all_reduce_sum, barrier, is_fsdp, rank_and_world, unwrap
from .evaluation import model_device
from .optim import create_optimizer

# -- the pieces of a step ---------------------------------------------------------------------


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def batch_indices(n: int, global_batch: int, step: int, seed: int) -> list[int]:
    """The dataset indices of the global batch of ``step``: a seeded shuffle per epoch, read as one
    stream, so the order depends only on (seed, step) and resuming needs no stored position."""
    start = step * global_batch
    out: list[int] = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = min(global_batch - len(out), n - offset)
        out.extend(order[offset : offset + take])
    return out


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, their count)."""
    labels = batch["labels"][:, 1:]
    kwargs: dict[str, Any] = {}
    if _accepts_logits_to_keep(model):
        # Only the positions whose next token is labelled need logits. The vocabulary-wide head is a
        # large share of a small model's step, and answers are a few tokens of a long prompt.
        positions = (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        kwargs["logits_to_keep"] = positions
        labels = labels[:, positions]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    if not kwargs:
        logits = logits[:, :-1, :]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM under the wrappers (DDP/FSDP, PEFT, DenseLoRA) takes a tensor of positions
    as ``logits_to_keep`` (transformers' causal LMs do)."""
    inner = model
    while isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return _forward_takes_logits_to_keep(type(inner))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    # Once per model class: the loss asks at every step.
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def _autocast(device: torch.device, precision: str) -> tuple[Any, Optional[torch.dtype]]:
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast(device.type, enabled=False), None
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return torch.autocast("cuda", enabled=False), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, dataset: TokenizedDataset, *, batch_size: int = 8, pad_id: int = 0, precision: str = "auto"
) -> float:
    """Mean token loss over ``dataset`` (sharded across DDP ranks, reduced)."""
    rank, world = rank_and_world()
    device = model_device(model)
    collate = Collator(pad_id)
    was_training = model.training
    model.eval()
    total = count = 0.0
    indices = list(range(rank, len(dataset), world))
    # Similar lengths together: less padding.
    indices.sort(key=lambda i: len(dataset[i]["input_ids"]))
    ctx, _ = _autocast(device, precision)
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start : start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with ctx:
            loss, n = token_loss_sum(model, batch)
        total += float(loss)
        count += n
    total, count = all_reduce_sum([total, count], device)
    model.train(was_training)
    return total / max(count, 1.0)


# -- the loop ---------------------------------------------------------------------------------


def train(
    model: nn.Module,
    tokenizer: Any,
    train_data: TokenizedDataset,
    config: TrainConfig,
    *,
    val_data: Optional[TokenizedDataset] = None,
    output_dir: Optional[os.PathLike | str] = None,
    resume_from: Optional[os.PathLike | str] = None,
    callback: Optional[Callable[[int, dict[str, Any]], None]] = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` (an adapter-wrapped model) on ``train_data``.

    ``resume_from`` is a checkpoint folder, or ``"latest"`` for the newest under ``output_dir``.
    ``callback(step, record)`` is called after every step (rank 0 only).
    Returns a `TrainResult`; with ``output_dir`` the adapter (best by validation loss, or the last
    one without validation data) is in ``output_dir/adapter``, plus ``train_log.json`` and
    ``loss_curve.png``.
    """
    config.validate()
    if len(train_data) == 0:
        raise ArgumentError("train_data is empty")
    run = _Run(model, tokenizer, train_data, config, val_data, output_dir)
    if resume_from is not None:
        run.resume(resume_from)
    return run.fit(callback)


@dataclass
class _Progress:
    """What a run has done so far; a checkpoint stores it."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    best_loss: Optional[float] = None
    best_step: Optional[int] = None


class _Run:
    """One `train` call: the model (and the DDP wrapper it trains through), the optimizer, the
    schedule, the gradient scaler and the progress that a checkpoint restores."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        train_data: TokenizedDataset,
        config: TrainConfig,
        val_data: Optional[TokenizedDataset],
        output_dir: Optional[os.PathLike | str],
    ) -> None:
        self.config = config
        self.train_data, self.val_data = train_data, val_data
        self.rank, self.world = rank_and_world()
        self.is_main = self.rank == 0
        self.out = Path(output_dir) if output_dir is not None else None
        if self.out is not None and self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.device = model_device(model)
        self.pad_id = pad_id_of(tokenizer)
        self.collate = Collator(self.pad_id)
        self.global_batch = config.micro_batch_size * config.gradient_accumulation_steps * self.world
        self.total_steps = config.max_steps
        if config.epochs is not None:
            self.total_steps = max(1, math.ceil(config.epochs * len(train_data) / self.global_batch))
        if not any(p.requires_grad for p in model.parameters()):
            raise ArgumentError("the model has no trainable parameters (attach an adapter first)")
        torch.manual_seed(config.seed)
        random.seed(config.seed)

        self.inner = model  # what is saved; `self.model` is what runs
        self.fsdp = is_fsdp(model)
        if config.save_every and self.fsdp:
            raise ConfigError("periodic checkpoints (save_every) are not supported under FSDP, whose optimizer state is sharded")
        if config.save_every and not isinstance(unwrap(model), DenseLoRAModel):
            raise ConfigError(f"periodic checkpoints (save_every) need a DenseLoRA model, got {type(unwrap(model)).__name__}")
        self.model = model
        if self.world > 1 and not self.fsdp and not isinstance(model, nn.parallel.DistributedDataParallel):
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.optimizer = create_optimizer(model, config.lr, weight_decay=config.weight_decay)
        warmup = min(config.warmup_steps, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config.schedule, warmup, self.total_steps))
        _, amp_dtype = _autocast(self.device, config.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        self.progress = _Progress()
        self.bar: Any = None

    # -- checkpoints --

    def resume(self, resume_from: os.PathLike | str) -> None:
        source = Path(resume_from)
        if str(resume_from) == "latest" and self.out is not None:
            found = latest_checkpoint(self.out)
            if found is None:
                raise FileNotFoundError(f"{checkpoints_dir(self.out)}: no checkpoint to resume from")
            source = found
        state = load_checkpoint(source)
        if state.get("global_batch") != self.global_batch or state.get("seed") != self.config.seed:
            raise ConfigError(
                f"{source}: checkpoint was written with global batch {state.get('global_batch')} and seed "
                f"{state.get('seed')}; this run has {self.global_batch} and {self.config.seed} (exact resume needs the same)"
            )
        restore_adapter(self.inner, source / ADAPTER_DIR)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = _Progress(
            int(state["step"]), list(state["history"]), list(state["evals"]), state["best_loss"], state["best_step"]
        )
        rng = state["rng"]  # every rank's, in rank order
        set_rng_state(rng[self.rank] if isinstance(rng, list) and len(rng) > self.rank else rng)

    def checkpoint(self) -> None:
        at = self.progress.step
        rng = all_gather(rng_state())  # a collective: every rank resumes its own dropout stream
        if self.out is None or not self.is_main:
            return
        state = {
            "step": at,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "history": self.progress.history,
            "evals": self.progress.evals,
            "best_loss": self.progress.best_loss,
            "best_step": self.progress.best_step,
            "global_batch": self.global_batch,
            "seed": self.config.seed,
            "config": dataclasses.asdict(self.config),
        }
        save_checkpoint(checkpoints_dir(self.out) / f"step-{at}", self.inner, state)
        prune_checkpoints(self.out, self.config.keep_checkpoints)

    # -- steps --

    def fit(self, callback: Optional[Callable[[int, dict[str, Any]], None]]) -> TrainResult:
        config, progress = self.config, self.progress
        if config.progress and self.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total_steps, initial=progress.step, desc="training", unit="step", dynamic_ncols=True)
        self.model.train()
        started = time.perf_counter()
        tokens_seen = 0
        has_val = self.val_data is not None and len(self.val_data) > 0
        while progress.step < self.total_steps:
            mean_loss, step_tokens, lr = self.step()
            tokens_seen += step_tokens
            elapsed = time.perf_counter() - started
            record = {"step": progress.step, "loss": mean_loss, "lr": lr, "tokens": step_tokens, "elapsed_s": elapsed}
            progress.history.append(record)
            if self.bar is not None:
                self.bar.update(1)
                if progress.step % config.log_every == 0 or progress.step == self.total_steps:
                    self.bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}", lr=f"{lr:.2e}")
            if callback is not None and self.is_main:
                callback(progress.step, record)
            if has_val and ((config.eval_every and progress.step % config.eval_every == 0) or progress.step == self.total_steps):
                if not progress.evals or progress.evals[-1]["step"] != progress.step:
                    self.evaluate()
            if config.save_every and progress.step % config.save_every == 0 and progress.step < self.total_steps:
                self.checkpoint()
            barrier()
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - started
        adapter_dir = self.finish(has_val)
        return TrainResult(
            steps=progress.step,
            best_step=progress.best_step,
            best_val_loss=progress.best_loss,
            final_train_loss=progress.history[-1]["loss"] if progress.history else None,
            adapter_dir=adapter_dir,
            history=progress.history,
            evals=progress.evals,
            seconds=seconds,
            tokens_per_second=tokens_seen / max(seconds, 1e-9),
        )

    def step(self) -> tuple[float, int, float]:
        """One optimizer step over the global batch: (mean token loss, input tokens, learning rate)."""
        config, model = self.config, self.model
        micro, accum = config.micro_batch_size, config.gradient_accumulation_steps
        indices = batch_indices(len(self.train_data), self.global_batch, self.progress.step, config.seed)
        step_tokens = sum(self.train_data.label_tokens(i) for i in indices)
        mine = indices[self.rank * micro * accum : (self.rank + 1) * micro * accum]
        loss_total = 0.0
        input_tokens = 0
        for k in range(accum):
            batch = self.collate([self.train_data[i] for i in mine[k * micro : (k + 1) * micro]])
            batch = {name: t.to(self.device) for name, t in batch.items()}
            input_tokens += int(batch["attention_mask"].sum())
            sync = k == accum - 1 or self.world == 1
            with model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext():
                autocast, _ = _autocast(self.device, config.precision)
                with autocast:
                    loss_sum, _ = token_loss_sum(model, batch)
                # DDP averages gradients over ranks; scaling by world makes the result the gradient
                # of the global batch's mean token loss.
                loss = loss_sum * (self.world / max(step_tokens, 1))
                self.scaler.scale(loss).backward()
            loss_total += float(loss_sum.detach())
        if config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            if self.fsdp:
                model.clip_grad_norm_(config.max_grad_norm)  # the norm over all shards
            else:
                torch.nn.utils.clip_grad_norm_([p for p in self.inner.parameters() if p.requires_grad], config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.progress.step += 1
        loss_total, tokens = all_reduce_sum([loss_total, float(input_tokens)], self.device)
        return loss_total / max(step_tokens, 1), int(tokens), lr

    def evaluate(self) -> None:
        assert self.val_data is not None
        progress, at = self.progress, self.progress.step
        config = self.config
        loss = evaluate_loss(self.model, self.val_data, batch_size=config.eval_batch_size, pad_id=self.pad_id, precision=config.precision)
        progress.evals.append({"step": at, "val_loss": loss})
        if progress.best_loss is None or loss < progress.best_loss:
            progress.best_loss, progress.best_step = loss, at
            if self.out is not None:
                save_on_main(self.inner, self.out / "adapter")
        if self.bar is not None:
            self.bar.write(f"step {at}: validation loss {loss:.4f}" + (" (best)" if progress.best_step == at else ""))

    def finish(self, has_val: bool) -> Optional[Path]:
        """Write the final adapter (and, without validation data, the adapter), the log and the
        loss curve; the adapter directory, when there is an output folder."""
        if self.out is None:
            return None
        progress = self.progress
        save_on_main(self.inner, self.out / "final")
        if not has_val:
            save_on_main(self.inner, self.out / "adapter")
        if self.is_main:
            log = {
                "config": dataclasses.asdict(self.config),
                "steps": progress.step,
                "world_size": self.world,
                "best_step": progress.best_step,
                "best_val_loss": progress.best_loss,
                "history": progress.history,
                "evals": progress.evals,
            }
            _core.write_text_atomic(os.fspath(self.out / "train_log.json"), json.dumps(log, indent=2) + "\n")
            if self.config.plot:
                plot_loss_curve(progress.history, progress.evals, self.out / "loss_curve.png")
        barrier()
        return self.out / "adapter"


def plot_loss_curve(history: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], path: Path) -> Optional[Path]:
    """Training loss per step and validation loss per evaluation, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train", linewidth=1)
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("token loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(staging, dpi=100)
    plt.close(fig)
    os.replace(staging, path)
    return path
