"""What a run leaves on disk, each directory written whole (`denselora.io.atomic`): adapter
directories (the best one, the final one) and the checkpoints that resume a run exactly.

A checkpoint ``checkpoints/step-N/`` holds the adapter once, as an adapter directory (``adapter/``,
loadable like any other), and ``trainer_state.pt``: optimizer, scheduler, gradient scaler, every
rank's RNG state, the step, the loss history and the best validation loss so far. The data order is
a pure function of the seed and the step, so nothing else has to be stored.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import ArgumentError, ConfigError, FormatError
from ..io import basis
from ..io.adapter import load_adapter, save_adapter
from ..io.atomic import atomic_directory
from ..method.model import DenseLoRAModel
from .distributed import is_fsdp, rank_and_world, unwrap

STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"


def save_adapter_dir(model: nn.Module, directory: os.PathLike | str) -> Path:
    """Save the adapter of ``model`` (DenseLoRA, or any model with ``save_pretrained``) to
    ``directory``, replacing it as a whole: it is written beside it and renamed into place, so a
    crash never leaves a mixed directory."""
    with atomic_directory(directory, replace=True) as staging:
        unwrap(model).save_pretrained(staging)
    return Path(directory)


def save_on_main(model: nn.Module, directory: os.PathLike | str) -> None:
    """`save_adapter_dir` from rank 0. Under FSDP every rank must call it: the full tensors are
    gathered (a collective) before rank 0 writes them."""
    rank, _ = rank_and_world()
    if not is_fsdp(model):
        if rank == 0:
            save_adapter_dir(model, directory)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    inner = model.module
    if not isinstance(inner, DenseLoRAModel):
        raise ConfigError("saving under FSDP is supported for DenseLoRA adapters")
    # Copies: the gathered tensors are freed again when the context closes.
    with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True):
        if rank == 0:
            tensors = {k: v.detach().clone() for k, v in inner.adapter_state().items()}
    if rank == 0:
        with atomic_directory(directory, replace=True) as staging:
            save_adapter(staging, inner.adapter_config_dict(), tensors)


def restore_adapter(model: nn.Module, directory: os.PathLike | str) -> None:
    """Load the adapter saved in ``directory`` into ``model``'s DenseLoRA adapter, strictly (same
    tensors and shapes)."""
    inner = unwrap(model)
    if not isinstance(inner, DenseLoRAModel):
        raise ArgumentError(
            f"restoring {directory} needs a DenseLoRA model, got {type(inner).__name__} (for PEFT use PeftModel.load_adapter)"
        )
    config, tensors = load_adapter(directory)
    if basis.is_tenant(config):  # a tenant trained on the model's frozen basis: its cores only
        basis.check_basis(config, inner.shared_fingerprint(), os.fspath(directory), "the model's basis")
        tensors = basis.with_basis(tensors, inner.adapter_state())
    inner.load_adapter_state(tensors, source=os.fspath(directory))


def load_best(model: nn.Module, output_dir: os.PathLike | str) -> None:
    """Load the adapter saved under ``output_dir/adapter`` back into ``model`` (DenseLoRA)."""
    restore_adapter(model, Path(output_dir) / "adapter")


def save_checkpoint(folder: Path, model: nn.Module, state: dict[str, Any]) -> None:
    """Write the checkpoint ``folder``: the adapter of ``model`` and the trainer ``state``."""
    with atomic_directory(folder, replace=True) as staging:
        unwrap(model).save_pretrained(staging / ADAPTER_DIR)
        torch.save(state, staging / STATE_FILE)


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """The trainer state of the checkpoint ``folder`` (its adapter is ``folder / ADAPTER_DIR``)."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trainer state (not a checkpoint folder)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise FormatError(f"{path}: cannot read trainer state: {exc}") from exc


def checkpoints_dir(output_dir: os.PathLike | str) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(folder: Path) -> int:
    _, _, number = folder.name.partition("-")
    return int(number) if number.isdigit() else -1


def latest_checkpoint(output_dir: os.PathLike | str) -> Optional[Path]:
    found = [p for p in sorted(checkpoints_dir(output_dir).glob("step-*"), key=_step_of) if (p / STATE_FILE).is_file()]
    return found[-1] if found else None


def prune_checkpoints(output_dir: os.PathLike | str, keep: int) -> None:
    """Remove all but the ``keep`` latest checkpoints."""
    for old in sorted(checkpoints_dir(output_dir).glob("step-*"), key=_step_of)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """The random generators' states (torch, Python, CUDA): dropout masks and the data order
    continue where they were."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
