"""A plain PyTorch training loop for adapters (DenseLoRA, or PEFT LoRA for comparison).

- Micro-batches with gradient accumulation. The loss of a step is the sum of token losses over the
  whole global batch divided by its number of answer tokens, so accumulating ``k`` micro-batches
  gives the same gradient as one batch ``k`` times larger, and DDP ranks together give the same
  gradient as one process.
- AdamW over the adapter's parameter groups (`denselora.optim.create_optimizer`), warmup then a
  linear, cosine or constant schedule, gradient clipping, bf16/fp16 autocast on CUDA.
- Validation loss every ``eval_every`` steps; the best adapter is kept under ``output_dir/adapter``.
- Checkpoints (adapter tensors, optimizer, scheduler, scaler, RNG states, step) written atomically
  under ``output_dir/checkpoints``; ``resume_from`` continues exactly where a run stopped. The data
  order is a pure function of the seed and the step, so nothing else has to be stored.
- Distributed: when ``torch.distributed`` is initialised (``torchrun``), each rank takes its share
  of every global batch and the model is wrapped in ``DistributedDataParallel``; only rank 0 writes.
  A model already wrapped in FSDP (with `fsdp_auto_wrap_policy`) is trained as it is; its adapter
  is gathered for saving (periodic checkpoints are not available there).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _core
from ..method.config import DEFAULT_TARGET_MODULES, DenseLoRAConfig
from .data import IGNORE_INDEX, Collator, TokenizedDataset, pad_id_of
from ..errors import ArgumentError, ConfigError, FormatError
from ..method.model import SHARED_ATTR, DenseLoRAModel, get_denselora_model
from .optim import create_optimizer

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    """How to train. A step is one optimizer update over a global batch of
    ``micro_batch_size * gradient_accumulation_steps * world_size`` examples."""

    lr: float = 1e-3
    max_steps: int = 100
    epochs: Optional[float] = None  # when set, max_steps = ceil(epochs * len(train) / global batch)
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    eval_every: int = 0  # 0: only after the last step (when there is validation data)
    eval_batch_size: int = 8
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    seed: int = 0
    precision: str = "auto"  # auto: bf16 on CUDA when supported, else fp32
    log_every: int = 1
    progress: bool = True
    plot: bool = True

    def validate(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "eval_batch_size", "log_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if self.epochs is None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")


@dataclass
class TrainResult:
    steps: int
    best_step: Optional[int]
    best_val_loss: Optional[float]
    final_train_loss: Optional[float]
    adapter_dir: Optional[Path]
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_second: float = 0.0


# -- building the adapted model ---------------------------------------------------------------


def build_adapter_model(
    base: nn.Module,
    method: str = "denselora",
    *,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.05,
    target_modules: Sequence[str] = tuple(DEFAULT_TARGET_MODULES),
    activation: Optional[str] = None,
    preset: str = "default",
    **options: Any,
) -> nn.Module:
    """``base`` with a fresh DenseLoRA adapter, or with a PEFT LoRA on the same targets, rank and
    alpha (``method="lora"``) for comparison. A DenseLoRA adapter starts from ``preset``
    (``"default"`` or ``"paper"``); ``activation`` and ``options`` (any other `DenseLoRAConfig`
    field: ``scaling``, ``m_init``, ``shared_lr_ratio`` ...) override it."""
    if method == "denselora":
        if activation is not None:
            options["activation"] = activation
        config = DenseLoRAConfig.from_preset(
            preset, r=r, alpha=alpha, dropout=dropout, target_modules=list(target_modules), **options
        )
        return get_denselora_model(base, config)
    if method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:  # pragma: no cover - peft is in the test extra
            raise ConfigError("method 'lora' needs the peft package: pip install peft") from exc
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
        return get_peft_model(base, config)
    raise ConfigError(f"method must be 'denselora' or 'lora', got {method!r}")


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor counted once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def save_adapter_dir(model: nn.Module, directory: os.PathLike | str) -> Path:
    """Save the adapter of ``model`` (DenseLoRA or PEFT) to ``directory``, replacing it as a whole:
    it is written beside it and renamed into place, so a crash never leaves a mixed directory."""
    model = unwrap(model)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    _replace_dir(staging, directory)
    return directory


def _replace_dir(staging: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(model, FullyShardedDataParallel)


def save_on_main(model: nn.Module, directory: os.PathLike | str) -> None:
    """`save_adapter_dir` from rank 0. Under FSDP every rank must call it: the full tensors are
    gathered (a collective) before rank 0 writes them."""
    rank, _ = _dist()
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        inner = model.module
        if not isinstance(inner, DenseLoRAModel):
            raise ConfigError("saving under FSDP is supported for DenseLoRA adapters")
        # Copies: the gathered tensors are freed again when the context closes.
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True):
            if rank == 0:
                tensors = {k: v.detach().clone() for k, v in inner.adapter_state().items()}
        if rank == 0:
            from ..io import save_adapter

            directory = Path(directory)
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
            if staging.exists():
                shutil.rmtree(staging)
            save_adapter(staging, inner.adapter_config_dict(), tensors)
            _replace_dir(staging, directory)
        return
    if rank == 0:
        save_adapter_dir(model, directory)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().cpu() for name, p in unwrap(model).named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    params = {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing = sorted(set(params) - set(state))[:3]
        extra = sorted(set(state) - set(params))[:3]
        raise FormatError(f"{source}: checkpoint does not match the model's adapter (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != state[name].shape:
                raise FormatError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, the model {tuple(param.shape)}")
            param.copy_(state[name].to(param.device, param.dtype))


# -- FSDP ---------------------------------------------------------------------------------------


def fsdp_auto_wrap_policy(model: nn.Module) -> Callable[..., bool]:
    """An ``auto_wrap_policy`` for ``torch.distributed.fsdp.FullyShardedDataParallel`` that wraps
    each transformer block as its own unit and keeps every group's shared encoder/decoder (the
    ``DenseLoRAShared`` modules under ``base_model.denselora_shared``) together in the root unit.

    Layers in every block read the shared tensors by reference, so those tensors must not belong to
    any one block's unit, nor to a unit of their own (its forward never runs, so FSDP would never
    gather it): the root unit is gathered for the whole forward and backward pass. Each layer's own
    ``M_l`` stays in its block's unit.

    Use: ``FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True)``.
    """
    base = unwrap(model)
    base = getattr(base, "base_model", base)
    shared = getattr(base, SHARED_ATTR, None)
    if shared is None:
        raise ArgumentError("fsdp_auto_wrap_policy needs a model with a DenseLoRA adapter")
    block_types = _block_types(base)
    shared_id = id(shared)

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if recurse:
            # Never descend into the shared container: nothing in it gets a unit of its own.
            return id(module) != shared_id
        return isinstance(module, block_types)

    policy.shared_module = shared  # type: ignore[attr-defined]
    policy.block_types = block_types  # type: ignore[attr-defined]
    return policy


def _block_types(model: nn.Module) -> tuple[type, ...]:
    """Transformer block classes: the classes of the items of the largest ``nn.ModuleList``."""
    best: Optional[nn.ModuleList] = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and (best is None or len(module) > len(best)):
            best = module
    return tuple({type(m) for m in best}) if best is not None else ()


# -- the schedule -----------------------------------------------------------------------------


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


# -- distributed helpers ----------------------------------------------------------------------


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if _dist()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


# -- data order -------------------------------------------------------------------------------


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


# -- the loop ---------------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=None)
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
    rank, world = _dist()
    device = _model_device(model)
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
    total, count = _all_reduce_sum([total, count], device)
    model.train(was_training)
    return total / max(count, 1.0)


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: os.PathLike | str) -> Optional[Path]:
    folder = Path(output_dir) / "checkpoints"
    found = sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    found = [p for p in found if (p / STATE_FILE).is_file()]
    return found[-1] if found else None


def _write_json(path: Path, data: Any) -> None:
    _core.write_text_atomic(os.fspath(path), json.dumps(data, indent=2) + "\n")


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
    rank, world = _dist()
    is_main = rank == 0
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
    device = _model_device(model)
    pad_id = pad_id_of(tokenizer)
    collate = Collator(pad_id)

    micro = config.micro_batch_size
    accum = config.gradient_accumulation_steps
    global_batch = micro * accum * world
    total_steps = config.max_steps
    if config.epochs is not None:
        total_steps = max(1, math.ceil(config.epochs * len(train_data) / global_batch))
    warmup = min(config.warmup_steps, total_steps)

    if not any(p.requires_grad for p in model.parameters()):
        raise ArgumentError("the model has no trainable parameters (attach an adapter first)")
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    inner = model
    fsdp = _is_fsdp(model)
    if fsdp and config.save_every:
        raise ConfigError("periodic checkpoints (save_every) are not supported under FSDP, whose optimizer state is sharded")
    if world > 1 and not fsdp and not isinstance(model, nn.parallel.DistributedDataParallel):
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = create_optimizer(inner, config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.schedule, warmup, total_steps))
    ctx_factory = lambda: _autocast(device, config.precision)  # noqa: E731
    _, amp_dtype = ctx_factory()
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step = 0
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    if resume_from is not None:
        source = latest_checkpoint(out) if (str(resume_from) == "latest" and out is not None) else Path(resume_from)
        if source is None:
            raise FileNotFoundError(f"{out}/checkpoints: no checkpoint to resume from")
        state_path = Path(source) / STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(f"{state_path}: no trainer state (not a checkpoint folder)")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated or foreign file
            raise FormatError(f"{state_path}: cannot read trainer state: {exc}") from exc
        if state.get("global_batch") != global_batch or state.get("seed") != config.seed:
            raise ConfigError(
                f"{source}: checkpoint was written with global batch {state.get('global_batch')} and seed "
                f"{state.get('seed')}; this run has {global_batch} and {config.seed} (exact resume needs the same)"
            )
        load_trainable_state(inner, state["trainable"], str(state_path))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        history, evals = list(state["history"]), list(state["evals"])
        best_loss, best_step = state["best_loss"], state["best_step"]
        _set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) and len(state["rng"]) > rank else state["rng"])

    def checkpoint(at: int) -> None:
        # RNG states of every rank, so each resumes its own dropout stream.
        rng = _rng_state()
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, rng)
            rng_all: Any = gathered
        else:
            rng_all = rng
        if out is None or not is_main:
            return
        folder = out / "checkpoints" / f"step-{at}"
        staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        inner.save_pretrained(staging / "adapter")
        torch.save(
            {
                "step": at,
                "trainable": trainable_state(inner),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_all,
                "history": history,
                "evals": evals,
                "best_loss": best_loss,
                "best_step": best_step,
                "global_batch": global_batch,
                "seed": config.seed,
                "config": dataclasses.asdict(config),
            },
            staging / STATE_FILE,
        )
        _replace_dir(staging, folder)
        kept = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in kept[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def run_eval(at: int) -> None:
        nonlocal best_loss, best_step
        assert val_data is not None
        loss = evaluate_loss(model, val_data, batch_size=config.eval_batch_size, pad_id=pad_id, precision=config.precision)
        evals.append({"step": at, "val_loss": loss})
        if best_loss is None or loss < best_loss:
            best_loss, best_step = loss, at
            if out is not None:
                save_on_main(inner, out / "adapter")
        if bar is not None:
            bar.write(f"step {at}: validation loss {loss:.4f}" + (" (best)" if best_step == at else ""))

    bar = None
    if config.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)

    model.train()
    started = time.perf_counter()
    tokens_seen = 0
    has_val = val_data is not None and len(val_data) > 0
    while step < total_steps:
        indices = batch_indices(len(train_data), global_batch, step, config.seed)
        step_tokens = sum(train_data.label_tokens(i) for i in indices)
        mine = indices[rank * micro * accum : (rank + 1) * micro * accum]
        step_loss = 0.0
        step_input_tokens = 0
        for k in range(accum):
            batch = collate([train_data[i] for i in mine[k * micro : (k + 1) * micro]])
            batch = {name: t.to(device) for name, t in batch.items()}
            step_input_tokens += int(batch["attention_mask"].sum())
            sync = k == accum - 1 or world == 1
            ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else _nullcontext()
            with ctx:
                autocast, _ = ctx_factory()
                with autocast:
                    loss_sum, _ = token_loss_sum(model, batch)
                # DDP averages gradients over ranks; scaling by world makes the result the gradient
                # of the global batch's mean token loss.
                loss = loss_sum * (world / max(step_tokens, 1))
                scaler.scale(loss).backward()
            step_loss += float(loss_sum.detach())
        if config.max_grad_norm is not None:
            scaler.unscale_(optimizer)
            if fsdp:
                model.clip_grad_norm_(config.max_grad_norm)  # the norm over all shards
            else:
                torch.nn.utils.clip_grad_norm_([p for p in inner.parameters() if p.requires_grad], config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr_now = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1

        step_loss, step_input_tokens = _all_reduce_sum([step_loss, float(step_input_tokens)], device)
        mean_loss = step_loss / max(step_tokens, 1)
        tokens_seen += int(step_input_tokens)
        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": mean_loss, "lr": lr_now, "tokens": int(step_input_tokens), "elapsed_s": elapsed}
        history.append(record)
        if bar is not None:
            bar.update(1)
            if step % config.log_every == 0 or step == total_steps:
                bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}", lr=f"{lr_now:.2e}")
        if callback is not None and is_main:
            callback(step, record)

        if has_val and ((config.eval_every and step % config.eval_every == 0) or step == total_steps):
            if not evals or evals[-1]["step"] != step:
                run_eval(step)
        if config.save_every and step % config.save_every == 0 and step < total_steps:
            checkpoint(step)
        _barrier()

    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    adapter_dir = None
    if out is not None:
        adapter_dir = out / "adapter"
        save_on_main(inner, out / "final")
        if not has_val:
            save_on_main(inner, adapter_dir)
        if is_main:
            log = {
                "config": dataclasses.asdict(config),
                "steps": step,
                "world_size": world,
                "best_step": best_step,
                "best_val_loss": best_loss,
                "history": history,
                "evals": evals,
            }
            _write_json(out / "train_log.json", log)
            if config.plot:
                plot_loss_curve(history, evals, out / "loss_curve.png")
        _barrier()
    return TrainResult(
        steps=step,
        best_step=best_step,
        best_val_loss=best_loss,
        final_train_loss=history[-1]["loss"] if history else None,
        adapter_dir=adapter_dir,
        history=history,
        evals=evals,
        seconds=seconds,
        tokens_per_second=tokens_seen / max(seconds, 1e-9),
    )


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def load_best(model: nn.Module, output_dir: os.PathLike | str) -> None:
    """Load the adapter saved under ``output_dir/adapter`` back into ``model`` (DenseLoRA)."""
    from ..io import load_adapter

    inner = unwrap(model)
    if not isinstance(inner, DenseLoRAModel):
        raise ArgumentError("load_best works on DenseLoRA models; for PEFT use PeftModel.load_adapter")
    _, tensors = load_adapter(Path(output_dir) / "adapter")
    state = inner.adapter_state()
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(tensors[name].to(tensor.device, tensor.dtype))


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
