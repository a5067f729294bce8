"""What to train and how: `build_adapter_model` (a fresh DenseLoRA adapter from a preset and
overrides) and `TrainConfig` (steps, batches, schedule, precision, checkpoints)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch.nn as nn

from ..errors import ConfigError
from ..method.config import DEFAULT_TARGET_MODULES, DenseLoRAConfig
from ..method.model import DenseLoRAModel, get_denselora_model
from .optim import DEFAULT_LR

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def build_adapter_model(
    base: nn.Module,
    *,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.05,
    target_modules: Sequence[str] = tuple(DEFAULT_TARGET_MODULES),
    activation: Optional[str] = None,
    preset: str = "default",
    **options: Any,
) -> DenseLoRAModel:
    """``base`` with a fresh DenseLoRA adapter from ``preset`` (``"default"`` or ``"paper"``);
    ``activation`` and ``options`` (any other `DenseLoRAConfig` field: ``scaling``, ``m_init``,
    ``shared_lr_ratio`` ...) override it."""
    if activation is not None:
        options["activation"] = activation
    config = DenseLoRAConfig.from_preset(preset, r=r, alpha=alpha, dropout=dropout, target_modules=list(target_modules), **options)
    return get_denselora_model(base, config)


@dataclass
class TrainConfig:
    """How to train. A step is one optimizer update over a global batch of
    ``micro_batch_size * gradient_accumulation_steps * world_size`` examples."""

    lr: float = DEFAULT_LR
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
