"""`DenseLoRAConfig`: what to adapt and how, as a dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..errors import ConfigError

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
ACTIVATIONS = ("gelu", "identity", "silu")
SCALINGS = ("standard", "rslora")
M_INITS = ("kaiming", "orthogonal", "identity")

# The paper's released code: GELU on both sides, s = alpha / r, Kaiming-uniform M, one learning rate.
PAPER_SETTINGS: dict[str, Any] = {
    "activation": "gelu",
    "encoder_activation": None,
    "decoder_activation": None,
    "scaling": "standard",
    "m_init": "kaiming",
    "shared_lr_ratio": 1.0,
    "m_lr_ratio": 1.0,
}
PRESETS: dict[str, dict[str, Any]] = {"default": {}, "paper": PAPER_SETTINGS}


@dataclass
class DenseLoRAConfig:
    """Configuration of a DenseLoRA adapter.

    The branch added to each targeted linear layer is ``s * act(D_g @ M_l @ act(E_g @ x))``;
    ``E_g`` and ``D_g`` are shared by every layer of a group (one group per module name and shape),
    ``M_l`` is each layer's own ``r x r`` matrix.

    The defaults (a linear branch, ``s = alpha / sqrt(r)``, orthogonal ``M``) make a step move the
    model about as much as a LoRA step at the same learning rate (docs/method_study.md); the
    paper's released code is `DenseLoRAConfig.paper()` (GELU on both sides, ``s = alpha / r``,
    Kaiming-uniform ``M``).

    Args:
        r: latent width of the shared encoder/decoder.
        alpha: scale numerator; the branch is multiplied by ``alpha / r`` or ``alpha / sqrt(r)``
            (see ``scaling``).
        dropout: dropout probability applied to the input, to ``act(E x)`` and to the branch output
            (training only).
        target_modules: module names (matched against the last component of a module's path, or a
            dotted suffix of it) or one regular expression matched against the full path.
        activation: ``"identity"`` (the default: a linear branch that can be merged into the base
            weights and exported as a LoRA), ``"gelu"`` (exact, as in the paper's code) or ``"silu"``; applied after
            the encoder and after the decoder unless one side is set on its own.
        encoder_activation: overrides ``activation`` after the encoder (``act(E x)``).
        decoder_activation: overrides ``activation`` after the decoder (on the branch output).
        scaling: ``"standard"`` (``s = alpha / r``, the paper's) or ``"rslora"`` (``s = alpha / sqrt(r)``,
            rank-stabilised: the update's size no longer shrinks as ``r`` grows).
        m_init: initial value of each layer's ``M``: ``"kaiming"`` (uniform, as ``nn.Linear``; the
            paper's), ``"orthogonal"`` (a random orthogonal matrix per layer, norm-preserving) or
            ``"identity"``. The decoder starts at zero in every case, so step 0 equals the base model.
        shared_lr_ratio: learning-rate multiplier of the shared encoders/decoders, used by
            `denselora.optim.create_optimizer`.
        m_lr_ratio: learning-rate multiplier of the per-layer ``M`` matrices.
        layers_to_transform: adapt only modules whose path holds one of these layer indices.
        base_model_name_or_path: recorded on save when known; checked when adapters are combined.
        init_fingerprint: a hash of the adapter's initial values, recorded at creation so that runs
            started from the same initial adapter can be recognised.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Union[list[str], str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    activation: str = "identity"
    encoder_activation: Optional[str] = None
    decoder_activation: Optional[str] = None
    scaling: str = "rslora"
    m_init: str = "orthogonal"
    shared_lr_ratio: float = 1.0
    m_lr_ratio: float = 1.0
    layers_to_transform: Optional[list[int]] = None
    base_model_name_or_path: Optional[str] = None
    init_fingerprint: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("activation", "encoder_activation", "decoder_activation"):
            value = getattr(self, name)
            if (value is not None or name == "activation") and value not in ACTIVATIONS:
                raise ConfigError(f"{name} must be one of {ACTIVATIONS}, got {value!r}")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if self.m_init not in M_INITS:
            raise ConfigError(f"m_init must be one of {M_INITS}, got {self.m_init!r}")
        for name in ("shared_lr_ratio", "m_lr_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ConfigError(f"target_modules regex {self.target_modules!r} is invalid: {exc}") from exc
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"target_modules must be a non-empty list of names or a regex, got {self.target_modules!r}")
        if self.layers_to_transform is not None and not all(
            isinstance(i, int) and i >= 0 for i in self.layers_to_transform
        ):
            raise ConfigError(f"layers_to_transform must be non-negative integers, got {self.layers_to_transform!r}")

    @property
    def activations(self) -> tuple[str, str]:
        """(after the encoder, after the decoder), with per-side overrides applied."""
        return (self.encoder_activation or self.activation, self.decoder_activation or self.activation)

    @property
    def is_linear(self) -> bool:
        """True when the branch is linear, so it can be merged and exported as a LoRA."""
        return self.activations == ("identity", "identity")

    @property
    def scale(self) -> float:
        """The branch's multiplier ``s``: ``alpha / r`` (standard) or ``alpha / sqrt(r)`` (rslora)."""
        if self.scaling == "rslora":
            return float(self.alpha) / math.sqrt(self.r)
        return float(self.alpha) / self.r

    @classmethod
    def paper(cls, **overrides: Any) -> DenseLoRAConfig:
        """The configuration of the paper's released code (GELU on both sides, ``s = alpha / r``,
        Kaiming-uniform ``M``, one learning rate); other fields as given."""
        return cls.from_preset("paper", **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DenseLoRAConfig:
        """``"default"`` (the library's defaults) or ``"paper"``, with ``overrides`` on top."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DenseLoRAConfig:
        """Build from a dict; keys that are not config fields (e.g. ``groups``) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> DenseLoRAConfig:
        """Build from a saved adapter's config. Fields missing from configs written before they
        existed take the paper's values, which is what those adapters were trained with, so a
        saved adapter's forward keeps its meaning."""
        if not isinstance(data, dict):
            raise ConfigError("adapter config must be a JSON object")
        return cls.from_dict({**PAPER_SETTINGS, **data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DenseLoRAConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)
