"""Shared bases and their tenants.

A *basis* is the shared part of an adapter: every group's encoder ``E_g`` and decoder ``D_g`` and the
activations around them. A *tenant* is an adapter that stores only its per-layer cores ``M_l`` and
names the basis it needs by the basis's *fingerprint*, a hash of exactly what the cores depend on.
Any full adapter can serve as a basis; tenants trained on it (``freeze_shared=True``) or built into
a family share it and cost ``r^2`` numbers per layer each.

The fingerprint is computed here and nowhere else. It depends on the shared tensors' names, shapes
and float32 values and on the two activations, not on dtype of storage (a basis stored in float16
and the same values in float32 have different values and so different fingerprints; a float32
basis re-saved as float32 keeps its fingerprint). NumPy only: the bundle commands use it without
PyTorch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Union

import numpy as np

from ..errors import BasisMismatchError, IncompatibleAdapterError
from .sources import split_source

if TYPE_CHECKING:
    from .bundle import Bundle

#: The config key of a tenant: ``{"fingerprint": hex, "groups": {group: [in, out, r_enc, r_dec]}}``.
BASIS_KEY = "basis"
_SHARED_PREFIX = "shared."


def is_shared_tensor(name: str) -> bool:
    """``shared.<group>.encoder`` and ``shared.<group>.decoder``: the tensors of a basis."""
    return name.startswith(_SHARED_PREFIX) and (name.endswith(".encoder") or name.endswith(".decoder"))


def activations_of(config: Mapping[str, Any]) -> tuple[str, str]:
    """(encoder side, decoder side) activation names of an adapter config, defaults applied as the
    core applies them (``activation``, GELU when absent, overridden per side)."""
    both = config.get("activation") or "gelu"
    if isinstance(both, (list, tuple)):
        encoder, decoder = both
    else:
        encoder = decoder = both
    return (config.get("encoder_activation") or encoder, config.get("decoder_activation") or decoder)


def fingerprint(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> str:
    """The basis fingerprint of a full adapter (``config`` and its tensors as torch tensors or numpy
    arrays, bfloat16 as ``uint16`` bits as the core hands them out): 32 hex digits of BLAKE2b over the shared tensors' names, shapes and float32 values
    in name order, and the two activation names."""
    digest = hashlib.blake2b(digest_size=16)
    encoder_act, decoder_act = activations_of(config)
    digest.update(f"activations={encoder_act}/{decoder_act};".encode())
    for name in sorted(n for n in tensors if is_shared_tensor(n)):
        values = _float32(tensors[name], name)
        digest.update(f"{name}:{'x'.join(map(str, values.shape))};".encode())
        digest.update(np.ascontiguousarray(values, dtype="<f4").tobytes())
    return digest.hexdigest()


def is_tenant(config: Mapping[str, Any]) -> bool:
    """Whether an adapter config describes a tenant (cores only, on a basis named by fingerprint)."""
    return isinstance(config.get(BASIS_KEY), Mapping)


def _float32(value: Any, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint16:  # bfloat16 bit patterns, as the core hands them out
            return (value.astype(np.uint32) << 16).view(np.float32)
        return value.astype(np.float32, copy=False)
    # A torch tensor (imported lazily: no PyTorch needed for numpy inputs).
    from . import arrays

    return arrays.to_numpy(value.float(), name)


# -- tenants: their config, their basis -------------------------------------------------------

#: ``basis`` given explicitly: an adapter directory, ``"bundle.dl:name"``, or ``(bundle path, name)``.
BasisSource = Union[str, "os.PathLike[str]", tuple[Union[str, "os.PathLike[str]"], str]]


def basis_groups(tensors: Mapping[str, Any]) -> dict[str, list[int]]:
    """``{group: [in_features, out_features, encoder_rank, decoder_rank]}`` of a full adapter's
    shared tensors (what a tenant records of its basis)."""
    groups: dict[str, list[int]] = {}
    for name in sorted(tensors):
        if name.startswith(_SHARED_PREFIX) and name.endswith(".encoder"):
            group = name[len(_SHARED_PREFIX) : -len(".encoder")]
            encoder = tensors[name]
            decoder = tensors[f"{_SHARED_PREFIX}{group}.decoder"]
            groups[group] = [int(encoder.shape[1]), int(decoder.shape[0]), int(encoder.shape[0]), int(decoder.shape[1])]
    return groups


def tenant_config(config: Mapping[str, Any], basis_fingerprint: str, groups: Mapping[str, Any]) -> dict[str, Any]:
    """The config of a tenant: an adapter config with ``basis`` naming the basis it needs."""
    out = {k: v for k, v in config.items() if k != "format_version"}
    out[BASIS_KEY] = {"fingerprint": basis_fingerprint, "groups": {g: list(map(int, d)) for g, d in groups.items()}}
    return out


def tenant_tensors(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors a tenant stores: the cores (no shared tensor)."""
    return {name: t for name, t in tensors.items() if not is_shared_tensor(name)}


def required_fingerprint(config: Mapping[str, Any]) -> str:
    """The fingerprint of the basis a tenant needs."""
    return str(config[BASIS_KEY]["fingerprint"])


def check_basis(tenant: Mapping[str, Any], basis_print: str, tenant_where: str, basis_where: str) -> None:
    """`BasisMismatchError` unless the basis of fingerprint ``basis_print`` is the tenant's."""
    needed = required_fingerprint(tenant)
    if needed != basis_print:
        raise BasisMismatchError(
            f"{tenant_where}: the tenant needs the basis of fingerprint {needed}, but {basis_where} has fingerprint "
            f"{basis_print}"
        )


def resolve_basis(
    tenant: Mapping[str, Any],
    tenant_path: Path,
    tenant_entry: Optional[str],
    basis: Optional[BasisSource] = None,
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The basis of a tenant (config as read from ``tenant_path`` / ``tenant_entry``): ``(config,
    tensors, where)`` of the full adapter serving as its basis, its fingerprint checked.

    ``basis`` names it explicitly (a directory, ``"bundle.dl:name"`` or ``(bundle, name)``);
    without it, a tenant that is a bundle entry takes the full adapter of the same bundle whose
    fingerprint it needs. `BasisMismatchError` when the basis given is another;
    `IncompatibleAdapterError` when none is given and none is found."""
    from .adapter import load_adapter

    where = _where(tenant_path, tenant_entry)
    if basis is not None:
        source, name = basis if isinstance(basis, tuple) else (basis, None)
        config, tensors = load_adapter(source, name)
        basis_where = _where(*split_source(source, name))
        if is_tenant(config):
            raise IncompatibleAdapterError(f"{where}: basis {basis_where} is itself a tenant; a basis is a full adapter")
        check_basis(tenant, fingerprint(config, tensors), where, basis_where)
        return config, tensors, basis_where
    needed = required_fingerprint(tenant)
    if tenant_entry is not None:
        from .bundle import Bundle

        with Bundle(tenant_path) as bundle:
            found = [f.bases[0] for f in families(bundle) if f.fingerprint == needed and f.bases]
        if found:
            config, tensors = load_adapter(tenant_path, found[0])
            return config, tensors, _where(tenant_path, found[0])
        raise IncompatibleAdapterError(
            f"{where}: the tenant needs the basis of fingerprint {needed}; no full adapter of {tenant_path} has it "
            "(give it with basis=...)"
        )
    raise IncompatibleAdapterError(
        f"{where}: the tenant needs the basis of fingerprint {needed}; give it with basis=... (an adapter "
        "directory or a bundle entry)"
    )


def check_groups(tenant: Mapping[str, Any], basis_tensors: Mapping[str, Any], tenant_where: str, basis_where: str) -> None:
    """`IncompatibleAdapterError` naming the group unless the tenant's ``basis.groups`` (what its
    cores were checked against) are the basis's shapes."""
    have = basis_groups(basis_tensors)
    for group, dims in tenant[BASIS_KEY]["groups"].items():
        if have.get(group) != list(dims):
            raise IncompatibleAdapterError(
                f"{tenant_where}: group {group!r} is {list(dims)} (in, out, encoder rank, decoder rank) in the tenant's "
                f"basis, but {have.get(group)} in {basis_where}"
            )


def with_basis(tenant_tensors: Mapping[str, Any], basis_tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A full adapter's tensors: the tenant's cores and the basis's shared tensors."""
    return {**{n: t for n, t in basis_tensors.items() if is_shared_tensor(n)}, **tenant_tensors}


def _where(path: Path, entry: Optional[str]) -> str:
    return os.fspath(path) if entry is None else f"{os.fspath(path)}:{entry}"


# -- families in a bundle ------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A basis and its tenants in one bundle (see `families`). ``bases`` are the entries whose
    fingerprint is ``fingerprint`` (full adapters; several when stored under several names, none when
    the tenants' basis is not in this bundle); ``basis_bytes`` is what its shared factors occupy and
    ``tenant_bytes`` what each tenant adds."""

    fingerprint: str
    bases: list[str]
    tenants: list[str]
    basis_bytes: int
    tenant_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def missing_basis(self) -> bool:
        return not self.bases


def families(bundle: Bundle) -> list[Family]:
    """The families of an open `denselora.io.bundle.Bundle`: each basis fingerprint that a tenant
    entry names, the full adapters in the bundle that serve as that basis (none: the tenants' basis
    is missing here) and its tenants, with sizes in stored bytes. Empty when the bundle holds no
    tenant."""
    configs = {name: bundle.config(name) for name in bundle.names()}
    wanted: dict[str, list[str]] = {}
    layouts = set()  # the group shapes the tenants' bases have
    for name, config in configs.items():
        if is_tenant(config):
            ref = config[BASIS_KEY]
            wanted.setdefault(str(ref.get("fingerprint")), []).append(name)
            layouts.add(_layout_key((g, *dims) for g, dims in dict(ref.get("groups") or {}).items()))
    if not wanted:
        return []
    bases: dict[str, list[str]] = {}
    for name, config in configs.items():
        # A full adapter whose group shapes no tenant asks for is no basis here: its tensors
        # are not read.
        keys = ("group", "in_features", "out_features", "encoder_rank", "decoder_rank")
        shapes = (tuple(g[k] for k in keys) for g in bundle.groups(name))
        if not is_tenant(config) and _layout_key(shapes) in layouts:
            # Only the shared tensors are read (and checksummed): the fingerprint covers them alone.
            shared = {k: v for k, v in bundle.tensors(name).items() if is_shared_tensor(k)}
            bases.setdefault(fingerprint(config, shared), []).append(name)
    sizes = {name: {t["name"]: t["length"] for t in bundle.tensor_info(name)} for name in configs}
    out = []
    for fp, tenants in wanted.items():
        found = bases.get(fp, [])
        shared_bytes = sum(n for k, n in sizes[found[0]].items() if is_shared_tensor(k)) if found else 0
        out.append(Family(fp, found, tenants, shared_bytes, {t: sum(sizes[t].values()) for t in tenants}))
    return out


def _layout_key(groups: Iterable[Iterable[Any]]) -> tuple[tuple[Any, ...], ...]:
    """(group, in, out, encoder rank, decoder rank) of every group, in a comparable form."""
    return tuple(sorted(tuple(str(v) if i == 0 else int(v) for i, v in enumerate(g)) for g in groups))
