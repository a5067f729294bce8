"""The DenseLoRA branch as plain tensor operations: the reference every faster path must match."""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="none")


_ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": _gelu,
    "identity": _identity,
    "silu": F.silu,
}

Activations = Union[str, tuple[str, str]]


def split_activations(activation: Activations) -> tuple[str, str]:
    """One name for both sides, or an (encoder side, decoder side) pair."""
    if isinstance(activation, str):
        return activation, activation
    encoder_side, decoder_side = activation
    return encoder_side, decoder_side


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
    activation: Activations,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``scale * drop(act(D @ M @ drop(act(E @ drop(x)))))`` over the last dimension of ``x``.

    ``encoder`` is (r_e x in), ``m`` is (r_d x r_e), ``decoder`` is (out x r_d). Dropout acts in the
    three places of the paper's code and only when ``training``. ``activation`` is one name for
    both sides or an (encoder side, decoder side) pair.
    """
    encoder_side, decoder_side = split_activations(activation)
    act_e, act_d = activation_fn(encoder_side), activation_fn(decoder_side)
    p = dropout if training else 0.0
    h = act_e(F.linear(F.dropout(x, p, training=p > 0), encoder))
    h = F.dropout(h, p, training=p > 0)
    y = act_d(F.linear(F.linear(h, m), decoder))
    return F.dropout(y, p, training=p > 0) * scale
