"""The methods the studies compare: a DenseLoRA adapter (the library's `build_adapter_model`) or
the PEFT LoRA baseline on the same targets, rank and alpha."""

from __future__ import annotations

from typing import Any, Sequence

import torch.nn as nn

from denselora.errors import ConfigError
from denselora.method.config import DEFAULT_TARGET_MODULES
from denselora.training import build_adapter_model as build_denselora

METHODS = ("denselora", "lora", "vera")


def build_adapter_model(
    base: nn.Module,
    method: str = "denselora",
    *,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.05,
    target_modules: Sequence[str] = tuple(DEFAULT_TARGET_MODULES),
    **options: Any,
) -> nn.Module:
    """``base`` with a fresh adapter of ``method``: DenseLoRA (``options`` as the library's
    `build_adapter_model` takes them: ``preset``, ``activation``, any `DenseLoRAConfig` field) or
    a PEFT LoRA (``"lora"``) or VeRA (``"vera"``: frozen random shared projections of rank ``r``,
    trained per-layer scaling vectors)."""
    if method == "denselora":
        return build_denselora(base, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, **options)
    if method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:  # pragma: no cover - peft is in the test extra
            raise ConfigError("method 'lora' needs the peft package: pip install peft") from exc
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
        return get_peft_model(base, config)
    if method == "vera":
        from peft import VeraConfig, get_peft_model

        vera = VeraConfig(r=r, vera_dropout=dropout, target_modules=list(target_modules), projection_prng_key=0)
        return get_peft_model(base, vera)
    raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
