"""Adapter algebra: averaging several runs into one adapter, and rank truncation.

The arithmetic runs in the Rust core (``denselora._core``) in float64; this module resolves where
adapters come from and go to (directories or ``bundle.dl:name`` entries) and presents the reports.

- ``average(inputs, output)``: ``linear`` is the weighted mean of every tensor (right for runs that
  start from the same initial adapter, e.g. checkpoints of one run, optionally as an exponential
  moving average); ``aligned`` first matches each run's latent coordinates to the first run's
  (a Hungarian assignment on encoder rows, then the decoder side, which no activation constrains),
  then averages. ``auto`` picks ``linear`` exactly when every input records the same
  ``init_fingerprint``.
- ``truncate(input, output, rank=...)`` or ``energy=...``: the best joint low-rank factorization
  of each group's ``D @ M_l`` (both sides with an ``identity`` encoder), keeping the branch scale.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import _core
from .errors import ArgumentError
from .io import arrays
from .io.adapter import load_adapter, save_adapter_to
from .io.sources import PathLike

AdapterSource = Union[PathLike, tuple[Mapping[str, Any], Mapping[str, torch.Tensor]]]
MODES = ("auto", "linear", "aligned")
DECODER_ALIGNMENTS = ("product", "procrustes")


@dataclass(frozen=True)
class GroupAlignment:
    """How well one group's runs matched the reference run (the first input, listed as 0)."""

    group: str
    layers: int
    encoder_activation: str
    encoder_residual_before: list[float]
    encoder_residual_after: Optional[list[float]]
    product_residual_before: list[float]
    product_residual_after: Optional[list[float]]
    refactor_error: Optional[float]


@dataclass(frozen=True)
class AverageReport:
    """What ``average`` did. Residuals are relative Frobenius distances to the reference run of the
    encoder rows and of the products that fix the function (``D @ M_l``, or ``D @ M_l @ E`` with a
    linear encoder), before and after alignment; ``refactor_error`` is the relative error of
    re-expressing the averaged products at the adapter's rank."""

    mode: str
    reason: str
    decoder_alignment: Optional[str]
    inputs: list[str]
    weights: list[float]
    groups: list[GroupAlignment]
    output: Optional[str] = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def table(self) -> str:
        method = f", decoder alignment: {self.decoder_alignment}" if self.decoder_alignment else ""
        lines = [f"mode: {self.mode} ({self.reason}){method}"]
        lines.append("weights: " + ", ".join(f"{n}={w:.4g}" for n, w in zip(self.inputs, self.weights)))
        lines.append(f"{'group':<24} {'layers':>6}  {'encoder residual':>20}  {'product residual':>20}  {'refactor err':>12}")

        def span(before: list[float], after: Optional[list[float]]) -> str:
            if len(before) < 2:
                return "-"
            b = float(np.mean(before[1:]))
            return f"{b:.3g}" if after is None else f"{b:.3g} -> {float(np.mean(after[1:])):.3g}"

        for g in self.groups:
            refactor = "-" if g.refactor_error is None else f"{g.refactor_error:.3g}"
            lines.append(
                f"{g.group:<24} {g.layers:>6}  {span(g.encoder_residual_before, g.encoder_residual_after):>20}  "
                f"{span(g.product_residual_before, g.product_residual_after):>20}  {refactor:>12}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclass(frozen=True)
class LayerError:
    module: str
    relative_error: float


@dataclass(frozen=True)
class GroupTruncation:
    group: str
    encoder_rank_before: int
    decoder_rank_before: int
    encoder_rank: int
    decoder_rank: int
    decoder_singular_values: list[float]
    encoder_spectrum: list[float]
    encoder_dims_kept: Optional[list[int]]
    relative_error: float
    layers: list[LayerError]


@dataclass(frozen=True)
class TruncateReport:
    """Per group: ranks before and after, the spectra that chose them, and the relative error of
    each layer's product (``D @ M_l``, or ``D @ M_l @ E`` with a linear encoder)."""

    input: str
    groups: list[GroupTruncation]
    output: Optional[str] = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def layer_errors(self) -> dict[str, float]:
        return {layer.module: layer.relative_error for g in self.groups for layer in g.layers}

    def table(self) -> str:
        lines = [f"{'module':<48} {'ranks (e x d)':>14} {'rel. error':>11}"]
        for g in self.groups:
            ranks = f"{g.encoder_rank_before}x{g.decoder_rank_before}->{g.encoder_rank}x{g.decoder_rank}"
            lines.append(f"{'group ' + g.group:<48} {ranks:>14} {g.relative_error:>11.3e}")
            for layer in g.layers:
                lines.append(f"  {layer.module:<46} {'':>14} {layer.relative_error:>11.3e}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# -- conversion ---------------------------------------------------------------------------------


def _load(source: AdapterSource, index: int) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    if isinstance(source, tuple):
        if len(source) != 2 or not isinstance(source[0], Mapping) or not isinstance(source[1], Mapping):
            raise ArgumentError(f"inputs[{index}]: expected a path or a (config, tensors) pair")
        return f"inputs[{index}]", dict(source[0]), dict(source[1])
    if not isinstance(source, (str, os.PathLike)):
        raise ArgumentError(f"inputs[{index}]: {type(source).__name__} is not a path or a (config, tensors) pair")
    config, tensors = load_adapter(source)
    return os.fspath(source), config, tensors


def _core_args(name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> tuple[str, str, dict[str, np.ndarray]]:
    return name, json.dumps(dict(config)), arrays.to_numpy_dict(tensors)


def _from_core(config_json: str, raw: Mapping[str, tuple[str, np.ndarray]]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return json.loads(config_json), {k: arrays.to_tensor(d, a) for k, (d, a) in raw.items()}


def _check_target(target: Optional[PathLike]) -> None:
    """Refuse, before any work, an output that is not a path."""
    if target is not None and not isinstance(target, (str, os.PathLike)):
        raise ArgumentError(f"output must be a path, got {type(target).__name__}")


# -- operations ---------------------------------------------------------------------------------


def average(
    inputs: Sequence[AdapterSource],
    output: Optional[PathLike] = None,
    weights: Optional[Sequence[float]] = None,
    mode: str = "auto",
    ema: Optional[float] = None,
    *,
    decoder_alignment: str = "product",
) -> AverageReport:
    """Average adapters into one and write it to ``output`` (a directory or ``bundle.dl:name``;
    nothing is written when it is None). The report also carries the result (``config``, ``tensors``).

    Args:
        inputs: adapter directories, bundle entries (``"all.dl:run1"``) or ``(config, tensors)``
            pairs. The first is the reference run that the others are aligned to; for ``ema`` they
            are checkpoints, oldest first.
        weights: one non-negative weight per input (normalised); uniform by default.
        mode: ``"linear"``, ``"aligned"`` or ``"auto"`` (linear exactly when all inputs record the
            same ``init_fingerprint``).
        ema: exponential moving average with this decay (``avg = ema * avg + (1 - ema) * next``).
        decoder_alignment: ``"product"`` averages the basis-free products ``D @ M_l`` and refactors
            them at the adapter's rank; ``"procrustes"`` rotates each decoder onto the reference's
            (orthogonal Procrustes) and averages the factors.
    """
    if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, Sequence) or not inputs:
        raise ArgumentError("inputs must be a non-empty list of adapters")
    if mode not in MODES:
        raise ArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    if decoder_alignment not in DECODER_ALIGNMENTS:
        raise ArgumentError(f"decoder_alignment must be one of {DECODER_ALIGNMENTS}, got {decoder_alignment!r}")
    if weights is not None and ema is not None:
        raise ArgumentError("give weights or ema, not both")
    _check_target(output)
    loaded = [_core_args(*_load(source, i)) for i, source in enumerate(inputs)]
    weight_list = None if weights is None else [float(w) for w in weights]
    config_json, raw, report_json = _core.average_adapters(
        loaded, mode=mode, weights=weight_list, ema=None if ema is None else float(ema), decoder_alignment=decoder_alignment
    )
    config, tensors = _from_core(config_json, raw)
    if output is not None:
        save_adapter_to(output, config, tensors)
    data = json.loads(report_json)
    groups = [GroupAlignment(**g) for g in data.pop("groups")]
    return AverageReport(
        groups=groups, output=None if output is None else os.fspath(output), config=config, tensors=tensors, **data
    )


def truncate(
    input: AdapterSource,
    output: Optional[PathLike] = None,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
) -> TruncateReport:
    """Reduce each group's rank to ``rank`` (at most, per side) or to the smallest rank keeping
    ``energy`` (0 < energy <= 1) of the squared spectrum, and write the result to ``output``.

    Groups whose rank does not change are copied bit for bit. ``r`` and ``alpha`` in the config are
    kept, so the branch keeps its trained scale; the tensors carry the new ranks (possibly a
    rectangular ``M``), which ``DenseLoRAModel.from_pretrained`` reads from them.
    """
    if (rank is None) == (energy is None):
        raise ArgumentError("give exactly one of rank and energy")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ArgumentError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        raise ArgumentError(f"energy must be in (0, 1], got {energy!r}")
    _check_target(output)
    name, config_json, arrays = _core_args(*_load(input, 0))
    config_out, raw, report_json = _core.truncate_adapter(
        name, config_json, arrays, rank=rank, energy=None if energy is None else float(energy)
    )
    config, tensors = _from_core(config_out, raw)
    if output is not None:
        save_adapter_to(output, config, tensors)
    data = json.loads(report_json)
    groups = [
        GroupTruncation(**{**g, "layers": [LayerError(**layer) for layer in g["layers"]]}) for g in data.pop("groups")
    ]
    return TruncateReport(
        groups=groups, output=None if output is None else os.fspath(output), config=config, tensors=tensors, **data
    )


__all__ = [
    "AverageReport",
    "GroupAlignment",
    "GroupTruncation",
    "LayerError",
    "TruncateReport",
    "average",
    "truncate",
]
