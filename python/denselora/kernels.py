"""Fast CPU inference: the fused Rust kernel of the DenseLoRA branch.

``dense_branch`` computes ``scale * act_d(decoder @ (m @ act_e(encoder @ x_i)))`` for every row
``x_i`` of ``x`` in one call, with SIMD (AVX2 + FMA where the CPU has it) and f32 accumulation:

- ``x`` and ``out``: float32, float16 or bfloat16 (the same dtype); ``encoder``, ``m``,
  ``decoder``: float32, float16 or bfloat16 (one dtype for the three).
- numpy arrays are read in place (bfloat16 travels as ``uint16`` bit patterns, numpy having no
  bfloat16); CPU torch tensors are accepted too and viewed without a copy. Inputs must be
  C-contiguous: anything else raises `LayoutError` naming the argument.
- The vector code is chosen at run time (`isa`): AVX-512 (16 lanes; with AVX512-BF16 dot
  products for bfloat16 against bfloat16 weights, ``"avx512bf16"``), else AVX2 + FMA, else
  portable code. ``DENSELORA_KERNEL_ISA=avx512bf16|avx512|avx2|portable`` in the environment (read
  once, at the first call), or `set_isa` at any time, chooses another one the CPU has
  (`available_isas`); ``DENSELORA_KERNEL_PORTABLE=1`` still forces the portable path. Backends
  agree to rounding, not bit for bit.
- The GIL is released while the kernel runs; it uses `get_num_threads` threads (by default
  ``torch.get_num_threads()``), and only splits work large enough to gain from it.
- ``fused_routed_branch`` is the same kernel for a batch whose rows belong to different adapters
  on one basis (shared encoder and decoder): each row takes its own core from a stack, or none.
- NaN policy: non-finite values propagate as in IEEE arithmetic (and as in PyTorch): a NaN in
  row ``i`` of ``x`` makes row ``i`` of the branch NaN, a NaN weight reaches every row. With
  ``check_finite=True`` any NaN or infinity in an input raises `NonFiniteError` naming the
  argument, before anything is written.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch

from . import _core
from .errors import ArgumentError, DTypeError, ShapeError
from .functional import Activations, split_activations

ArrayLike = Union[np.ndarray, torch.Tensor]

_num_threads: Optional[int] = None

# torch dtype -> (numpy view dtype, is bfloat16 bits)
_TORCH_VIEWS = {
    torch.float32: None,
    torch.float16: None,
    torch.bfloat16: torch.uint16,
}


def set_num_threads(num_threads: Optional[int]) -> None:
    """Threads the kernel may use; ``None`` follows ``torch.get_num_threads()``."""
    global _num_threads
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ArgumentError(f"num_threads: expected a positive int or None, got {num_threads!r}")
    _num_threads = num_threads


def get_num_threads() -> int:
    """Threads the kernel uses: the `set_num_threads` value, else ``torch.get_num_threads()``."""
    return _num_threads if _num_threads is not None else torch.get_num_threads()


def isa() -> str:
    """The kernel's vector backend in use: ``"avx512bf16"``, ``"avx512"``, ``"avx2"`` or
    ``"portable"``."""
    return _core.kernel_isa()


def available_isas() -> list[str]:
    """The backends this CPU can run, widest first (``"portable"`` last)."""
    return list(_core.kernel_available_isas())


def set_isa(name: Optional[str]) -> None:
    """Use the backend ``name`` (one of `available_isas`) from now on, process-wide; ``None``
    restores the default. Raises `ArgumentError` for an unknown name or one this CPU lacks."""
    if name is not None and not isinstance(name, str):
        raise ArgumentError(f"isa: expected a str or None, got {type(name).__name__}")
    _core.kernel_set_isa(name)


def as_array(value: ArrayLike, name: str) -> np.ndarray:
    """A numpy view of ``value`` (no copy); torch bfloat16 becomes uint16 bits."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ArgumentError(f"{name}: the kernel runs on CPU tensors, got one on {value.device}")
        if value.dtype not in _TORCH_VIEWS:
            raise DTypeError(f"{name}: unsupported dtype {value.dtype} (expected float32, float16 or bfloat16)")
        view = _TORCH_VIEWS[value.dtype]
        t = value.detach()
        return (t.view(view) if view is not None else t).numpy()
    raise DTypeError(f"{name}: expected a numpy array or a CPU torch tensor, got {type(value).__name__}")


def dense_branch(
    x: ArrayLike,
    encoder: ArrayLike,
    m: ArrayLike,
    decoder: ArrayLike,
    *,
    scale: float,
    activation: Activations,
    out: Optional[ArrayLike] = None,
    check_finite: bool = False,
) -> Any:
    """``scale * act_d(decoder @ (m @ act_e(encoder @ x_i)))`` for every row of ``x``.

    ``x`` is (..., in), ``encoder`` (r_e, in), ``m`` (r_d, r_e), ``decoder`` (out, r_d);
    ``activation`` is one of ``"gelu"`` (exact erf form), ``"identity"``, ``"silu"``, or an
    (encoder side, decoder side) pair. Without ``out`` a new (..., out) array is returned (a
    torch tensor when ``x`` is one); with ``out`` the branch is added into it in place and
    ``out`` is returned.
    """
    xa = as_array(x, "x")
    ea, ma, da = as_array(encoder, "encoder"), as_array(m, "m"), as_array(decoder, "decoder")
    result, oa = _output(x, xa, da, out)
    _core.fused_branch(xa, ea, ma, da, oa, **_options(scale, activation, check_finite))
    return result


def fused_routed_branch(
    x: ArrayLike,
    encoder: ArrayLike,
    cores: ArrayLike,
    decoder: ArrayLike,
    row_core: Any,
    *,
    scale: float,
    activation: Activations,
    out: Optional[ArrayLike] = None,
    check_finite: bool = False,
) -> Any:
    """The routed branch of a batch whose rows belong to different adapters on one basis:
    ``scale * act_d(decoder @ (cores[row_core[i]] @ act_e(encoder @ x_i)))`` for every row
    ``x_i`` of ``x`` whose index is not -1; rows with index -1 take no branch (their ``out`` is
    left exactly as it is).

    ``cores`` is (T, r_d, r_e), one core per adapter; ``row_core`` holds one integer index in
    ``-1 .. T-1`` per row, with ``x``'s leading shape (a numpy array, a CPU torch tensor or a
    sequence; int32 is used in place, other integer types are converted). The rest is as in
    `dense_branch`, which this is with a core per row. An index out of range raises
    `ArgumentError` naming its row, before anything is written; with ``check_finite`` only what
    the call reads is checked (rows of ``x`` with a branch, the cores they take).
    """
    xa = as_array(x, "x")
    ea, ca, da = as_array(encoder, "encoder"), as_array(cores, "cores"), as_array(decoder, "decoder")
    index = _indices(row_core)
    result, oa = _output(x, xa, da, out)
    _core.fused_routed_branch(xa, ea, ca, da, index, oa, **_options(scale, activation, check_finite))
    return result


def _options(scale: float, activation: Activations, check_finite: bool) -> dict[str, Any]:
    """The keyword arguments of a kernel call."""
    act_e, act_d = split_activations(activation)
    return {
        "scale": float(scale),
        "encoder_activation": act_e,
        "decoder_activation": act_d,
        "num_threads": get_num_threads(),
        "check_finite": check_finite,
    }


def _output(x: ArrayLike, xa: np.ndarray, da: np.ndarray, out: Optional[ArrayLike]) -> tuple[Any, np.ndarray]:
    """What a kernel call returns (``out``, or new zeros of ``x``'s kind, leading shape and
    dtype) and the numpy array the kernel adds into."""
    if out is not None:
        return out, as_array(out, "out")
    if xa.ndim == 0:
        raise ShapeError("x: expected at least 1 dimension, got a scalar")
    if da.ndim != 2:
        raise ShapeError(f"decoder: expected a 2-D array (out_features, r), got shape {da.shape}")
    result: Any = np.zeros(xa.shape[:-1] + (da.shape[0],), dtype=xa.dtype)
    oa = result
    if isinstance(x, torch.Tensor):
        result = torch.from_numpy(result)
        if x.dtype == torch.bfloat16:
            result = result.view(torch.bfloat16)
    return result, oa


_INT32 = np.iinfo(np.int32)


def _indices(row_core: Any) -> np.ndarray:
    """Core indices as the kernel takes them: C-contiguous int32 (int32 input is not copied)."""
    if isinstance(row_core, torch.Tensor):
        if row_core.device.type != "cpu":
            raise ArgumentError(f"row_core: the kernel runs on CPU tensors, got one on {row_core.device}")
        row_core = row_core.detach().numpy()
    a = np.asarray(row_core)
    if a.dtype == np.int32:
        return np.ascontiguousarray(a)
    if a.size == 0:
        return np.zeros(a.shape, dtype=np.int32)
    if a.dtype.kind not in "iu":
        raise DTypeError(f"row_core: expected integer core indices, got {a.dtype}")
    wide = np.flatnonzero((a < _INT32.min) | (a > _INT32.max))
    if wide.size:
        row = int(wide[0])
        raise ArgumentError(f"row_core: row {row} has core index {a.flat[row]}, out of the int32 range")
    return np.ascontiguousarray(a, dtype=np.int32)


__all__ = ["available_isas", "dense_branch", "fused_routed_branch", "get_num_threads", "isa", "set_isa", "set_num_threads"]
