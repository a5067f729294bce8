"""The DenseLoRA branch as plain tensor operations: the reference every faster path must match."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="none")


_ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": _gelu,
    "identity": _identity,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATION_FUNCTIONS[name]
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATION_FUNCTIONS)}") from None


def dense_branch(
    x: torch.Tensor,
    encoder: torch.Tensor,
    m: torch.Tensor,
    decoder: torch.Tensor,
    *,
    scale: float,
    activation: str,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``scale * drop(act(D @ M @ drop(act(E @ drop(x)))))`` over the last dimension of ``x``.

    ``encoder`` is (r_e x in), ``m`` is (r_d x r_e), ``decoder`` is (out x r_d). Dropout acts in the
    three places of the paper's code and only when ``training``.
    """
    act = activation_fn(activation)
    p = dropout if training else 0.0
    h = act(F.linear(F.dropout(x, p, training=p > 0), encoder))
    h = F.dropout(h, p, training=p > 0)
    y = act(F.linear(F.linear(h, m), decoder))
    return F.dropout(y, p, training=p > 0) * scale
