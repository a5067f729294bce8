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
from typing import Any, Mapping

import numpy as np

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
