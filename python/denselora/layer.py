"""The adapted layer: a frozen base linear layer plus the DenseLoRA branch. Math only; injection,
saving and switching live in `model.py`."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from . import _core, kernels
from .autograd import compiled_branch, efficient_branch, resolve_impl
from .errors import ArgumentError, ConfigError, NotMergeableError
from .functional import dense_branch, split_activations

INFERENCE_BACKENDS = ("auto", "torch", "rust")
# "auto" sends half-precision calls with more rows than this to PyTorch (prefill); decode stays fused.
_AUTO_HALF_MAX_ROWS = 32

# Weight dtypes the Rust kernel takes (with the integer dtype that carries bfloat16 bits), and
# the names of activation dtypes in `PreparedBranch.add_unchecked`.
_KERNEL_VIEWS: dict[torch.dtype, Optional[torch.dtype]] = {
    torch.float32: None,
    torch.float16: None,
    torch.bfloat16: torch.uint16,
}
_KERNEL_DTYPES: dict[torch.dtype, str] = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


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
        activation: "str | tuple[str, str]",
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
        self._inference_backend = "auto"
        # (what the prepared weights were built from, the kernel's prepared weights or None).
        self._kernel_cache: Optional[tuple[tuple[Any, ...], Optional[_core.PreparedBranch]]] = None

    @property
    def inference_backend(self) -> str:
        """Who computes the branch at inference on CPU: ``"auto"`` (the Rust kernel when it can,
        else PyTorch), ``"torch"``, or ``"rust"`` (the kernel, and an error when it cannot run).
        Training, autograd and GPU tensors always use PyTorch."""
        return self._inference_backend

    @inference_backend.setter
    def inference_backend(self, name: str) -> None:
        if name not in INFERENCE_BACKENDS:
            raise ConfigError(f"inference_backend: expected one of {list(INFERENCE_BACKENDS)}, got {name!r}")
        self._inference_backend = name

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

    # Which autograd path computes the branch: "auto" (the measured best for the device in
    # training, the plain ops in inference), "efficient", "plain" or "compiled".
    branch_impl: str = "auto"

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input ``x`` in float32 (the adapter's dtype) or the
        autocast dtype."""
        encoder, m, decoder = self._factors(x.device)
        # In training mode the same path runs with and without grad, so that a checkpointed
        # layer's no-grad forward and its recomputation draw the same dropout masks.
        training_path = self.training or (
            torch.is_grad_enabled()
            and (x.requires_grad or encoder.requires_grad or m.requires_grad or decoder.requires_grad)
        )
        impl = resolve_impl(self.branch_impl, x.device, training_path, where=f"branch_impl of a {self.group!r} layer")
        kw: dict[str, Any] = {
            "scale": self.scaling,
            "activation": self.activation,
            "dropout": self.dropout,
            "training": self.training,
        }
        if impl == "efficient":
            return efficient_branch(x, encoder, m, decoder, **kw)
        if impl == "compiled":
            return compiled_branch(x, encoder, m, decoder, **kw)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(encoder.dtype)
        return dense_branch(x, encoder, m, decoder, **kw)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        if (
            self._inference_backend != "torch"
            and not self.training
            and x.is_cpu
            and (not torch.is_grad_enabled() or not self._needs_autograd(x, result))
            and self._add_branch_with_kernel(x, result)
        ):
            return result
        return result + self.branch(x).to(result.dtype)

    # -- the Rust kernel (CPU inference) ------------------------------------------------------

    def _needs_autograd(self, x: torch.Tensor, result: torch.Tensor) -> bool:
        shared = self.shared
        return (
            x.requires_grad
            or result.requires_grad
            or self.m.requires_grad
            or shared.encoder.requires_grad
            or shared.decoder.requires_grad
        )

    def __getstate__(self) -> dict[str, Any]:
        # The kernel's prepared weights point into this process's memory: copies and pickles
        # start without them and prepare their own on first use.
        state = self.__dict__.copy()
        state["_kernel_cache"] = None
        return state

    def _kernel_weights(self) -> Optional[_core.PreparedBranch]:
        """The kernel's view of E, M, D (no copy), rebuilt only when a parameter is replaced or
        changed in place, or the scaling or activations change; None when the kernel cannot
        take them."""
        m = self._parameters["m"]
        shared_params = self._shared_ref[0]._parameters
        encoder, decoder = shared_params["encoder"], shared_params["decoder"]
        key = (
            m.data_ptr(),
            encoder.data_ptr(),
            decoder.data_ptr(),
            m._version,
            encoder._version,
            decoder._version,
            self.scaling,
            self.encoder_activation,
            self.decoder_activation,
        )
        cache = self._kernel_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        prepared = None
        tensors = (encoder, m, decoder)
        if all(t.is_cpu and t.dtype == encoder.dtype for t in tensors) and encoder.dtype in _KERNEL_VIEWS:
            # The arrays share memory with the parameters and keep their storage alive, so a new
            # parameter cannot reuse an address the key remembers.
            arrays = [kernels.as_array(t.detach().contiguous(), name) for t, name in zip(tensors, ("encoder", "m", "decoder"))]
            prepared = _core.PreparedBranch(
                *arrays,
                scale=self.scaling,
                encoder_activation=self.encoder_activation,
                decoder_activation=self.decoder_activation,
            )
        self._kernel_cache = (key, prepared)
        return prepared

    def _add_branch_with_kernel(self, x: torch.Tensor, result: torch.Tensor) -> bool:
        """Add the branch into ``result`` in place with the Rust kernel. False when this call
        cannot use it (and the backend is "auto")."""
        prepared = self._kernel_weights()
        dtype = _KERNEL_DTYPES.get(x.dtype)
        rows = result.numel() // result.shape[-1] if result.dim() else 0
        if (
            prepared is None
            or dtype is None
            or result.dtype != x.dtype
            or not result.is_contiguous()
            or x.shape[-1] != prepared.in_features
            or result.shape[-1] != prepared.out_features
            or x.numel() != rows * prepared.in_features
        ):
            if self._inference_backend == "rust":
                raise ArgumentError(
                    f"inference_backend 'rust': the kernel cannot run this call (input {x.dtype}, output "
                    f"{result.dtype}, adapter {self.m.dtype} on {self.m.device}); use 'auto' or 'torch'"
                )
            return False
        if self._inference_backend == "auto" and x.dtype != torch.float32 and rows > _AUTO_HALF_MAX_ROWS:
            # Large half-precision batches: PyTorch's matmuls use the CPU's native bf16/f16 dot
            # products, which the kernel measured slower against (benches/results/kernel.json).
            return False
        if not x.is_contiguous():
            x = x.contiguous()
        # Addresses of tensors checked above: CPU, contiguous, the kernel's dtype and sizes.
        prepared.add_unchecked(x.data_ptr(), result.data_ptr(), rows, dtype, kernels.get_num_threads())
        return True

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
