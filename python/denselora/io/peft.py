"""PEFT's LoRA format: what `DenseLoRAModel.export_lora` writes (``adapter_config.json`` and
``adapter_model.safetensors``) for PEFT and LoRA servers to load, and how a PEFT adapter directory
is told apart from a DenseLoRA one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .. import _core
from . import arrays
from .atomic import atomic_directory
from .sources import CONFIG_FILE, PathLike

TENSORS_FILE = "adapter_model.safetensors"


def lora_adapter(
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    base_model_name_or_path: Optional[str] = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's config and tensors of a LoRA whose update at each module ``path`` is ``scale * B @ A``
    (``layers[path] = (A, B)``, A: r x in, B: out x r). Ranks may differ per module (``rank_pattern``);
    ``lora_alpha / r = scale`` at every rank."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path, (a, b) in layers.items():
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.detach().float().cpu().contiguous()
        ranks[path] = int(a.shape[0])
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": scale * rank,
        "rank_pattern": {p: r for p, r in ranks.items() if r != rank},
        "alpha_pattern": {p: scale * r for p, r in ranks.items() if r != rank},
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in ranks}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
    return config, tensors


def save_peft_lora(directory: PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a PEFT LoRA adapter (atomically): ``adapter_config.json`` and ``adapter_model.safetensors``."""
    data = arrays.to_numpy_dict(tensors)
    with atomic_directory(directory) as staging:
        _core.save_safetensors(os.fspath(staging / TENSORS_FILE), data, {"format": "pt"})
        _core.write_text_atomic(os.fspath(staging / CONFIG_FILE), json.dumps(dict(config), indent=2) + "\n")


def is_peft_lora(path: PathLike) -> bool:
    """Whether ``path`` is a directory holding a PEFT LoRA (its config says ``"peft_type": "LORA"``),
    which PEFT loads, not this library."""
    config_file = Path(os.fspath(path)) / CONFIG_FILE
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("peft_type") == "LORA"
