"""Adapter algebra: averaging several runs into one adapter, rank truncation, and families.

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
- ``build_family(sources, out, rank=...)``: one shared basis for several adapters of one base model,
  each adapter kept as a tenant (its cores only) on it; see `build_family`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import _core
from .errors import ArgumentError, IncompatibleAdapterError, NotMergeableError
from .io import arrays
from .io.adapter import load_adapter, save_adapter_to
from .io.basis import BASIS_KEY, BasisSource, basis_groups, fingerprint, is_shared_tensor, is_tenant, resolve_basis, tenant_config
from .io.bundle import pack
from .io.peft import lora_adapter, save_peft_lora
from .io.sources import PathLike, split_source
from .method.config import DenseLoRAConfig
from .method.functional import activation_fn

AdapterSource = Union[PathLike, tuple[Mapping[str, Any], Mapping[str, torch.Tensor]]]
MODES = ("auto", "linear", "aligned")
DECODER_ALIGNMENTS = ("product", "procrustes")
NONLINEAR_METHODS = ("aligned", "stack")


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


# -- families -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyReport:
    """What ``build_family`` did. ``errors[tenant][module]`` is the relative error of the tenant's
    layer on the family's basis: of the update ``||dW' - dW|| / ||dW||`` for a linear family (exact
    up to the chosen rank), of the branch output on ``samples`` standard Gaussian inputs (not used
    for the fit) otherwise. ``ranks[group]`` = (encoder rank, decoder rank) of the basis."""

    linear: bool
    measure: str
    basis: str
    fingerprint: str
    ranks: dict[str, tuple[int, int]]
    errors: dict[str, dict[str, float]]
    output: Optional[str] = None
    basis_config: dict[str, Any] = field(default_factory=dict, repr=False)
    basis_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    tenants: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)

    def max_error(self, tenant: Optional[str] = None) -> float:
        chosen = [self.errors[tenant]] if tenant is not None else list(self.errors.values())
        return max((e for layers in chosen for e in layers.values()), default=0.0)

    def table(self) -> str:
        kind = "linear: relative error of each update" if self.linear else f"non-linear: {self.measure}"
        lines = [f"basis {self.basis!r} (fingerprint {self.fingerprint}); {kind}"]
        lines.append("ranks (encoder x decoder): " + ", ".join(f"{g} {e}x{d}" for g, (e, d) in self.ranks.items()))
        lines.append(f"{'tenant':<20} {'module':<44} {'rel. error':>11}")
        for tenant, layers in self.errors.items():
            lines.append(f"{tenant:<20} {'(max)':<44} {self.max_error(tenant):>11.3e}")
            for module, err in layers.items():
                lines.append(f"{'':<20} {module:<44} {err:>11.3e}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _source_name(source: AdapterSource, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        path, entry = split_source(source, None)
        return entry if entry is not None else path.name
    return f"adapter{index}"


def _family_groups(label: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """{group: [modules]} of a full adapter, checked to hold its shared tensors."""
    if is_tenant(config):
        raise IncompatibleAdapterError(f"adapter {label}: is a tenant (cores only); a family is built from full adapters")
    groups: dict[str, list[str]] = {}
    for module, group in sorted(dict(config.get("groups") or {}).items()):
        groups.setdefault(group, []).append(module)
    if not groups:
        raise IncompatibleAdapterError(f"adapter {label}: its config names no groups")
    return groups


def _check_family(loaded: Sequence[tuple[str, dict[str, Any], dict[str, torch.Tensor]]]) -> dict[str, list[str]]:
    """Every adapter must adapt the same modules of the same base model in the same groups, with the
    same shapes and activations; the first error names the adapter that differs from the first."""
    first_label, first_config, first_tensors = loaded[0]
    groups = _family_groups(first_label, first_config, first_tensors)
    base = first_config.get("base_model_name_or_path")
    acts = DenseLoRAConfig.from_saved(dict(first_config)).activations
    for label, config, tensors in loaded[1:]:
        other_base = config.get("base_model_name_or_path")
        if base and other_base and other_base != base:
            raise IncompatibleAdapterError(
                f"adapter {label}: adapts base model {other_base!r}, but {first_label} adapts {base!r}"
            )
        if _family_groups(label, config, tensors) != groups:
            raise IncompatibleAdapterError(
                f"adapter {label}: its modules and groups differ from those of {first_label} "
                f"(a family shares each group's basis, so every adapter must adapt the same modules in the same groups)"
            )
        other_acts = DenseLoRAConfig.from_saved(dict(config)).activations
        if other_acts != acts:
            raise IncompatibleAdapterError(f"adapter {label}: activations {other_acts}, but {first_label} has {acts}")
        for group in groups:
            for side, axis in (("encoder", 1), ("decoder", 0)):
                key = f"shared.{group}.{side}"
                if key not in tensors:
                    raise IncompatibleAdapterError(f"adapter {label}: tensor {key!r} is missing")
                if tensors[key].shape[axis] != first_tensors[key].shape[axis]:
                    raise IncompatibleAdapterError(
                        f"adapter {label}: tensor {key!r} has shape {list(tensors[key].shape)}, but "
                        f"{first_label} has {list(first_tensors[key].shape)} (another base model?)"
                    )
    return groups


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _top_basis(stack: torch.Tensor, rank: Optional[int]) -> torch.Tensor:
    """Orthonormal basis (as columns) of the column space of ``stack``: its top left singular vectors,
    as many as ``rank`` or, when None, as the numerical rank (so the family is exact)."""
    u, sv, _ = torch.linalg.svd(stack, full_matrices=False)
    if rank is None:
        tol = sv[0] * max(stack.shape) * torch.finfo(torch.float64).eps if sv.numel() else 0.0
        keep = max(1, int((sv > tol).sum()))
    else:
        keep = min(rank, sv.numel())
    return u[:, :keep]


def _linear_family(
    loaded: Sequence[tuple[str, dict[str, Any], dict[str, torch.Tensor]]],
    groups: Mapping[str, list[str]],
    rank: Optional[int],
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """Shared E = top right singular vectors of the stacked encoders, D = top left singular vectors of
    the side-by-side decoders; each core ``M' = D^T (s_k D_k M_k E_k) E^T / s'`` with ``s' = s_k``
    (a tenant keeps its config, so its scale): the orthogonal projection of each update onto the
    family's row and column spaces, exact when they span them."""
    shared: dict[str, torch.Tensor] = {}
    cores: list[dict[str, torch.Tensor]] = [{} for _ in loaded]
    errors: list[dict[str, float]] = [{} for _ in loaded]
    for group, modules in groups.items():
        encoders = [_f64(t[f"shared.{group}.encoder"]) for _, _, t in loaded]
        decoders = [_f64(t[f"shared.{group}.decoder"]) for _, _, t in loaded]
        e_new = _top_basis(torch.cat(encoders, 0).T, rank).T  # R_e x in, orthonormal rows
        d_new = _top_basis(torch.cat(decoders, 1), rank)  # out x R_d, orthonormal columns
        shared[f"shared.{group}.encoder"], shared[f"shared.{group}.decoder"] = e_new, d_new
        for k, (_, _, tensors) in enumerate(loaded):
            # The update and its projection in small coordinates: orthonormal bases of [D, D_k]
            # (out x <= R_d + r) and [E^T, E_k^T] hold both, so the residual's norm is exact
            # without forming out x in (a difference of squared norms would cancel near zero).
            q_d = torch.linalg.qr(torch.cat([d_new, decoders[k]], 1)).Q
            q_e = torch.linalg.qr(torch.cat([e_new.T, encoders[k].T], 1)).Q
            left, right = d_new.T @ decoders[k], encoders[k] @ e_new.T
            small_d, small_e = q_d.T @ decoders[k], encoders[k] @ q_e
            p_d, p_e = q_d.T @ d_new, q_e.T @ e_new.T
            for module in modules:
                m = _f64(tensors[f"{module}.m"])
                core = left @ m @ right  # s_k cancels: the tenant keeps the scale of its config
                cores[k][f"{module}.m"] = core
                update = small_d @ m @ small_e
                total = float(torch.linalg.norm(update))
                residual = float(torch.linalg.norm(update - p_d @ core @ p_e.T))
                errors[k][module] = residual / total if total > 0 else 0.0
    return shared, cores, errors


def _nonlinear_family(
    loaded: Sequence[tuple[str, dict[str, Any], dict[str, torch.Tensor]]],
    groups: Mapping[str, list[str]],
    acts: tuple[str, str],
    method: str,
    samples: int,
    seed: int,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[dict[str, float]]]:
    """Non-linear branches. ``aligned``: the basis is the average of the adapters' shared factors
    after aligning each one's latents to the first's (``average(mode="aligned",
    decoder_alignment="procrustes")``), and each layer's core is refit by least squares so that
    ``D M' act_e(E x)`` matches the adapter's own ``D_k M_k act_e(E_k x)`` on Gaussian inputs.
    ``stack``: the encoders' rows are stacked as they are (an elementwise activation keeps each
    adapter's latents ``act_e(E_k x)`` as a block of ``act_e(E x)``) and the decoder is an
    orthonormal basis of the decoders' column space, so each core ``D^T D_k M_k`` placed on its block
    is exact, at the joint rank. Either way the error is judged on other Gaussian inputs."""
    gen = torch.Generator().manual_seed(seed)
    cores: list[dict[str, torch.Tensor]] = [{} for _ in loaded]
    errors: list[dict[str, float]] = [{} for _ in loaded]
    act_e, act_d = (activation_fn(a) for a in acts)
    if method == "stack":
        shared = {}
        for group in groups:
            shared[f"shared.{group}.encoder"] = torch.cat([_f64(t[f"shared.{group}.encoder"]) for _, _, t in loaded], 0)
            shared[f"shared.{group}.decoder"] = _top_basis(torch.cat([_f64(t[f"shared.{group}.decoder"]) for _, _, t in loaded], 1), None)
    else:
        pairs = [(config, tensors) for _, config, tensors in loaded]
        averaged = average(pairs, mode="aligned", decoder_alignment="procrustes").tensors if len(pairs) > 1 else pairs[0][1]
        shared = {k: _f64(v) for k, v in averaged.items() if is_shared_tensor(k)}
    for group, modules in groups.items():
        e_new, d_new = shared[f"shared.{group}.encoder"], shared[f"shared.{group}.decoder"]
        fit_x = torch.randn(samples, e_new.shape[1], generator=gen, dtype=torch.float64)
        test_x = torch.randn(samples, e_new.shape[1], generator=gen, dtype=torch.float64)
        h_pinv = torch.linalg.pinv(act_e(fit_x @ e_new.T)) if method != "stack" else None  # R_e x n
        d_pinv = torch.linalg.pinv(d_new)  # R_d x out (D^T when orthonormal)
        h_test = act_e(test_x @ e_new.T)
        offset = 0
        for k, (_, _, tensors) in enumerate(loaded):
            e_k, d_k = _f64(tensors[f"shared.{group}.encoder"]), _f64(tensors[f"shared.{group}.decoder"])
            h_k_test = act_e(test_x @ e_k.T)
            if h_pinv is None:
                # This adapter's block of the stacked latents: r_k x R_e selection.
                fit_map = torch.zeros(e_k.shape[0], e_new.shape[0], dtype=torch.float64)
                fit_map[:, offset : offset + e_k.shape[0]] = torch.eye(e_k.shape[0], dtype=torch.float64)
                offset += e_k.shape[0]
            else:
                fit_map = act_e(fit_x @ e_k.T).T @ h_pinv.T  # r_k x R_e
            dec_map = d_pinv @ d_k  # R_d x r_k
            for module in modules:
                m_k = _f64(tensors[f"{module}.m"])
                # Least squares on the decoder's pre-activation: min ||H M'^T D^T - H_k M_k^T D_k^T||
                # is solved by M'^T = H^+ (H_k M_k^T D_k^T) (D^T)^+.
                core = dec_map @ m_k @ fit_map
                cores[k][f"{module}.m"] = core
                # The branch output act_d(D M act_e(E x)) on the test inputs (the scale, the same on
                # both sides, cancels in the relative error).
                want = act_d(h_k_test @ m_k.T @ d_k.T)
                got = act_d(h_test @ core.T @ d_new.T)
                norm = float(torch.linalg.norm(want))
                errors[k][module] = float(torch.linalg.norm(got - want)) / norm if norm > 0 else 0.0
    return shared, cores, errors


def build_family(
    sources: Sequence[AdapterSource],
    out: Optional[PathLike] = None,
    rank: Optional[int] = None,
    names: Optional[Sequence[str]] = None,
    *,
    basis_name: str = "basis",
    nonlinear: str = "aligned",
    samples: int = 1024,
    seed: int = 0,
) -> FamilyReport:
    """Compress full adapters of one base model into a family: one shared basis and, per adapter,
    a tenant holding only its cores. With ``out`` (a ``.dl`` path) the family is written as a new
    bundle: the basis entry ``basis_name`` (a full adapter: the shared factors with the first
    adapter's cores) and one tenant entry per adapter, named by ``names`` (default: the directory or
    bundle entry names).

    Linear adapters (``identity`` on both sides) are projected onto the joint row space of their
    encoders and column space of their decoders: exact up to ``rank`` (default: the full joint rank,
    at most the sum of the adapters' ranks; cores may be wider than each adapter's ``r``). Each
    tenant keeps its own config (``r``, ``alpha``, scaling), hence its scale. Non-linear adapters
    (``nonlinear="aligned"``, the default) are aligned to the first and averaged into a basis of
    their rank ``r``, and each core is refit by least squares; the report gives the branch output's
    error on ``samples`` random inputs, which is not zero. ``nonlinear="stack"`` keeps every
    adapter's encoder rows side by side instead: exact, with cores as wide as the sum of the ranks.
    """
    if isinstance(sources, (str, os.PathLike)) or not isinstance(sources, Sequence) or not sources:
        raise ArgumentError("sources must be a non-empty list of adapters")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ArgumentError(f"rank must be a positive integer, got {rank!r}")
    if nonlinear not in NONLINEAR_METHODS:
        raise ArgumentError(f"nonlinear must be one of {NONLINEAR_METHODS}, got {nonlinear!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ArgumentError(f"samples must be a positive integer, got {samples!r}")
    _check_target(out)
    tenant_names = list(names) if names is not None else [_source_name(s, i) for i, s in enumerate(sources)]
    if len(tenant_names) != len(sources):
        raise ArgumentError(f"names: {len(tenant_names)} names for {len(sources)} adapters")
    if len(set(tenant_names)) != len(tenant_names) or basis_name in tenant_names:
        raise ArgumentError(f"names must be distinct and differ from the basis name {basis_name!r}: {tenant_names}")
    loaded = [_load(source, i) for i, source in enumerate(sources)]
    loaded = [(f"{name!r} ({label})", config, tensors) for name, (label, config, tensors) in zip(tenant_names, loaded)]
    groups = _check_family(loaded)
    parsed = [DenseLoRAConfig.from_saved(dict(config)) for _, config, _ in loaded]
    acts = parsed[0].activations
    linear = parsed[0].is_linear
    if linear:
        shared, cores, errors = _linear_family(loaded, groups, rank)
        measure = "relative error of the update"
    else:
        if rank is not None:
            raise ArgumentError("rank applies to linear families only (activations 'identity' on both sides)")
        shared, cores, errors = _nonlinear_family(loaded, groups, acts, nonlinear, samples, seed)
        measure = f"{nonlinear}: relative error of the branch output on {samples} standard Gaussian inputs"
    as_f32 = {k: v.to(torch.float32).contiguous() for k, v in shared.items()}
    first_config = dict(loaded[0][1])
    basis_config = {k: v for k, v in first_config.items() if k != BASIS_KEY}
    basis_tensors = {**as_f32, **{k: v.to(torch.float32) for k, v in cores[0].items()}}
    fp = fingerprint(basis_config, basis_tensors)
    ranks = {g: (int(as_f32[f"shared.{g}.encoder"].shape[0]), int(as_f32[f"shared.{g}.decoder"].shape[1])) for g in groups}
    groups_of_basis = basis_groups(as_f32)
    tenants: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
    for name, (_, config, _), tenant_cores in zip(tenant_names, loaded, cores):
        tenants[name] = (tenant_config(config, fp, groups_of_basis), {k: v.to(torch.float32) for k, v in tenant_cores.items()})
    if out is not None:
        pack(out, {basis_name: (basis_config, basis_tensors), **tenants})
    return FamilyReport(
        linear=linear,
        measure=measure,
        basis=basis_name,
        fingerprint=fp,
        ranks=ranks,
        errors=dict(zip(tenant_names, errors)),
        output=None if out is None else os.fspath(out),
        basis_config=basis_config,
        basis_tensors=basis_tensors,
        tenants=tenants,
    )


def export_tenant_lora(tenant: PathLike, out: PathLike, basis: Optional[BasisSource] = None) -> None:
    """Write a tenant of a linear family as an ordinary PEFT LoRA (``A = E_g``, ``B = D_g @ M_l``,
    ``lora_alpha / r`` = the tenant's scale), for PEFT and LoRA servers. ``basis`` (a directory,
    ``bundle.dl:name`` or ``(bundle, name)``) defaults to the full adapter of the tenant's bundle
    whose fingerprint it names (`denselora.io.basis.resolve_basis`); a different basis raises
    `BasisMismatchError`."""
    path, entry = split_source(tenant, None)
    config, cores = load_adapter(tenant)
    if not is_tenant(config):
        raise ArgumentError(
            f"{os.fspath(tenant)}: not a tenant (its config names no basis); export a full adapter with DenseLoRAModel.export_lora"
        )
    parsed = DenseLoRAConfig.from_saved(dict(config))
    if not parsed.is_linear:
        raise NotMergeableError(
            f"tenant {os.fspath(tenant)}: activations {parsed.activations}; only an 'identity' branch is a LoRA"
        )
    _, shared, _ = resolve_basis(config, path, entry, basis)
    layers = {}
    for module, group in sorted(config["groups"].items()):
        decoder, m = shared[f"shared.{group}.decoder"].double(), cores[f"{module}.m"].double()
        layers[module] = (shared[f"shared.{group}.encoder"], decoder @ m)
    peft_config, tensors = lora_adapter(
        layers, parsed.scale, base_model_name_or_path=config.get("base_model_name_or_path")
    )
    save_peft_lora(out, peft_config, tensors)


__all__ = [
    "AverageReport",
    "FamilyReport",
    "build_family",
    "export_tenant_lora",
    "GroupAlignment",
    "GroupTruncation",
    "LayerError",
    "TruncateReport",
    "average",
    "truncate",
]
