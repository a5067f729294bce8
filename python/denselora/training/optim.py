"""Optimizers for DenseLoRA adapters. Shared encoder/decoder tensors sum gradients from every layer
of their group while each ``M_l`` sees one layer, so they get their own parameter groups (and
learning rates, scaled by ``shared_lr_ratio`` / ``m_lr_ratio``)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

#: The learning rate of the default configuration (AdamW, warmup then linear decay), used alike by
#: `TrainConfig`, ``denselora train`` and the demo. It was picked on the method study's tasks
#: (docs/method_study.md): the default configuration steps like LoRA and trains best near LoRA's
#: rate; 1e-2 diverges on some tasks. The paper preset moves the model about 25x less per step and
#: needs ``PAPER_LR``.
DEFAULT_LR = 3e-3
#: The learning rate the paper preset needs (its scale alpha/r and GELU on both sides shrink each step).
PAPER_LR = 1e-2
#: The learning rate of each preset (``DenseLoRAConfig.preset`` names).
PRESET_LRS = {"default": DEFAULT_LR, "paper": PAPER_LR}


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    shared_lr_ratio: float = 1.0,
    m_lr_ratio: float = 1.0,
) -> list[dict[str, Any]]:
    """Trainable parameters of ``model`` split into shared (encoder/decoder), per-layer (M) and any
    other trainable ones, each with its learning rate."""
    shared: list[nn.Parameter] = []
    per_layer: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".denselora_shared." in f".{name}":
            shared.append(param)
        elif name.endswith(".m"):
            per_layer.append(param)
        else:
            other.append(param)
    groups = [
        {"params": shared, "lr": lr * shared_lr_ratio, "weight_decay": weight_decay, "name": "shared"},
        {"params": per_layer, "lr": lr * m_lr_ratio, "weight_decay": weight_decay, "name": "m"},
        {"params": other, "lr": lr, "weight_decay": weight_decay, "name": "other"},
    ]
    return [g for g in groups if g["params"]]


def create_optimizer(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    shared_lr_ratio: Optional[float] = None,
    m_lr_ratio: Optional[float] = None,
) -> torch.optim.AdamW:
    """AdamW over the adapter's parameter groups. Ratios default to the adapter config's
    ``shared_lr_ratio`` / ``m_lr_ratio`` when it has them, else 1."""
    config = getattr(model, "denselora_config", None)
    if shared_lr_ratio is None:
        shared_lr_ratio = float(getattr(config, "shared_lr_ratio", 1.0) or 1.0)
    if m_lr_ratio is None:
        m_lr_ratio = float(getattr(config, "m_lr_ratio", 1.0) or 1.0)
    groups = param_groups(model, lr, weight_decay=weight_decay, shared_lr_ratio=shared_lr_ratio, m_lr_ratio=m_lr_ratio)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


__all__ = ["DEFAULT_LR", "PAPER_LR", "PRESET_LRS", "create_optimizer", "param_groups"]
