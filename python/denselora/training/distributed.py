"""Training across processes: ranks and collectives of ``torch.distributed`` (a no-op in a single
process), unwrapping DDP, and the FSDP wrapping policy of DenseLoRA models."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..errors import ArgumentError
from ..method.model import SHARED_ATTR


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over all processes."""
    if rank_and_world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def all_gather(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(model, FullyShardedDataParallel)


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
