"""The adapted layer: a frozen base linear layer plus the DenseLoRA branch. Math only: who computes
the branch is chosen in `paths.py` (and the fused kernel's use in `denselora.kernels`); injection,
saving and switching live in `model.py`."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import ArgumentError, ConfigError, NotMergeableError
from ..kernels import KernelPath
from . import paths
from .functional import split_activations


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 style ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def init_m_(m: torch.Tensor, kind: str = "kaiming") -> torch.Tensor:
    """Initialise a layer's ``M`` in place: ``"kaiming"`` (uniform, the ``nn.Linear`` default and
    the paper's), ``"orthogonal"`` (norm-preserving, different in every layer) or ``"identity"``."""
    if m.device.type == "meta":  # no values to set; a loaded adapter fills them
        if kind not in ("kaiming", "orthogonal", "identity"):
            raise ConfigError(f"unknown m_init {kind!r}; expected 'kaiming', 'orthogonal' or 'identity'")
        return m
    with torch.no_grad():
        if kind == "kaiming":
            nn.init.kaiming_uniform_(m, a=math.sqrt(5))
        elif kind == "orthogonal":
            nn.init.orthogonal_(m)
        elif kind == "identity":
            nn.init.eye_(m)
        else:
            raise ConfigError(f"unknown m_init {kind!r}; expected 'kaiming', 'orthogonal' or 'identity'")
    return m


class DenseLoRAShared(nn.Module):
    """The encoder ``E`` (r x in) and decoder ``D`` (out x r) of one group, one parameter each,
    referenced (never copied) by every layer of the group."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        *,
        device: Optional[torch.device] = None,
        decoder_rank: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        decoder_rank = r if decoder_rank is None else decoder_rank
        kw: dict[str, Any] = {"device": device, "dtype": torch.float32}
        self.encoder = nn.Parameter(torch.empty(r, in_features, **kw))
        self.decoder = nn.Parameter(torch.empty(out_features, decoder_rank, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The nn.Linear default for E; D starts at zero so that the adapted model equals the base.
        nn.init.kaiming_uniform_(self.encoder, a=math.sqrt(5))
        nn.init.zeros_(self.decoder)

    @property
    def encoder_rank(self) -> int:
        return self.encoder.shape[0]

    @property
    def decoder_rank(self) -> int:
        return self.decoder.shape[1]


class DenseLoRALayer(nn.Module):
    """``y = base(x) + s * act(D_g @ M_l @ act(E_g @ x))``.

    The shared module is held by reference outside the module tree (it is registered once, on the
    model), so ``parameters()`` and ``state_dict()`` see each shared tensor exactly once.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        shared: DenseLoRAShared,
        group: str,
        *,
        scaling: float,
        activation: str | tuple[str, str],
        dropout: float,
        m_init: str = "kaiming",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.group = group
        self.scaling = scaling
        # (after the encoder, after the decoder); one name means the same on both sides.
        self.encoder_activation, self.decoder_activation = split_activations(activation)
        self.dropout = dropout
        self._shared_ref = (shared,)  # a tuple keeps nn.Module from registering it here
        weight = base_layer.weight
        self.m = nn.Parameter(
            torch.empty(shared.decoder_rank, shared.encoder_rank, device=weight.device, dtype=torch.float32)
        )
        init_m_(self.m, m_init)
        self.disabled = False
        self.merged = False
        self._branch_path = "auto"
        self._kernel = KernelPath()
        # The layer's stack of resident tenants' cores (`tenants.LayerStack`), once the model has any.
        self._routed: Optional[Any] = None

    @property
    def branch_path(self) -> str:
        """Who computes the branch: ``"auto"`` (the default), ``"reference"``, ``"efficient"``,
        ``"compiled"`` or ``"fused"`` (see `denselora.method.paths`)."""
        return self._branch_path

    @branch_path.setter
    def branch_path(self, name: str) -> None:
        self._branch_path = paths.check_branch_path(name)

    @property
    def shared(self) -> DenseLoRAShared:
        return self._shared_ref[0]

    @property
    def activation(self) -> tuple[str, str]:
        return (self.encoder_activation, self.decoder_activation)

    @property
    def is_linear(self) -> bool:
        return self.activation == ("identity", "identity")

    @property
    def weight(self) -> torch.Tensor:
        # Code that inspects ``layer.weight`` (dtype checks, tied weights) sees the base weight.
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    def _factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """E, M, D on ``device``. Shared factors live on one device; layers elsewhere (a model split
        across devices) get a differentiable copy, so gradients still reach the one parameter."""
        shared = self.shared
        encoder, decoder, m = shared.encoder, shared.decoder, self.m
        if encoder.device != device:
            encoder, decoder = encoder.to(device), decoder.to(device)
        if m.device != device:
            m = m.to(device)
        return encoder, m, decoder

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input ``x`` in float32 (the adapter's dtype) or the
        autocast dtype, computed by PyTorch."""
        encoder, m, decoder = self._factors(x.device)
        # In training mode the same path runs with and without grad, so that a checkpointed
        # layer's no-grad forward and its recomputation draw the same dropout masks.
        needs_grad = self.training or (
            torch.is_grad_enabled()
            and (x.requires_grad or encoder.requires_grad or m.requires_grad or decoder.requires_grad)
        )
        return paths.compute(
            self._branch_path,
            x,
            encoder,
            m,
            decoder,
            needs_grad=needs_grad,
            scale=self.scaling,
            activation=self.activation,
            dropout=self.dropout,
            training=self.training,
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        routed = self._routed
        if routed is not None and routed.residents.active:  # a batch whose rows use different tenants
            return routed.forward(x, result)
        if self._branch_path in ("auto", "fused") and self._add_fused(x, result):
            return result
        return result + self.branch(x).to(result.dtype)

    def _add_fused(self, x: torch.Tensor, result: torch.Tensor) -> bool:
        """Add the branch into ``result`` with the fused kernel when this call can use it: CPU
        inference, where no gradient is wanted."""
        forced = self._branch_path == "fused"
        inference = not self.training and not (torch.is_grad_enabled() and self._needs_autograd(x, result))
        if inference:
            # The parameter dictionaries directly: this runs for every layer and token of decoding.
            shared = self._shared_ref[0]._parameters
            added = self._kernel.add_(
                result,
                x,
                shared["encoder"],
                self._parameters["m"],
                shared["decoder"],
                scale=self.scaling,
                activation=self.activation,
                force=forced,
            )
            if added:
                return True
        if forced:
            why = (
                f"input {x.dtype} on {x.device}, output {result.dtype}, adapter {self.m.dtype} on {self.m.device}"
                if inference
                else "the kernel computes no gradients; the layer is in training mode or gradients are wanted"
            )
            raise ArgumentError(f"branch path 'fused': the kernel cannot run this call ({why}); use 'auto' or 'reference'")
        return False

    def _needs_autograd(self, x: torch.Tensor, result: torch.Tensor) -> bool:
        shared = self.shared
        return (
            x.requires_grad
            or result.requires_grad
            or self.m.requires_grad
            or shared.encoder.requires_grad
            or shared.decoder.requires_grad
        )

    # -- merging (linear branch only) ---------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """``s * D @ M @ E`` as (out x in) in float32; defined only for the identity activation."""
        if not self.is_linear:
            raise NotMergeableError(
                f"cannot merge a DenseLoRA layer with activations {self.activation!r}: only 'identity' "
                "is linear and so expressible as a weight update"
            )
        encoder, m, decoder = self._factors(self.base_layer.weight.device)
        return self.scaling * (decoder @ (m @ encoder))

    def _apply_delta(self, sign: float) -> None:
        delta = self.delta_weight()
        weight = self.base_layer.weight
        if is_conv1d(self.base_layer):
            delta = delta.T
        with torch.no_grad():
            weight.copy_((weight.float() + sign * delta).to(weight.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._apply_delta(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._apply_delta(-1.0)
            self.merged = False

    def extra_repr(self) -> str:
        return f"group={self.group!r}, scaling={self.scaling:g}, activation={self.encoder_activation}/{self.decoder_activation}, dropout={self.dropout:g}"
