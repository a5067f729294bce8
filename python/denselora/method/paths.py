"""Who computes an adapted layer's branch: one knob, ``branch_path``.

- ``"auto"`` (the default): the fused Rust kernel for CPU inference whenever it can run the call
  (and PyTorch is not measured faster there), the efficient autograd path in training, the
  reference ops otherwise;
- ``"reference"``: the plain tensor operations of `functional.dense_branch`;
- ``"efficient"``: the memory-lean autograd function of `autograd.efficient_branch`;
- ``"compiled"``: ``torch.compile`` of the reference (minutes to compile on a CPU);
- ``"fused"``: the kernel (`denselora.kernels.fused`), and `ArgumentError` for a call it cannot
  run: training, wanted gradients, GPU tensors, dtypes it does not take.

All compute the same branch, up to rounding. The kernel adds the branch into the base layer's
output (`DenseLoRALayer.forward`); `DenseLoRALayer.branch`, which returns it, runs on PyTorch, where
``"fused"`` chooses as ``"auto"`` does.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError
from .autograd import efficient_branch
from .functional import dense_branch

BRANCH_PATHS = ("auto", "reference", "efficient", "compiled", "fused")

# What "auto" runs in training, per device type. CPU (benches/bench_train.py): 0.71x LoRA's and about
# half the reference's saved activations, step time within the run-to-run noise of the reference's.
# CUDA: the same function (its memory saving does not depend on the device); not yet measured
# there, so "compiled" is available only by setting.
_AUTO_TRAINING = {"cpu": "efficient", "cuda": "efficient"}


def check_branch_path(name: Any, where: str = "branch_path") -> str:
    if not isinstance(name, str) or name not in BRANCH_PATHS:
        raise ConfigError(f"{where} must be one of {BRANCH_PATHS}, got {name!r}")
    return name


def tensor_path(path: str, device: torch.device, needs_grad: bool) -> str:
    """The PyTorch path that computes a branch: ``"reference"``, ``"efficient"`` or ``"compiled"``.
    ``needs_grad``: gradients are wanted or the layer is in training mode; otherwise "auto" runs the
    reference ops, which then keep nothing for backward."""
    if device.type not in _AUTO_TRAINING:
        return "reference"  # meta and other devices: no generator-based masks there
    if path in ("auto", "fused"):
        return _AUTO_TRAINING[device.type] if needs_grad else "reference"
    return path


def compute(
    path: str,
    x: torch.Tensor,
    encoder: torch.Tensor,
    m: torch.Tensor,
    decoder: torch.Tensor,
    *,
    needs_grad: bool,
    **kw: Any,
) -> torch.Tensor:
    """The branch of ``x`` by the PyTorch path that ``path`` chooses (`tensor_path`); ``kw`` as
    `functional.dense_branch` takes them."""
    chosen = tensor_path(path, x.device, needs_grad)
    if chosen == "efficient":
        return efficient_branch(x, encoder, m, decoder, **kw)
    if chosen == "compiled":
        return compiled_branch(x, encoder, m, decoder, **kw)
    return _reference(dense_branch, x, encoder, m, decoder, **kw)


def _reference(fn: Callable[..., torch.Tensor], x: torch.Tensor, encoder: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
    # Without autocast the reference runs in the adapter's dtype (the efficient path casts inside).
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(encoder.dtype)
    return fn(x, encoder, *args, **kw)


_compiled: Optional[Callable[..., torch.Tensor]] = None
_compile_failed = False


def compiled_branch(x: torch.Tensor, encoder: torch.Tensor, m: torch.Tensor, decoder: torch.Tensor, **kw: Any) -> torch.Tensor:
    """``torch.compile`` of the reference branch (its partitioner recomputes the cheap wide
    elementwise ops instead of saving them); the efficient path if compiling is not possible."""
    global _compiled, _compile_failed
    if not _compile_failed:
        try:
            if _compiled is None:
                _compiled = torch.compile(dense_branch, dynamic=True)
            return _reference(_compiled, x, encoder, m, decoder, **kw)
        except Exception as exc:  # a missing compiler or backend: fall back for the whole process
            _compile_failed = True
            warnings.warn(f"torch.compile of the DenseLoRA branch failed ({type(exc).__name__}: {exc}); using the efficient path", RuntimeWarning, stacklevel=2)
    return efficient_branch(x, encoder, m, decoder, **kw)
