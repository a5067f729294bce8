"""Many tenants of one basis resident in one model, and batches whose rows use different ones.

A tenant is only its cores ``M_l`` (`denselora.io.basis`); tenants of the model's basis are kept in
one stack per adapted layer, ``[slots, r_d, r_e]``, a slot per tenant. Inside
``model.route(names)`` row ``i`` of a batch takes the core of tenant ``names[i]``:

    h = act_e(E x)         once for the whole batch
    z_i = M[t_i] h_i       per row, from the stack
    out += s act_d(D z)    once for the whole batch

CPU inference without gradients runs the fused routed kernel (`denselora.kernels`), which views
the stack in place; otherwise PyTorch (a gather of the stack and a batched product). Slot 0 holds
the model's own adapter, the tenant ``"default"``. Loading and deleting tenants never touches the
others (hot swap); with ``max_resident`` the least recently routed tenant makes room, and a routed
name that is not resident is brought in from the bundles of `Residents.add_source`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Collection, Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import _core
from ..errors import ArgumentError, IncompatibleAdapterError
from ..io import arrays
from ..io import basis as _basis
from ..io.adapter import load_adapter
from ..io.bundle import Bundle
from ..io.sources import PathLike, split_source
from ..kernels.fused import AUTO_HALF_MAX_ROWS, KERNEL_DTYPES, get_num_threads
from .config import DenseLoRAConfig
from .functional import activation_fn

if TYPE_CHECKING:
    from .layer import DenseLoRALayer

#: The name of the model's own adapter among the residents.
DEFAULT = "default"
_FIRST_CAPACITY = 8
# Tenant configs (as JSON text) from tenant sources already found compatible, at most this many.
_ACCEPTED_CONFIGS = 64


class TokenSlots(NamedTuple):
    """The slot of every token row of one input shape in a routed batch."""

    index: torch.Tensor  # int32, one per token row, -1: no tenant
    address: int  # index.data_ptr()
    rows: int  # index.numel()


class LayerStack:
    """One adapted layer's resident cores, ``[capacity, r_d, r_e]`` in the dtype of the layer's
    encoder, and the routed kernel's view of them (prepared again only when the stack or a
    shared tensor is replaced or changed; a slot written in place needs nothing)."""

    def __init__(self, residents: Residents, layer: DenseLoRALayer, capacity: int) -> None:
        self.residents = residents
        self.layer = layer
        m = layer.m
        #: The shape of one core, ``(r_d, r_e)``.
        self.core_shape = tuple(m.shape)
        self._prepared: Optional[tuple[tuple[Any, ...], Optional[_core.PreparedRoutedBranch]]] = None
        # (the stack, a numpy view of it) while it is a contiguous float32 or float16 CPU tensor.
        self._array: Optional[tuple[torch.Tensor, np.ndarray]] = None
        self.cores = torch.zeros((capacity, *m.shape), dtype=layer.shared.encoder.dtype, device=m.device)

    @property
    def cores(self) -> torch.Tensor:
        """The stack, ``[capacity, r_d, r_e]``."""
        return self._cores

    @cores.setter
    def cores(self, value: torch.Tensor) -> None:
        # Views of the stack replaced are let go (they are rebuilt for the new one when used).
        self._cores = value
        self._array = None
        self._prepared = None

    def grow(self, capacity: int) -> None:
        grown = self.cores.new_zeros((capacity, *self.cores.shape[1:]))
        grown[: self.cores.shape[0]] = self.cores
        self.cores = grown

    def follow_encoder(self) -> None:
        """Keep the stack in the encoder's dtype and device (the model may have been moved)."""
        encoder = self.layer._shared_ref[0]._parameters["encoder"]
        cores = self.cores
        if cores.dtype != encoder.dtype or cores.device != encoder.device:
            self.cores = cores.to(device=encoder.device, dtype=encoder.dtype)

    def _view(self) -> Optional[np.ndarray]:
        """A numpy view of the stack, or None when it is not a contiguous float32/float16 CPU tensor."""
        cores = self.cores
        held = self._array
        if held is not None and held[0] is cores:
            return held[1]
        array = None
        if cores.is_cpu and cores.dtype in (torch.float32, torch.float16) and cores.is_contiguous():
            array = cores.detach().numpy()
        self._array = (cores, array) if array is not None else None
        return array

    def write(self, slot: int, core: Any) -> None:
        """Copy one core (a numpy array or a tensor of the core's shape) into ``slot``."""
        array = self._view()
        if array is not None and isinstance(core, np.ndarray) and (
            core.dtype == array.dtype or (core.dtype == np.float16 and array.dtype == np.float32)
        ):
            array[slot] = core  # straight from the memory map into the slot
            return
        with torch.no_grad():
            self.cores[slot].copy_(_as_tensor(core))

    def clear(self, slot: int) -> None:
        array = self._view()
        if array is not None:
            array[slot] = 0
        else:
            with torch.no_grad():
                self.cores[slot].zero_()

    def forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus each row's branch with its tenant's core (rows of no tenant: nothing)."""
        tokens = self.residents.token_slots(x)
        shared = self.layer._shared_ref[0]._parameters
        encoder, decoder = shared["encoder"], shared["decoder"]
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or result.requires_grad or encoder.requires_grad or decoder.requires_grad)
        if not wants_grad and self._add_fused(x, result, tokens, encoder, decoder):
            return result
        return result + self._torch_branch(x, tokens.index, encoder, decoder).to(result.dtype)

    def _torch_branch(self, x: torch.Tensor, index: torch.Tensor, encoder: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        act_e, act_d = (activation_fn(a) for a in layer.activation)
        flat = x.reshape(-1, x.shape[-1]).to(device=encoder.device, dtype=encoder.dtype)
        index = index.to(encoder.device)
        h = act_e(F.linear(flat, encoder))  # [N, r_e], once for the batch
        cores = self.cores.index_select(0, index.clamp(min=0).long())  # [N, r_d, r_e]
        z = torch.bmm(cores, h.unsqueeze(-1)).squeeze(-1)
        y = layer.scaling * act_d(F.linear(z, decoder))
        y = torch.where((index >= 0).unsqueeze(-1), y, torch.zeros((), dtype=y.dtype, device=y.device))
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.device)

    def _add_fused(
        self, x: torch.Tensor, out: torch.Tensor, tokens: TokenSlots, encoder: torch.Tensor, decoder: torch.Tensor
    ) -> bool:
        """The routed kernel, in place, when it can run this call (as `KernelPath.add_` decides)."""
        dtype = KERNEL_DTYPES.get(x.dtype)
        if dtype is None or not (x.is_cpu and out.is_cpu) or out.dtype != x.dtype or not out.is_contiguous():
            return False
        prepared = self._weights(encoder, decoder)
        rows = tokens.rows
        if prepared is None or x.shape[-1] != prepared.in_features or out.shape[-1] != prepared.out_features:
            return False
        if x.numel() != rows * prepared.in_features or out.numel() != rows * prepared.out_features:
            return False
        if x.dtype != torch.float32 and rows > AUTO_HALF_MAX_ROWS:
            return False  # PyTorch's native half matmuls are faster on prefill (see KernelPath)
        if not x.is_contiguous():
            x = x.contiguous()
        # Addresses of tensors checked above: CPU, contiguous, the kernel's dtypes and sizes; the
        # indices are int32, one per row, and the kernel checks their range.
        prepared.add_unchecked(x.data_ptr(), out.data_ptr(), tokens.address, rows, dtype, get_num_threads())
        return True

    def _weights(self, encoder: torch.Tensor, decoder: torch.Tensor) -> Optional[_core.PreparedRoutedBranch]:
        layer = self.layer
        cores = self.cores
        key = (cores.data_ptr(), cores.shape, encoder.data_ptr(), decoder.data_ptr(), encoder._version, decoder._version,
               layer.scaling, layer.encoder_activation, layer.decoder_activation)
        if self._prepared is not None and self._prepared[0] == key:
            return self._prepared[1]
        prepared = None
        tensors = (encoder, cores, decoder)
        if all(t.is_cpu and t.dtype == encoder.dtype and t.is_contiguous() for t in tensors) and encoder.dtype in arrays.CORE_DTYPES:
            # Views: slots written in place are seen by the next call without preparing again.
            views = [arrays.view(t, name) for t, name in zip(tensors, ("encoder", "cores", "decoder"))]
            prepared = _core.PreparedRoutedBranch(
                *views, scale=layer.scaling, encoder_activation=layer.activation[0], decoder_activation=layer.activation[1]
            )
        self._prepared = (key, prepared)
        return prepared


class Residents:
    """The tenants resident in one `DenseLoRAModel`, their slots, and the routing of a batch."""

    def __init__(self, model: Any) -> None:
        # ``model``: the `DenseLoRAModel` (not imported: model.py imports this module).
        self.model = model
        self.max_resident: Optional[int] = None
        # Tenant name -> slot, least recently routed first. Slot 0 is the model's own adapter.
        self._slots: OrderedDict[str, int] = OrderedDict()
        self._free: list[int] = []
        self._capacity = _FIRST_CAPACITY
        self._free = list(range(self._capacity - 1, 0, -1))
        self._sources: list[Bundle] = []
        self._rows: Optional[torch.Tensor] = None  # int32 slot per batch row, -1: none
        self._routed_names: set[str] = set()
        # Per routed batch: token rows per batch row -> their slots.
        self._tokens: dict[int, TokenSlots] = {}
        # Config text -> (basis fingerprint, scale) it was found compatible with.
        self._accepted: dict[str, tuple[str, float]] = {}
        self._default_key: Optional[tuple[Any, ...]] = None
        self.stacks: dict[str, LayerStack] = {}
        for path, layer in model.adapter_layers():
            stack = LayerStack(self, layer, self._capacity)
            self.stacks[path] = stack
            layer._routed = stack

    # -- what is resident --
    def names(self) -> list[str]:
        """Resident tenants (not ``"default"``), least recently routed first."""
        return list(self._slots)

    def __contains__(self, name: object) -> bool:
        return name == DEFAULT or name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def basis_fingerprint(self) -> str:
        """The fingerprint of the model's basis (its shared tensors and activations)."""
        return self.model.shared_fingerprint()

    def set_max_resident(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ArgumentError(f"max_resident: expected a positive int or None, got {value!r}")
        if value is not None and len(self._slots) > value:
            for name in list(self._slots)[: len(self._slots) - value]:
                self._evict(name)
        self.max_resident = value

    # -- loading and deleting --
    def load(self, source: PathLike, name: str, *, basis: Optional[_basis.BasisSource] = None) -> None:
        """Make the tenant ``source`` resident as ``name`` (see `DenseLoRAModel.load_adapter`)."""
        self._check_new_name(name)
        config, tensors = load_adapter(source)
        path, entry = split_source(source)
        where = os.fspath(path) if entry is None else f"{os.fspath(path)}:{entry}"
        if basis is not None:
            if not _basis.is_tenant(config):
                raise ArgumentError(f"{where} is a full adapter (it has its own shared tensors); basis= applies to tenants")
            _basis.resolve_basis(config, path, entry, basis)  # the basis given must be the tenant's
        cores = self._cores_of(config, tensors, where)
        self._admit(name, cores, keep=())

    def delete(self, name: str) -> None:
        """Remove the resident tenant ``name``."""
        if name == DEFAULT:
            raise ArgumentError("delete_adapter: 'default' is the model's own adapter; unload() removes it")
        if name not in self._slots:
            raise ArgumentError(f"delete_adapter: no resident tenant {name!r} (resident: {self._listed()})")
        if self._rows is not None and name in self._routed_names:
            raise ArgumentError(f"delete_adapter: tenant {name!r} is routed in the running batch")
        self._evict(name)

    def add_source(self, bundle: PathLike) -> None:
        """A bundle whose tenants `route` brings in, memory-mapped, when a routed name is not resident."""
        self._sources.append(Bundle(bundle))

    def _check_new_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ArgumentError(f"adapter_name: expected a non-empty str, got {name!r}")
        if name == DEFAULT:
            raise ArgumentError("adapter_name 'default' is the model's own adapter; choose another name")
        if name in self._slots:
            raise ArgumentError(f"adapter_name {name!r} is already resident; delete_adapter({name!r}) first")

    def _cores_of(self, config: Mapping[str, Any], tensors: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The cores of an adapter of this model's basis, by module path; every check before any
        change (a failed load changes nothing resident)."""
        self._check_config(config, tensors, where)
        return self._cores(tensors, where)

    def _check_config(self, config: Mapping[str, Any], tensors: Mapping[str, Any], where: str) -> None:
        """`BasisMismatchError` or `IncompatibleAdapterError` unless the adapter is of this model's
        basis, modules and scale."""
        model = self.model
        mine = self.basis_fingerprint()
        if _basis.is_tenant(config):
            _basis.check_basis(config, mine, where, "this model's basis")
        else:
            _basis.check_basis({_basis.BASIS_KEY: {"fingerprint": _basis.fingerprint(config, tensors)}}, mine, where,
                               "this model's basis")
        groups = config.get("groups") or {}
        if dict(groups) != model.groups:
            differ = sorted(set(groups) ^ set(model.groups)) or sorted(p for p in groups if groups[p] != model.groups[p])
            raise IncompatibleAdapterError(
                f"{where}: its modules and groups are not the model's (first difference: module {differ[0]})"
            )
        scale = DenseLoRAConfig.from_saved({k: v for k, v in config.items() if k != _basis.BASIS_KEY}).scale
        if scale != model.denselora_config.scale:
            raise IncompatibleAdapterError(f"{where}: its branch scale is {scale:g}, the model's is {model.denselora_config.scale:g}")

    def _cores(self, tensors: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Each adapted layer's core among ``tensors``, checked for presence and shape."""
        cores: dict[str, Any] = {}
        for path, stack in self.stacks.items():
            name = f"{path}.m"
            tensor = tensors.get(name)
            if tensor is None:
                raise IncompatibleAdapterError(f"{where}: tensor {name} is missing")
            if tuple(tensor.shape) != stack.core_shape:
                raise IncompatibleAdapterError(
                    f"{where}: tensor {name} has shape {tuple(tensor.shape)}, the basis needs {stack.core_shape}"
                )
            cores[path] = tensor
        return cores

    def _admit(self, name: str, cores: Mapping[str, Any], keep: Collection[str]) -> None:
        if self.max_resident is not None:
            while len(self._slots) >= self.max_resident:
                victim = next((n for n in self._slots if n not in keep), None)
                if victim is None:
                    raise ArgumentError(
                        f"tenant {name!r}: {len(self._slots)} tenants are resident (max_resident={self.max_resident}) and "
                        "every one is routed in this batch"
                    )
                self._evict(victim)
        if not self._free:
            capacity = 2 * self._capacity
            for stack in self.stacks.values():
                stack.grow(capacity)
            self._free = list(range(capacity - 1, self._capacity - 1, -1))
            self._capacity = capacity
        slot = self._free[-1]
        for path, stack in self.stacks.items():
            stack.write(slot, cores[path])
        self._free.pop()
        self._slots[name] = slot

    def _evict(self, name: str) -> None:
        slot = self._slots.pop(name)
        for stack in self.stacks.values():
            stack.clear(slot)
        self._free.append(slot)

    def _bring_in(self, name: str, keep: Collection[str]) -> bool:
        """Load ``name`` from the first tenant source that holds it; whether one did."""
        for bundle in self._sources:
            if name in bundle:
                where = f"{os.fspath(bundle.path)}:{name}"
                # Only this tenant's tensors are read from the memory map (float32 and float16 as
                # views), each core copied once, into its slot.
                tensors = {k: a if dtype in ("F32", "F16") else arrays.to_tensor(dtype, np.array(a))
                           for k, (dtype, a) in bundle.typed_tensors(name).items()}
                text = bundle.config_json(name)
                accepted = (self.basis_fingerprint(), self.model.denselora_config.scale)
                if self._accepted.get(text) != accepted:
                    config = json.loads(text)
                    self._check_config(config, tensors, where)
                    if _basis.is_tenant(config):  # a full adapter's verdict depends on its tensors
                        if len(self._accepted) >= _ACCEPTED_CONFIGS:
                            self._accepted.clear()
                        self._accepted[text] = accepted
                self._admit(name, self._cores(tensors, where), keep)
                return True
        return False

    def _listed(self) -> str:
        names = list(self._slots)
        return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") or "none"

    # -- routing --
    @contextlib.contextmanager
    def route(self, names: Sequence[Optional[str]]) -> Iterator[None]:
        if self._rows is not None:
            raise ArgumentError("route: a batch is already routed (routes do not nest)")
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
            raise ArgumentError(f"route: expected a non-empty list of tenant names (or None) per batch row, got {names!r}")
        wanted = [n for n in dict.fromkeys(names) if n is not None and n != DEFAULT]
        for n in wanted:
            if not isinstance(n, str):
                raise ArgumentError(f"route: a tenant name is a str or None, got {n!r}")
        if self.max_resident is not None and len(wanted) > self.max_resident:
            raise ArgumentError(f"route: {len(wanted)} distinct tenants in one batch, max_resident is {self.max_resident}")
        keep = set(wanted)
        for n in wanted:
            if n not in self._slots and not self._bring_in(n, keep=keep):
                where = f"; tenant sources: {', '.join(os.fspath(b.path) for b in self._sources)}" if self._sources else ""
                raise ArgumentError(f"route: unknown tenant {n!r} (resident: {self._listed()}{where})")
            self._slots.move_to_end(n)
        stacks = self.stacks.values()
        if any(stack.layer.merged for stack in stacks):
            raise ArgumentError("route: the model's adapter is merged into the base weights; unmerge_adapter() first")
        for stack in stacks:
            stack.follow_encoder()
        if DEFAULT in names:
            self._refresh_default()
        slots = [-1 if n is None else 0 if n == DEFAULT else self._slots[n] for n in names]
        self._rows = torch.from_numpy(np.array(slots, dtype=np.int32))
        self._routed_names = keep
        try:
            yield
        finally:
            self._rows = None
            self._tokens = {}
            self._routed_names = set()

    @property
    def active(self) -> bool:
        return self._rows is not None

    def _refresh_default(self) -> None:
        """Slot 0: the model's own cores, copied again only when one changed."""
        layers = [stack.layer._parameters["m"] for stack in self.stacks.values()]
        key = tuple((m.data_ptr(), m._version) for m in layers)
        if key != self._default_key:
            with torch.no_grad():
                for stack, m in zip(self.stacks.values(), layers):
                    stack.cores[0].copy_(m)
            self._default_key = key

    def token_slots(self, x: torch.Tensor) -> TokenSlots:
        """The slot of every token row of ``x`` (batch rows first): computed once per shape of a
        routed batch (prefill, then decoding one token at a time), shared by every layer."""
        rows = self._rows
        assert rows is not None
        shape = x.shape
        batch = rows.shape[0]
        if len(shape) < 2 or shape[0] != batch:
            got = shape[0] if len(shape) >= 2 else "no"
            raise ArgumentError(f"route: {batch} tenant names for a batch of {got} rows (input of shape {tuple(shape)})")
        per_row = x.numel() // (batch * shape[-1]) if shape[-1] else 0
        tokens = self._tokens.get(per_row)
        if tokens is None:
            index = rows.repeat_interleave(per_row) if per_row != 1 else rows
            tokens = TokenSlots(index, index.data_ptr(), index.numel())
            self._tokens[per_row] = tokens
        return tokens


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    value = np.ascontiguousarray(value)
    return torch.from_numpy(value if value.flags.writeable else value.copy())


__all__ = ["DEFAULT", "LayerStack", "Residents", "TokenSlots"]
