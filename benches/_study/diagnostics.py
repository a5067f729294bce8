"""Training diagnostics for adapters: gradient and update norms per parameter group and per layer,
and the size and effective rank of each adapted layer's update of its output on a batch.

Works on a `DenseLoRAModel` and on PEFT LoRA models (or any model whose adapted layers keep the
frozen layer as ``base_layer``), so the two methods can be compared on the same inputs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from denselora.errors import ArgumentError
from denselora.method.layer import DenseLoRALayer


def parameter_group(name: str) -> str:
    """The optimizer group of an adapter parameter: ``shared`` (DenseLoRA encoder/decoder), ``m``
    (DenseLoRA per-layer matrices), ``lora_A`` / ``lora_B`` (PEFT) or ``other``."""
    if ".denselora_shared." in f".{name}":
        return "shared"
    if name.endswith(".m"):
        return "m"
    for part in ("lora_A", "lora_B"):
        if f".{part}." in name:
            return part
    return "other"


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _group_norms(per_tensor: Mapping[str, float]) -> dict[str, float]:
    squares: dict[str, float] = defaultdict(float)
    for name, value in per_tensor.items():
        squares[parameter_group(name)] += value * value
    return {group: math.sqrt(total) for group, total in squares.items()}


def gradient_norms(model: nn.Module) -> dict[str, Any]:
    """L2 norms of the current gradients: ``{"tensors": {name: norm}, "groups": {group: norm}}``.
    Parameters without a gradient count as zero."""
    tensors = {
        name: (float(param.grad.detach().float().norm()) if param.grad is not None else 0.0)
        for name, param in _trainable(model)
    }
    return {"tensors": tensors, "groups": _group_norms(tensors)}


class UpdateTracker:
    """Records gradient norms and the norms of what each optimizer step changed, per tensor and per
    group; ``history`` holds one record per step.

    Two ways to use it: in your own loop, call `before_step()` after ``backward()`` and before
    ``optimizer.step()``, then `after_step()`. Around a loop you do not control (e.g.
    `denselora.training.train`), call `attach()` before training and pass `on_step` as the step
    callback: gradient norms are then read by hooks when gradients are accumulated (before any
    clipping), and updates are measured between consecutive callbacks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.history: list[dict[str, Any]] = []
        self._snapshot: Optional[dict[str, torch.Tensor]] = None
        self._grads: Optional[dict[str, Any]] = None
        self._hooked: dict[str, float] = {}
        self._handles: list[Any] = []

    def attach(self) -> UpdateTracker:
        for name, param in _trainable(self.model):
            def hook(p: torch.Tensor, name: str = name) -> None:
                # Called after each accumulation; the last call of a step sees the full gradient.
                self._hooked[name] = float(p.grad.detach().float().norm()) if p.grad is not None else 0.0

            self._handles.append(param.register_post_accumulate_grad_hook(hook))
        self._snapshot = {name: param.detach().float().clone() for name, param in _trainable(self.model)}
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_step(self, step: int, _record: Any = None) -> None:
        """Step callback for an external loop (after the optimizer step of ``step``)."""
        tensors = {name: self._hooked.get(name, 0.0) for name, _ in _trainable(self.model)}
        self._grads = {"tensors": tensors, "groups": _group_norms(tensors)}
        self._hooked = {}
        self.after_step(step)
        self._snapshot = {name: param.detach().float().clone() for name, param in _trainable(self.model)}

    def before_step(self) -> None:
        self._grads = gradient_norms(self.model)
        self._snapshot = {name: param.detach().float().clone() for name, param in _trainable(self.model)}

    def after_step(self, step: Optional[int] = None) -> dict[str, Any]:
        if self._snapshot is None or self._grads is None:
            raise ArgumentError("UpdateTracker.after_step() called without before_step()")
        updates: dict[str, float] = {}
        relative: dict[str, float] = {}
        for name, param in _trainable(self.model):
            before = self._snapshot[name]
            delta = float((param.detach().float() - before).norm())
            updates[name] = delta
            size = float(before.norm())
            relative[name] = delta / size if size > 0 else math.inf if delta > 0 else 0.0
        record = {
            "step": len(self.history) if step is None else step,
            "grad": self._grads,
            "update": {"tensors": updates, "groups": _group_norms(updates)},
            "relative_update": relative,
        }
        self.history.append(record)
        self._snapshot = self._grads = None
        return record


def effective_rank(matrix: torch.Tensor, energy: float = 0.99) -> dict[str, float]:
    """Effective ranks of a 2-D matrix: ``entropy`` (exp of the Shannon entropy of the normalised
    singular values, Roy & Vetterli 2007) and ``energy`` (the fewest singular values holding
    ``energy`` of the squared Frobenius norm). A zero matrix has rank 0 on both."""
    if matrix.dim() != 2:
        raise ArgumentError(f"effective_rank needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not 0 < energy <= 1:
        raise ArgumentError(f"energy must be in (0, 1], got {energy!r}")
    s = torch.linalg.svdvals(matrix.detach().double())
    total = float(s.sum())
    if total == 0.0:
        return {"entropy": 0.0, "energy": 0.0}
    p = s / total
    p = p[p > 0]
    entropy_rank = float(torch.exp(-(p * p.log()).sum()))
    cumulative = torch.cumsum(s * s, 0) / float((s * s).sum())
    energy_rank = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype) - 1e-12)) + 1
    return {"entropy": entropy_rank, "energy": float(min(energy_rank, len(s)))}


def _adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every adapted layer; a `DenseLoRAModel` reports paths in its base model,
    as in its ``groups``."""
    found = []
    root = model.base_model if hasattr(model, "adapter_layers") and hasattr(model, "base_model") else model
    for path, module in root.named_modules():
        if isinstance(module, DenseLoRALayer) or (hasattr(module, "base_layer") and hasattr(module, "lora_A")):
            found.append((path, module))
    return found


def _layer_delta(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the adapter adds to ``layer``'s output for input ``x`` (no dropout)."""
    if isinstance(layer, DenseLoRALayer):
        return layer.branch(x).float()
    delta = None
    for name in getattr(layer, "active_adapters", list(layer.lora_A.keys())):
        if name not in layer.lora_A:
            continue
        a, b = layer.lora_A[name], layer.lora_B[name]
        part = b(a(x.to(a.weight.dtype))).float() * float(layer.scaling[name])
        delta = part if delta is None else delta + part
    if delta is None:
        return torch.zeros_like(layer.base_layer(x)).float()
    return delta


@torch.no_grad()
def layer_updates(
    model: nn.Module, inputs: Mapping[str, Any] | torch.Tensor, energy: float = 0.99, rank_rows: int = 256
) -> dict[str, dict[str, float]]:
    """Run ``model`` on one batch and, for every adapted layer, measure the update ``delta_y`` the
    adapter adds to its output (DenseLoRA: ``s * act(D M_l act(E x))``; LoRA: ``s * B A x``) over all
    tokens of the batch: its Frobenius norm, its norm relative to the base output ``W0 x``, and its
    effective rank as a (tokens x out) matrix, from at most ``rank_rows`` of its token rows. The
    model runs in eval mode (no dropout)."""
    layers = _adapted_layers(model)
    if not layers:
        raise ArgumentError(f"{type(model).__name__} has no adapted layers to measure")
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for path, layer in layers:
        hooks.append(layer.register_forward_pre_hook(lambda mod, args, path=path: captured.__setitem__(path, args[0].detach())))
    was_training = model.training
    model.eval()  # no dropout, neither in the forward nor in the branches measured below
    try:
        if isinstance(inputs, torch.Tensor):
            model(inputs)
        else:
            model(**inputs)
        for hook in hooks:
            hook.remove()
        hooks = []
        results: dict[str, dict[str, float]] = {}
        for path, layer in layers:
            if path not in captured:
                continue
            x = captured[path]
            delta = _layer_delta(layer, x)
            delta = delta.reshape(-1, delta.shape[-1])
            base = layer.base_layer(x).float().reshape(delta.shape)
            norm = float(delta.norm())
            base_norm = float(base.norm())
            # The rank from at most `rank_rows` token rows, evenly spaced: an SVD of every token of a
            # batch costs seconds per layer at d = 1536, and a few hundred rows of a rank-<=r update
            # already show its spectrum.
            rows = delta if delta.shape[0] <= rank_rows else delta[torch.linspace(0, delta.shape[0] - 1, rank_rows).long()]
            ranks = effective_rank(rows, energy)
            results[path] = {
                "norm": norm,
                "relative_norm": norm / base_norm if base_norm > 0 else math.inf,
                "rms": norm / math.sqrt(delta.numel()),
                "entropy_rank": ranks["entropy"],
                "energy_rank": ranks["energy"],
            }
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return results


def shared_gradient_contributions(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, dict[str, list[torch.Tensor]]]:
    """Each layer's share of the gradient of the loss on one batch with respect to its group's shared
    encoder ``E`` and decoder ``D``: ``{group: {"encoder": [C_l], "decoder": [C_l]}}`` in float64,
    one entry per layer in model order. The shares sum to the gradient of the shared tensors. The
    model runs in eval mode (no dropout) on ``inputs``, which must carry ``labels``; no ``.grad``
    is touched, so this can run between optimizer steps."""
    from denselora.method.functional import activation_fn

    layers = [(path, layer) for path, layer in _adapted_layers(model) if isinstance(layer, DenseLoRALayer)]
    if not layers:
        raise ArgumentError(f"{type(model).__name__} has no DenseLoRA layers")
    if "labels" not in inputs:
        raise ArgumentError("shared_gradient_contributions needs inputs with 'labels' (the loss is differentiated)")
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, path=path: seen.__setitem__(path, (args[0].detach(), out)))
        for path, layer in layers
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            loss = model(**inputs).loss
            paths = [path for path, _ in layers if path in seen and seen[path][1].requires_grad]
            if not paths:
                raise ArgumentError("no adapted layer's output depends on a trainable tensor: nothing to differentiate")
            out_grads = torch.autograd.grad(loss, [seen[path][1] for path in paths])
        by_path = dict(layers)
        contributions: dict[str, dict[str, list[torch.Tensor]]] = {}
        for path, g in zip(paths, out_grads):
            layer = by_path[path]
            shared = layer.shared
            e, m, d = (t.detach().double().requires_grad_(True) for t in (shared.encoder, layer.m, shared.decoder))
            x = seen[path][0].reshape(-1, shared.in_features).double()
            act_e, act_d = (activation_fn(name) for name in layer.activation)
            with torch.enable_grad():
                y = layer.scaling * act_d(act_e(x @ e.T) @ m.T @ d.T)
                c_e, c_d = torch.autograd.grad(y, (e, d), grad_outputs=g.reshape(y.shape).double())
            group = contributions.setdefault(layer.group, {"encoder": [], "decoder": []})
            group["encoder"].append(c_e)
            group["decoder"].append(c_d)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return contributions


def gradient_agreement(contributions: Iterable[torch.Tensor]) -> dict[str, float]:
    """How far the layers sharing one tensor agree on its gradient: ``l1`` is
    ``|sum_l C_l|_1 / sum_l |C_l|_1`` (1 when every entry's shares have one sign, the measure of the
    first-step analysis) and ``cosine`` the mean cosine of each share with their sum (about
    ``1/sqrt(L)`` for L shares of equal size in unrelated directions)."""
    shares = [c.double().reshape(-1) for c in contributions]
    if not shares:
        raise ArgumentError("gradient_agreement needs at least one contribution")
    total = torch.stack(shares).sum(0)
    l1 = sum(float(c.abs().sum()) for c in shares)
    total_norm = float(total.norm())
    cosines = [float(c @ total) / (float(c.norm()) * total_norm) for c in shares if float(c.norm()) > 0 and total_norm > 0]
    return {
        "l1": float(total.abs().sum()) / l1 if l1 > 0 else 0.0,
        "cosine": sum(cosines) / len(cosines) if cosines else 0.0,
        "layers": float(len(shares)),
    }


def shared_agreement(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """`gradient_agreement` of every group's encoder and decoder on one batch:
    ``{group: {"encoder_l1", "encoder_cosine", "decoder_l1", "decoder_cosine", "layers"}}``."""
    result: dict[str, dict[str, float]] = {}
    for group, factors in shared_gradient_contributions(model, inputs).items():
        row: dict[str, float] = {}
        for factor, shares in factors.items():
            agreement = gradient_agreement(shares)
            row[f"{factor}_l1"], row[f"{factor}_cosine"], row["layers"] = agreement["l1"], agreement["cosine"], agreement["layers"]
        result[group] = row
    return result


def summarize(per_layer: Mapping[str, Mapping[str, float]], keys: Iterable[str] = ("relative_norm", "entropy_rank", "energy_rank")) -> dict[str, dict[str, float]]:
    """Mean of each measure over layers, per module name (``q_proj`` ...) and over all layers."""
    buckets: dict[str, list[Mapping[str, float]]] = defaultdict(list)
    for path, values in per_layer.items():
        buckets[path.rsplit(".", 1)[-1]].append(values)
        buckets["all"].append(values)
    return {name: {k: sum(v[k] for v in rows) / len(rows) for k in keys} for name, rows in buckets.items()}


def _orthonormal(columns: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the column space of ``columns`` (numerical rank only)."""
    u, s, _ = torch.linalg.svd(columns.double(), full_matrices=False)
    keep = s > s[0] * 1e-6 if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return u[:, keep]


def _lora_factors(directory: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A, B)}`` of a PEFT LoRA directory (``A`` r x in, ``B`` out x r)."""
    from safetensors.torch import load_file

    tensors = load_file(f"{directory}/adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
            out[module] = (a.double(), tensors[key.replace("lora_A", "lora_B")].double())
    return out


def _subspaces(directory: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (Q_in, Q_out)}``: orthonormal bases of the input directions a layer's
    adapter reads and the output directions it writes. DenseLoRA: the row space of its group's
    encoder ``E_g`` and the column space of its decoder ``D_g``; PEFT LoRA: of the layer's ``A``
    and ``B``."""
    from denselora.io.adapter import load_adapter
    from denselora.io.peft import is_peft_lora

    if is_peft_lora(directory):
        return {m: (_orthonormal(a.T), _orthonormal(b)) for m, (a, b) in _lora_factors(directory).items()}
    config, tensors = load_adapter(directory)
    per_group = {
        g: (_orthonormal(tensors[f"shared.{g}.encoder"].double().T), _orthonormal(tensors[f"shared.{g}.decoder"].double()))
        for g in set(config["groups"].values())
    }
    return {module: per_group[group] for module, group in config["groups"].items()}


def basis_capture(lora_dir: str, reference_dir: str) -> dict[str, dict[str, float]]:
    """How much of a PEFT LoRA's update lies in the subspaces of another adapter, per layer:
    ``captured = ||P_out dW P_in|| / ||dW||`` for ``dW = B A`` of the layer (Frobenius), with
    ``P_in``/``P_out`` the projectors on the input and output subspaces of ``reference_dir``'s
    adapter at that layer (`_subspaces`: a DenseLoRA adapter's shared ``E_g``/``D_g``, or another
    LoRA's ``A``/``B``, e.g. a second seed). ``random`` is what subspaces of the same dimensions
    drawn at random would capture on average (``sqrt(r_in r_out / (in out))``)."""
    reference = _subspaces(reference_dir)
    results: dict[str, dict[str, float]] = {}
    for module, (a, b) in sorted(_lora_factors(lora_dir).items()):
        if module not in reference:
            continue
        q_in, q_out = reference[module]
        # P_out (B A) P_in through the thin factors: (Q_out^T B)(A Q_in) has the same norm.
        inner = (q_out.T @ b) @ (a @ q_in)
        total = float(torch.linalg.matrix_norm(b @ a))
        results[module] = {
            "captured": float(torch.linalg.matrix_norm(inner)) / total if total > 0 else 0.0,
            "random": math.sqrt(q_in.shape[1] * q_out.shape[1] / (a.shape[1] * b.shape[0])),
        }
    if not results:
        raise ArgumentError(f"{lora_dir} and {reference_dir} adapt no module in common")
    return results
