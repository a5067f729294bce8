"""Fast CPU inference: the fused Rust kernel of the DenseLoRA branch, the same math as the
reference `denselora.method.functional.dense_branch` in one pass.

``fused_branch`` computes ``scale * act_d(decoder @ (m @ act_e(encoder @ x_i)))`` for every row
``x_i`` of ``x`` in one call, with SIMD (AVX2 + FMA where the CPU has it) and f32 accumulation:

- ``x`` and ``out``: float32, float16 or bfloat16 (the same dtype); ``encoder``, ``m``,
  ``decoder``: float32, float16 or bfloat16 (one dtype for the three).
- numpy arrays are read in place (bfloat16 travels as ``uint16`` bit patterns, numpy having no
  bfloat16); CPU torch tensors are accepted too and viewed without a copy (`denselora.io.arrays`). Inputs must be
  C-contiguous: anything else raises `LayoutError` naming the argument.
- The vector code is chosen at run time (`isa`): AVX-512 (16 lanes; with AVX512-BF16 dot
  products for bfloat16 against bfloat16 weights, ``"avx512bf16"``), else AVX2 + FMA, else
  portable code. ``DENSELORA_KERNEL_ISA=avx512bf16|avx512|avx2|portable`` in the environment (read
  once, at the first call), or `set_isa` at any time, chooses another one the CPU has
  (`available_isas`); ``DENSELORA_KERNEL_PORTABLE=1`` still forces the portable path. Backends
  agree to rounding, not bit for bit.
- The GIL is released while the kernel runs; it uses `get_num_threads` threads (by default
  ``torch.get_num_threads()``), and only splits work large enough to gain from it.
- `fused_routed_branch` is the same kernel for a batch whose rows belong to different adapters
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

from .. import _core
from ..errors import ArgumentError, DTypeError, ShapeError
from ..io import arrays

ArrayLike = Union[np.ndarray, torch.Tensor]
#: One activation for both sides, or an (encoder side, decoder side) pair.
Activations = Union[str, tuple[str, str]]

_num_threads: Optional[int] = None


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


def _array(value: ArrayLike, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        return arrays.view(value, name)
    raise DTypeError(f"{name}: expected a numpy array or a CPU torch tensor, got {type(value).__name__}")


def _sides(activation: Activations) -> tuple[str, str]:
    return (activation, activation) if isinstance(activation, str) else (activation[0], activation[1])


def fused_branch(
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
    xa = _array(x, "x")
    ea, ma, da = _array(encoder, "encoder"), _array(m, "m"), _array(decoder, "decoder")
    out = _output(x, xa, da, out)
    _core.fused_branch(xa, ea, ma, da, _array(out, "out"), **_options(scale, activation, check_finite))
    return out


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
    """The branch of a batch whose rows belong to different adapters on one basis (shared encoder
    and decoder): ``scale * act_d(decoder @ (cores[row_core[i]] @ act_e(encoder @ x_i)))`` for
    every row ``x_i`` of ``x`` whose index is not -1; rows with index -1 take no branch (their
    ``out`` is left exactly as it is).

    ``cores`` is (T, r_d, r_e), one core per adapter; ``row_core`` holds one integer index in
    ``-1 .. T-1`` per row, with ``x``'s leading shape (a numpy array, a CPU torch tensor or a
    sequence; int32 is used in place, other integer types are converted). The rest is as in
    `fused_branch`, which this is with a core per row. An index out of range raises
    `ArgumentError` naming its row, before anything is written; with ``check_finite`` only what
    the call reads is checked (rows of ``x`` with a branch, the cores they take).
    """
    xa = _array(x, "x")
    ea, ca, da = _array(encoder, "encoder"), _array(cores, "cores"), _array(decoder, "decoder")
    index = _indices(row_core)
    out = _output(x, xa, da, out)
    _core.fused_routed_branch(xa, ea, ca, da, index, _array(out, "out"), **_options(scale, activation, check_finite))
    return out


def _options(scale: float, activation: Activations, check_finite: bool) -> dict[str, Any]:
    """The keyword arguments of a kernel call."""
    act_e, act_d = _sides(activation)
    return {
        "scale": float(scale),
        "encoder_activation": act_e,
        "decoder_activation": act_d,
        "num_threads": get_num_threads(),
        "check_finite": check_finite,
    }


def _output(x: ArrayLike, xa: np.ndarray, da: np.ndarray, out: Optional[ArrayLike]) -> Any:
    """``out``, or new zeros of ``x``'s kind (numpy or torch), leading shape and dtype."""
    if out is not None:
        return out
    if xa.ndim == 0:
        raise ShapeError("x: expected at least 1 dimension, got a scalar")
    if da.ndim != 2:
        raise ShapeError(f"decoder: expected a 2-D array (out_features, r), got shape {da.shape}")
    shape = xa.shape[:-1] + (da.shape[0],)
    return torch.zeros(shape, dtype=x.dtype) if isinstance(x, torch.Tensor) else np.zeros(shape, dtype=xa.dtype)


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


# -- the adapted layers' path to the kernel ---------------------------------------------------

#: Half-precision calls with more rows than this are left to PyTorch unless the kernel is forced:
#: its matmuls use the CPU's native bf16/f16 dot products, which the kernel measured slower
#: against on prefill (benches/results/kernel.json); decoding stays on the kernel.
AUTO_HALF_MAX_ROWS = 32

# The binding's names for the activation dtype of `PreparedBranch.add_unchecked`.
KERNEL_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class KernelPath:
    """One adapted layer's way to the fused kernel at CPU inference: the kernel's view of the
    layer's E, M and D (no copy; prepared again only when a parameter is replaced or changed in
    place, or the scale or activations change), and which calls the kernel serves."""

    def __init__(self) -> None:
        # (what the prepared weights were built from, the prepared weights or None when the
        # kernel cannot take these parameters).
        self._prepared: Optional[tuple[tuple[Any, ...], Optional[_core.PreparedBranch]]] = None

    def __getstate__(self) -> dict[str, Any]:
        # Prepared weights point into this process's memory: copies and pickles prepare their own.
        return {"_prepared": None}

    def add_(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        encoder: torch.Tensor,
        m: torch.Tensor,
        decoder: torch.Tensor,
        *,
        scale: float,
        activation: tuple[str, str],
        force: bool = False,
    ) -> bool:
        """Add the branch of ``x`` into ``out`` in place when the kernel can run this call, and say
        whether it did. Unless ``force``, large half-precision calls are left to PyTorch
        (`AUTO_HALF_MAX_ROWS`)."""
        dtype = KERNEL_DTYPES.get(x.dtype)
        if dtype is None or not (x.is_cpu and out.is_cpu) or out.dtype != x.dtype or not out.is_contiguous():
            return False
        prepared = self._weights(encoder, m, decoder, scale, activation)
        rows = out.numel() // out.shape[-1] if out.dim() else 0
        if (
            prepared is None
            or x.shape[-1] != prepared.in_features
            or out.shape[-1] != prepared.out_features
            or x.numel() != rows * prepared.in_features
        ):
            return False
        if not force and x.dtype != torch.float32 and rows > AUTO_HALF_MAX_ROWS:
            return False
        if not x.is_contiguous():
            x = x.contiguous()
        # Addresses of tensors checked above: CPU, contiguous, the kernel's dtype and sizes.
        prepared.add_unchecked(x.data_ptr(), out.data_ptr(), rows, dtype, get_num_threads())
        return True

    def _weights(
        self, encoder: torch.Tensor, m: torch.Tensor, decoder: torch.Tensor, scale: float, activation: tuple[str, str]
    ) -> Optional[_core.PreparedBranch]:
        key = (
            m.data_ptr(),
            encoder.data_ptr(),
            decoder.data_ptr(),
            m._version,
            encoder._version,
            decoder._version,
            scale,
            activation,
        )
        if self._prepared is not None and self._prepared[0] == key:
            return self._prepared[1]
        prepared = None
        tensors = (encoder, m, decoder)
        if all(t.is_cpu and t.dtype == encoder.dtype for t in tensors) and encoder.dtype in arrays.CORE_DTYPES:
            # The arrays share memory with the parameters and keep their storage alive, so a new
            # parameter cannot reuse an address the key remembers.
            views = [arrays.view(t.contiguous(), name) for t, name in zip(tensors, ("encoder", "m", "decoder"))]
            prepared = _core.PreparedBranch(*views, scale=scale, encoder_activation=activation[0], decoder_activation=activation[1])
        self._prepared = (key, prepared)
        return prepared


__all__ = ["AUTO_HALF_MAX_ROWS", "KernelPath", "available_isas", "fused_branch", "fused_routed_branch", "get_num_threads", "isa", "set_isa", "set_num_threads"]
