"""Dropout masks of the DenseLoRA branch, the Python face of the Rust core's counter-based
generator (``rust/denselora-core/src/dropout.rs``).

The masks of one branch call are a function of a seed drawn per call (`draw_seed`), so the
memory-lean autograd path (`denselora.method.autograd`) redraws them in backward instead of
storing them. The seed comes from torch's default CPU generator: ``torch.manual_seed`` makes runs
repeatable, and gradient checkpointing (which restores the RNG state before recomputing) sees the
same masks. Each element takes 16 random bits, so the dropout probability is rounded to a multiple
of 2**-16 (kept values are scaled by the exact 1 / P(keep) of the rounded probability).

On a CPU the bits come from the core's generator (a keyed hash of each element's index, several
times faster than torch's Mersenne Twister), which zeroes the dropped elements in the pass that
draws them (`_core.dropout_zero_`: no mask in memory, no ``masked_fill``); on CUDA and other
devices from a ``torch.Generator`` of the device seeded with the seed. The two give different
masks for the same seed; each is deterministic.
"""

from __future__ import annotations

import math
import operator

import torch

from .. import _core
from ..errors import ArgumentError
from ..io import arrays

_SEED_BOUND = 1 << 62


def _threshold(p: float) -> int:
    """Dropout draws 16 random bits per element and drops values below this threshold: ``p``
    rounded to a multiple of 2**-16 (0.05 becomes 0.0500031)."""
    return min(65535, max(1, round(p * 65536)))


def keep_scale(p: float) -> float:
    """1 / P(keep) for the rounded probability, so that a dropped-out tensor keeps its mean."""
    return 65536.0 / (65536 - _threshold(p))


def draw_seed() -> int:
    """A seed for one branch call's masks, from torch's default CPU generator."""
    return int(torch.randint(0, _SEED_BOUND, (), dtype=torch.int64).item())


def _seed_u64(seed: int) -> int:
    """``seed`` as the unsigned 64-bit key of the CPU generator; negative seeds wrap modulo 2**64,
    as ``torch.Generator.manual_seed`` takes them."""
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if value is None or not -(1 << 63) <= value < (1 << 64):
        raise ArgumentError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
    return value % (1 << 64)


def site_shapes(x_shape: torch.Size, r_e: int, out_features: int) -> list[torch.Size]:
    """Shapes of the three dropout sites: the input, ``act(E x)`` and the output."""
    lead = tuple(x_shape[:-1])
    return [torch.Size(x_shape), torch.Size(lead + (r_e,)), torch.Size(lead + (out_features,))]


def dropout_drops(shapes: list[torch.Size], p: float, seed: int, device: torch.device) -> list[torch.Tensor]:
    """Which elements each dropout site zeroes (bool masks of ``shapes``: input, encoder side,
    output) for ``seed``; the same arguments give the same masks. One stream serves all sites,
    and a bool mask is applied with ``masked_fill`` (no float mask). On a CPU the Rust generator
    writes the mask in place; elsewhere one 64-bit draw of the device's generator covers four
    elements (a third of the time of ``bernoulli_``)."""
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    device = torch.device(device)
    if device.type == "cpu":
        dropped = torch.empty(total, dtype=torch.bool)
        _core.dropout_mask(dropped.numpy(), _seed_u64(seed), _threshold(p))
    else:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        bits = torch.empty((total + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None, generator=generator)
        dropped = bits.view(torch.int16)[:total] < _threshold(p) - 32768
    return [part.view(shape) for part, shape in zip(dropped.split(sizes), shapes)]


def dropout_masks(
    shapes: list[torch.Size], p: float, seed: int, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """The masks (0 or `keep_scale`) that the dropout sites multiply by for ``seed``."""
    return [
        torch.full(drop.shape, keep_scale(p), device=device, dtype=dtype).masked_fill_(drop, 0.0)
        for drop in dropout_drops(shapes, p, seed, device)
    ]


class SiteDropout:
    """The dropout of one branch call: zeroes the dropped elements of each site (`site_shapes`
    order) for ``seed``, the elements `dropout_drops` marks. On a CPU the Rust generator zeroes a
    contiguous tensor in the pass that draws the mask (no mask in memory, no ``masked_fill``);
    elsewhere the device masks are drawn once and applied with ``masked_fill``."""

    def __init__(self, shapes: list[torch.Size], p: float, seed: int, device: torch.device) -> None:
        self.shapes = shapes
        self.threshold = _threshold(p)
        self.seed = _seed_u64(seed)
        sizes = [math.prod(shape) for shape in shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.masks = None if torch.device(device).type == "cpu" else dropout_drops(shapes, p, seed, device)

    def zero_(self, site: int, t: torch.Tensor) -> torch.Tensor:
        """``t`` (contiguous, the site's elements in row-major order) with its dropped elements
        zeroed in place."""
        if self.masks is not None:
            return t.masked_fill_(self.masks[site].view(t.shape), 0.0)
        if t.numel() != math.prod(self.shapes[site]) or not t.is_contiguous():
            raise ArgumentError(f"dropout site {site}: expected a contiguous tensor of {self.shapes[site]} elements, got {tuple(t.shape)}")
        _core.dropout_zero_(arrays.integer_view(t), self.seed, self.threshold, self.offsets[site])
        return t

    def zeroed(self, site: int, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``t`` with the site's dropped elements zeroed."""
        return self.zero_(site, t.clone(memory_format=torch.contiguous_format))
