"""torch tensors <-> numpy arrays: the form in which tensors cross into the Rust core.

One policy for bfloat16, which numpy lacks: it travels as its raw 16-bit patterns (a ``uint16``
array) in both directions, and the core names the dtype beside every array it returns
(``("BF16", array)``). Arrays view the tensor's memory whenever it is on the CPU and contiguous.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..errors import ArgumentError, DTypeError

#: The tensor dtypes the core computes with (bfloat16 as its bit patterns).
CORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Integers of each element width: float bits as integers, for the core's in-place dropout.
_INTEGERS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def view(tensor: torch.Tensor, name: str) -> np.ndarray:
    """A numpy view of a CPU tensor's memory (no copy, any layout): float32 and float16 as they
    are, bfloat16 as ``uint16`` bits."""
    if tensor.device.type != "cpu":
        raise ArgumentError(f"{name}: expected a CPU tensor, got one on {tensor.device}")
    if tensor.dtype not in CORE_DTYPES:
        raise DTypeError(f"{name}: unsupported dtype {tensor.dtype} (expected float32, float16 or bfloat16)")
    t = tensor.detach()
    if t.dtype == torch.bfloat16:
        # Through int16: torch has no uint16 numpy conversion before 2.3.
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def to_numpy(tensor: torch.Tensor, name: str = "tensor") -> np.ndarray:
    """``tensor``'s values as a C-contiguous CPU array: a view when the tensor already is one, a
    copy otherwise. A tensor of a dtype the core does not take (`CORE_DTYPES`) is converted to
    float32 first."""
    if not isinstance(tensor, torch.Tensor):
        raise ArgumentError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    t = tensor.detach().cpu()
    if t.dtype not in CORE_DTYPES:
        t = t.float()
    return view(t.contiguous(), name)


# numpy dtypes that the core takes as numpy holds them (bfloat16 needs ``view``'s bit patterns).
_AS_IS = (np.dtype(np.float32), np.dtype(np.float16))


def to_numpy_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``to_numpy`` of every tensor of a mapping. An adapter holds hundreds of small tensors, so the
    common case (a CPU tensor of float32 or float16, C-contiguous, not requiring grad) is viewed
    directly; any other goes through ``to_numpy`` and its checks."""
    out = {}
    for name, t in tensors.items():
        array = None
        if isinstance(t, torch.Tensor):
            try:
                array = t.numpy()
            except (TypeError, RuntimeError):
                pass  # bfloat16, not on the CPU, or requiring grad
        if array is None or array.dtype not in _AS_IS or not array.flags.c_contiguous:
            array = to_numpy(t, name)
        out[name] = array
    return out


def to_tensor(dtype: str, array: np.ndarray) -> torch.Tensor:
    """The tensor of one of the core's ``(dtype name, array)`` pairs, sharing the array's memory
    when it is contiguous; ``"BF16"`` arrives as ``uint16`` bits."""
    array = np.ascontiguousarray(array)
    if dtype == "BF16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def integer_view(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU float tensor's bits as integers of its element width."""
    flat = tensor.detach().view(-1)
    return flat.view(_INTEGERS[flat.element_size()]).numpy()
