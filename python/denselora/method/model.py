"""Injection of DenseLoRA into any PyTorch / transformers model, and the `DenseLoRAModel` wrapper
with PEFT's verbs: trainable-parameter counts, save/load, disabling, merging and LoRA export."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import re
from collections import OrderedDict, defaultdict
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ArgumentError, BasisMismatchError, ConfigError, IncompatibleAdapterError, NotMergeableError
from ..io import arrays
from ..io import basis as _basis
from ..io.adapter import GroupLayout, adapter_layout, open_adapter, save_adapter
from ..io.peft import lora_adapter, save_peft_lora
from ..io.sources import PathLike, split_source
from . import paths, tenants
from .config import DenseLoRAConfig
from .layer import DenseLoRALayer, DenseLoRAShared, is_adaptable, is_conv1d, linear_dims

SHARED_ATTR = "denselora_shared"
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


# -- choosing modules and groups --------------------------------------------------------------


def _matches_target(path: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _layer_index(path: str) -> Optional[int]:
    found = _LAYER_INDEX.search(path)
    return int(found.group(1)) if found else None


def find_target_modules(model: nn.Module, config: DenseLoRAConfig) -> list[str]:
    """Paths of the linear modules ``config`` selects, in model order."""
    paths = []
    for path, module in model.named_modules():
        if not path or isinstance(module, DenseLoRALayer) or ".base_layer" in path:
            continue
        if not is_adaptable(module) or not _matches_target(path, config.target_modules):
            continue
        if config.layers_to_transform is not None and _layer_index(path) not in config.layers_to_transform:
            continue
        paths.append(path)
    if not paths:
        raise ConfigError(
            f"target_modules={config.target_modules!r} (layers_to_transform={config.layers_to_transform}) "
            f"matches no nn.Linear or Conv1D in {type(model).__name__}"
        )
    return paths


def assign_groups(model: nn.Module, paths: list[str]) -> dict[str, str]:
    """Module path -> group: one group per module name, split by shape when a name has several."""
    shapes: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for path in paths:
        shapes[path.rsplit(".", 1)[-1]][path] = linear_dims(model.get_submodule(path))
    groups = {}
    for name, by_path in shapes.items():
        distinct = set(by_path.values())
        for path, (fan_in, fan_out) in by_path.items():
            groups[path] = name if len(distinct) == 1 else f"{name}_{fan_in}x{fan_out}"
    return {p: groups[p] for p in paths}


# -- the wrapper -------------------------------------------------------------------------------


class DenseLoRAModel(nn.Module):
    """A base model with DenseLoRA layers injected. Calls, ``generate`` and unknown attributes go to
    the base model. ``state_dict()`` holds only the adapter's tensors, so generic checkpointing
    (transformers' ``Trainer``, Accelerate) saves the adapter, not the base model."""

    def __init__(self, model: nn.Module, config: DenseLoRAConfig, groups: Mapping[str, str]) -> None:
        super().__init__()
        self.base_model = model
        self.denselora_config = config
        self.groups: dict[str, str] = dict(groups)
        #: The fingerprint of the frozen basis this adapter's cores stand on (`denselora.io.basis`),
        #: or None for a full adapter. When set, `save_pretrained` writes a tenant (cores only).
        self.basis_fingerprint: Optional[str] = None
        self._tenants: Optional[tenants.Residents] = None
        self.register_state_dict_post_hook(_keep_adapter_entries)
        self.register_load_state_dict_post_hook(_ignore_missing_base_entries)
        # Tools that inspect forward's signature (Trainer drops dataset columns it does not name)
        # see the base model's arguments.
        self.forward = functools.update_wrapper(functools.partial(DenseLoRAModel.forward, self), model.forward)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # -- delegation --
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapter structure --
    @property
    def shared_modules(self) -> nn.ModuleDict:
        return getattr(self.base_model, SHARED_ATTR)

    def adapter_layers(self) -> Iterator[tuple[str, DenseLoRALayer]]:
        for path in self.groups:
            yield path, self.base_model.get_submodule(path)

    def adapter_state(self) -> OrderedDict[str, torch.Tensor]:
        """The adapter's tensors under their file names (``shared.<g>.encoder`` ...)."""
        state: OrderedDict[str, torch.Tensor] = OrderedDict()
        for group, shared in self.shared_modules.items():
            state[f"shared.{group}.encoder"] = shared.encoder
            state[f"shared.{group}.decoder"] = shared.decoder
        for path, layer in self.adapter_layers():
            state[f"{path}.m"] = layer.m
        return state

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; shared tensors count once."""
        trainable = total = 0
        for param in self.parameters():  # parameters() yields each tensor once
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- saving and loading --
    def adapter_config_dict(self) -> dict[str, Any]:
        config = self.denselora_config.to_dict()
        if config.get("base_model_name_or_path") is None:
            config["base_model_name_or_path"] = _base_model_name(self.base_model)
        config["groups"] = dict(self.groups)
        return config

    def save_pretrained(self, save_directory: PathLike, **_: Any) -> None:
        """Write the adapter directory: ``adapter_config.json`` and ``adapter.safetensors``. On a
        frozen basis (`basis_fingerprint` set) this is a tenant: the cores and a config naming the
        basis; `BasisMismatchError` if the shared tensors changed since (then they were not frozen)."""
        state = self.adapter_state()
        config = self.adapter_config_dict()
        if self.basis_fingerprint is not None:
            now = _basis.fingerprint(config, state)
            if now != self.basis_fingerprint:
                raise BasisMismatchError(
                    f"{os.fspath(save_directory)}: the tenant needs the basis of fingerprint {self.basis_fingerprint}, "
                    f"but the model's shared tensors now have fingerprint {now} (they changed: train with freeze_shared=True)"
                )
            config = _basis.tenant_config(config, self.basis_fingerprint, _basis.basis_groups(state))
            state = OrderedDict(_basis.tenant_tensors(state))
        save_adapter(save_directory, config, state)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        source: PathLike,
        adapter_name: Optional[str] = None,
        *,
        is_trainable: bool = False,
        freeze_shared: bool = False,
        basis: Optional[_basis.BasisSource] = None,
    ) -> DenseLoRAModel:
        """Attach a saved adapter (a directory, ``bundle.dl`` with ``adapter_name``, or
        ``"bundle.dl:name"``) to ``model``. Every module and tensor must match exactly.

        A tenant (cores only) takes its shared tensors from ``basis`` (a directory,
        ``"bundle.dl:name"`` or ``(bundle, name)``), or, when it is a bundle entry, from the full
        adapter of the same bundle whose fingerprint it needs; a basis of another fingerprint raises
        `BasisMismatchError` naming both. With ``freeze_shared`` the adapter serves as a frozen
        basis: only the cores train, and `save_pretrained` writes a tenant of that basis."""
        opened = open_adapter(source, adapter_name)  # validated: groups, tensors, their shapes
        raw_config, where, tensors = opened.config, opened.where, opened.torch_tensors()
        path, entry = split_source(source, adapter_name)
        basis_print = None
        if _basis.is_tenant(raw_config):
            basis_config, basis_tensors, basis_where = _basis.resolve_basis(raw_config, path, entry, basis)
            _basis.check_groups(raw_config, basis_tensors, where, basis_where)
            tensors = _basis.with_basis(tensors, basis_tensors)
            basis_print = _basis.required_fingerprint(raw_config)
            _check_same_activations(raw_config, basis_config, where)
        elif basis is not None:
            raise ArgumentError(f"{where} is a full adapter (it has its own shared tensors); basis= applies to tenants")
        config = DenseLoRAConfig.from_saved({k: v for k, v in raw_config.items() if k != _basis.BASIS_KEY})
        groups = dict(raw_config["groups"])
        wrapped = inject(model, config, groups=groups, tensors=tensors, layout=opened.groups, source=where)
        if freeze_shared and basis_print is None:
            basis_print = _basis.fingerprint(raw_config, tensors)
        wrapped.basis_fingerprint = basis_print
        wrapped.requires_grad_adapter(is_trainable or freeze_shared)
        if freeze_shared:
            wrapped.freeze_shared()
        elif not is_trainable:
            wrapped.eval()
        return wrapped

    def shared_fingerprint(self) -> str:
        """The fingerprint of this model's basis: `basis_fingerprint` when set, else that of its
        shared tensors and activations now (`denselora.io.basis.fingerprint`)."""
        if self.basis_fingerprint is not None:
            return self.basis_fingerprint
        shared = [t for s in self.shared_modules.values() for t in (s.encoder, s.decoder)]
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in shared)
        cached = self.__dict__.get("_shared_print")
        if cached is None or cached[0] != key:
            cached = (key, _basis.fingerprint(self.adapter_config_dict(), self.adapter_state()))
            self.__dict__["_shared_print"] = cached
        return cached[1]

    def freeze_shared(self) -> None:
        """Freeze every shared encoder and decoder (the basis): only the cores ``M_l`` train."""
        for shared in self.shared_modules.values():
            shared.requires_grad_(False)

    # -- tenants: many adapters of one basis in one model --
    @property
    def tenants(self) -> tenants.Residents:
        """The resident tenants of this model's basis (`denselora.method.tenants.Residents`)."""
        if self._tenants is None:
            self._tenants = tenants.Residents(self)
        return self._tenants

    def load_adapter(self, source: PathLike, adapter_name: str, basis: Optional[_basis.BasisSource] = None) -> None:
        """Make the tenant ``source`` (a directory or bundle entry; or a full adapter on this
        model's basis, whose cores are taken) resident under ``adapter_name``, for `route`. Its
        basis must be this model's (`BasisMismatchError` names both fingerprints); a failed load
        changes nothing resident."""
        self.tenants.load(source, adapter_name, basis=basis)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove a resident tenant (the others are untouched)."""
        self.tenants.delete(adapter_name)

    def add_tenant_source(self, bundle: PathLike) -> None:
        """Let `route` bring in, memory-mapped, a tenant of ``bundle`` that is not resident."""
        self.tenants.add_source(bundle)

    @property
    def max_resident(self) -> Optional[int]:
        """The most tenants resident at once (None: no bound); beyond it the least recently
        routed is evicted."""
        return self.tenants.max_resident

    @max_resident.setter
    def max_resident(self, value: Optional[int]) -> None:
        self.tenants.set_max_resident(value)

    def route(self, names: Sequence[Optional[str]]) -> contextlib.AbstractContextManager[None]:
        """Inside the block, row ``i`` of every batch runs with the tenant ``names[i]`` (``"default"``:
        this model's own adapter; None: the base model alone): ``h = act(E x)`` once for the batch,
        ``z_i = M[t_i] h_i``, ``out += s act(D z)``. For inference (no gradients, no dropout)."""
        return self.tenants.route(names)

    def load_adapter_state(self, tensors: Mapping[str, torch.Tensor], *, source: str = "tensors") -> None:
        """Copy ``tensors`` (named as in `adapter_state`) into the adapter's parameters, in their
        device and dtype. Strict: every tensor present, no other, each of its parameter's shape;
        otherwise `IncompatibleAdapterError` naming ``source`` and nothing is copied."""
        state = self.adapter_state()
        missing, extra = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
        if missing or extra:
            raise IncompatibleAdapterError(f"{source}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
        for name, param in state.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise IncompatibleAdapterError(
                    f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, the adapter needs {tuple(param.shape)}"
                )
        with torch.no_grad():
            for name, param in state.items():
                if param.device.type != "meta":  # nothing to fill on the meta device
                    param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))

    def requires_grad_adapter(self, flag: bool = True) -> None:
        for tensor in self.adapter_state().values():
            tensor.requires_grad_(flag)

    # -- switching --
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        layers = [layer for _, layer in self.adapter_layers()]
        previous = [layer.disabled for layer in layers]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer, flag in zip(layers, previous):
                layer.disabled = flag

    def merge_adapter(self) -> None:
        """Fold the branch into the base weights (``identity`` activation only)."""
        self._require_linear("merge")
        for _, layer in self.adapter_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        """Undo `merge_adapter` (up to the rounding of the base weights' dtype)."""
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the adapter into the base weights and return the plain base model."""
        self.merge_adapter()
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove the adapter (unmerged layers lose their branch) and return the base model."""
        for path, layer in list(self.adapter_layers()):
            parent_path, _, child = path.rpartition(".")
            parent = self.base_model.get_submodule(parent_path) if parent_path else self.base_model
            setattr(parent, child, layer.base_layer)
        if hasattr(self.base_model, SHARED_ATTR):
            delattr(self.base_model, SHARED_ATTR)
        self.groups = {}
        return self.base_model

    def _require_linear(self, what: str) -> None:
        if not self.denselora_config.is_linear:
            raise NotMergeableError(
                f"cannot {what}: activations are {self.denselora_config.activations!r}, but only an "
                "'identity' branch is linear (configure activation='identity' to train a mergeable adapter)"
            )

    def export_lora(self, save_directory: PathLike) -> None:
        """Write a PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``) equal to this
        ``identity`` adapter: ``A = E_g``, ``B = D_g @ M_l``, and ``lora_alpha / r = alpha / r``."""
        self._require_linear("export as LoRA")
        layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        fan_in_fan_out = False
        for path, layer in self.adapter_layers():
            shared = layer.shared
            decoder, m = shared.decoder.detach().float().cpu(), layer.m.detach().float().cpu()
            layers[path] = (shared.encoder, decoder @ m)
            fan_in_fan_out |= is_conv1d(layer.base_layer)
        config, tensors = lora_adapter(
            layers,
            self.denselora_config.scale,
            fan_in_fan_out=fan_in_fan_out,
            base_model_name_or_path=self.adapter_config_dict().get("base_model_name_or_path"),
        )
        save_peft_lora(save_directory, config, tensors)

    def set_branch_path(self, path: str) -> None:
        """Choose who computes the branch of every adapted layer: ``"auto"`` (the default: the
        fused Rust kernel for CPU inference whenever it can run, the efficient autograd path in
        training, the reference ops otherwise), ``"reference"``, ``"efficient"``, ``"compiled"``
        or ``"fused"`` (the kernel, raising `ArgumentError` for a call it cannot run). All give the
        same numbers up to rounding; see `denselora.method.paths`."""
        paths.check_branch_path(path, "set_branch_path(path)")
        for _, layer in self.adapter_layers():
            layer.branch_path = path


def _check_same_activations(tenant: Mapping[str, Any], basis_config: Mapping[str, Any], where: str) -> None:
    # The fingerprint covers the basis's activations; a tenant config claiming others is damaged.
    if _basis.activations_of(tenant) != _basis.activations_of(basis_config):
        raise IncompatibleAdapterError(
            f"{where}: the tenant's activations {_basis.activations_of(tenant)} are not its basis's "
            f"{_basis.activations_of(basis_config)}"
        )


def _keep_adapter_entries(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    keep = {prefix + "base_model." + k for k in _adapter_param_names(module)}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
        del state_dict[key]


def _ignore_missing_base_entries(module: nn.Module, incompatible_keys: Any) -> None:
    adapter = {"base_model." + k for k in _adapter_param_names(module)}
    missing = incompatible_keys.missing_keys
    still_missing = [k for k in missing if any(k.endswith(a) for a in adapter)]
    missing[:] = still_missing


def _adapter_param_names(module: DenseLoRAModel) -> set[str]:
    """Parameter names (relative to the base model) of the adapter's tensors."""
    ids = {id(t) for t in module.adapter_state().values()}
    return {name for name, param in module.base_model.named_parameters() if id(param) in ids}


def _base_model_name(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return name or None


def _fingerprint(tensors: Mapping[str, torch.Tensor]) -> Optional[str]:
    """A hash of the adapter's initial values (None on the meta device, where there are none)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.device.type == "meta":
            return None
        digest.update(name.encode())
        digest.update(arrays.to_numpy(tensor.float(), name).tobytes())
    return digest.hexdigest()


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _device_of(module: nn.Module) -> torch.device:
    return module.weight.device


def inject(
    model: nn.Module,
    config: DenseLoRAConfig,
    *,
    groups: Optional[Mapping[str, str]] = None,
    tensors: Optional[Mapping[str, torch.Tensor]] = None,
    layout: Optional[Mapping[str, GroupLayout]] = None,
    source: str = "adapter",
) -> DenseLoRAModel:
    """Freeze ``model`` and wrap its targeted linear layers. With ``groups`` (module path ->
    group, from a saved adapter) exactly those modules are adapted; with ``tensors`` their values
    are loaded, strictly: every module must exist and fit its group's ``layout`` (as the core
    validated it when the adapter was opened; derived from ``tensors`` by the core when not given)."""
    if hasattr(model, SHARED_ATTR):
        raise ConfigError(f"{type(model).__name__} already carries a DenseLoRA adapter; unload it first")
    if groups is None:
        groups = assign_groups(model, find_target_modules(model, config))
    if tensors is not None and layout is None:
        layout = adapter_layout({"groups": dict(groups)}, tensors, source)
    modules: dict[str, nn.Module] = {}
    absent = [path for path in groups if not _has_submodule(model, path)]
    if absent:
        listed = ", ".join(absent[:4]) + (f" and {len(absent) - 4} more" if len(absent) > 4 else "")
        raise IncompatibleAdapterError(f"{source}: {len(absent)} adapted modules are not in {type(model).__name__}: {listed}")
    for path in groups:
        module = model.get_submodule(path)
        if not is_adaptable(module):
            raise IncompatibleAdapterError(f"{source}: module {path} is a {type(module).__name__}, not a linear layer")
        modules[path] = module

    if layout is not None:
        _check_modules_fit(modules, groups, layout, source)  # before touching the user's model

    for param in model.parameters():
        param.requires_grad_(False)

    # One shared module per group, placed explicitly on the device of the group's first layer.
    shared = nn.ModuleDict()
    for path, group in groups.items():
        if group in shared:
            continue
        fan_in, fan_out = linear_dims(modules[path])
        enc_rank, dec_rank = (layout[group].encoder_rank, layout[group].decoder_rank) if layout else (config.r, config.r)
        shared[group] = DenseLoRAShared(fan_in, fan_out, enc_rank, decoder_rank=dec_rank, device=_device_of(modules[path]))
    for path, group in groups.items():
        if linear_dims(modules[path]) != (shared[group].in_features, shared[group].out_features):
            raise IncompatibleAdapterError(
                f"{source}: module {path} is {linear_dims(modules[path])} (in, out), but group {group!r} "
                f"is ({shared[group].in_features}, {shared[group].out_features})"
            )
    setattr(model, SHARED_ATTR, shared)
    for path, group in groups.items():
        layer = DenseLoRALayer(
            modules[path],
            shared[group],
            group,
            scaling=config.scale,
            activation=config.activations,
            dropout=config.dropout,
            m_init=config.m_init,
        )
        layer.train(modules[path].training)  # a new module starts in training mode; keep the model's
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer)

    wrapped = DenseLoRAModel(model, config, groups)
    wrapped.train(model.training)
    if tensors is not None:
        wrapped.load_adapter_state(tensors, source=source)
    elif config.init_fingerprint is None:
        wrapped.denselora_config = dataclasses.replace(config, init_fingerprint=_fingerprint(wrapped.adapter_state()))
    return wrapped


def _check_modules_fit(
    modules: Mapping[str, nn.Module], groups: Mapping[str, str], layout: Mapping[str, GroupLayout], source: str
) -> None:
    """Every adapted module is in its group of ``layout``, no other, and has the group's (in, out)."""
    listed = {path: g.name for g in layout.values() for path in g.modules}
    for path in sorted(set(listed) ^ set(groups)):
        has, lacks = ("the groups given", "the layout") if path in groups else ("the layout", "the groups given")
        raise IncompatibleAdapterError(f"{source}: module {path} is in {has} but not in {lacks}")
    for path, group in groups.items():
        g = layout[listed[path]]
        if g.name != group:
            raise IncompatibleAdapterError(f"{source}: module {path} is in group {group!r}, but in {g.name!r} in the adapter's layout")
        fan_in, fan_out = linear_dims(modules[path])
        if fan_in != g.in_features:
            raise IncompatibleAdapterError(
                f"{source}: tensor shared.{group}.encoder has shape ({g.encoder_rank}, {g.in_features}), "
                f"but module {path} takes {fan_in} inputs"
            )
        if fan_out != g.out_features:
            raise IncompatibleAdapterError(
                f"{source}: tensor shared.{group}.decoder has shape ({g.out_features}, {g.decoder_rank}), "
                f"but module {path} gives {fan_out} outputs"
            )


def get_denselora_model(model: nn.Module, config: Optional[DenseLoRAConfig] = None) -> DenseLoRAModel:
    """Freeze ``model``, inject DenseLoRA layers as ``config`` says, and return the wrapper."""
    return inject(model, config or DenseLoRAConfig())
