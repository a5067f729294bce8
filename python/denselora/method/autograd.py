"""A memory-lean autograd path for the DenseLoRA branch, and the choice between branch paths.

The branch ``s * drop3(act_d(D @ M @ drop2(act_e(E @ drop1(x)))))`` written as plain tensor
operations (`functional.dense_branch`) makes autograd keep the decoder's pre-activation and the
last dropout mask, both as wide as the layer's output, for every adapted layer and token. This path
keeps only what is ``r`` wide (``E @ x`` before its activation, and ``M @ h``) plus the input ``x``,
which the base layer keeps anyway (the same tensor, so no extra memory):

- the decoder's pre-activation ``D @ g`` is recomputed in backward (one ``r``-wide matmul), and
  not at all when the decoder side is ``identity``;
- dropout masks are a function of a seed drawn per call, redrawn in backward, never stored.
  The seed comes from torch's default CPU generator, so ``torch.manual_seed`` makes runs repeatable
  and gradient checkpointing (which restores the RNG state before recomputing) sees the same masks.
  Each element takes 16 random bits, so the dropout probability is rounded to a multiple of 2**-16
  (kept values are scaled by the exact 1 / P(keep) of the rounded probability). On a CPU the bits
  come from the Rust core's counter-based generator (a keyed hash of each element's index, several
  times faster than torch's Mersenne Twister), which zeroes the dropped elements in the pass that
  draws them (`_core.dropout_zero_`: no mask in memory, no ``masked_fill``); on CUDA and other
  devices from a ``torch.Generator`` of the device seeded with the seed. The two give different
  masks for the same seed; each is deterministic.

It is a plain ``torch.autograd.Function`` over the factors: DDP's gradient hooks and FSDP's
parameter gathering see it as they see ``F.linear``. Under autocast the branch runs in the autocast
dtype, as the plain path's matmuls do; the inputs are cast inside the function and the float32
originals are what is saved, so nothing extra is kept. Double backward is not supported (use
``branch_impl="plain"`` for higher-order gradients).
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .. import _core
from ..errors import ArgumentError, ConfigError
from .functional import Activations, activation_fn, dense_branch, split_activations

BRANCH_IMPLS = ("auto", "efficient", "plain", "compiled")

# What "auto" runs in training, per device type. CPU (benches/bench_train.py): 0.71x LoRA's and about
# half the plain path's saved activations, step time within the run-to-run noise of the plain
# path's. CUDA: the same function (its memory saving does not depend on the device); not yet
# measured there, so "compiled" (torch.compile of the reference) is available only by setting.
_AUTO_IMPL = {"cpu": "efficient", "cuda": "efficient"}
_DEVICES = ("cpu", "cuda")
_SEED_BOUND = 1 << 62


def check_branch_impl(name: Any, where: str = "branch_impl") -> str:
    if not isinstance(name, str) or name not in BRANCH_IMPLS:
        raise ConfigError(f"{where} must be one of {BRANCH_IMPLS}, got {name!r}")
    return name


def resolve_impl(name: str, device: torch.device, training: bool, where: str = "branch_impl") -> str:
    """The path that runs: ``"efficient"``, ``"plain"`` or ``"compiled"``. ``training``: gradients
    are needed or the layer is in training mode; otherwise "auto" runs the plain ops, which keep
    nothing for backward then."""
    check_branch_impl(name, where)
    if device.type not in _DEVICES:
        return "plain"  # meta and other devices: no generator-based masks there
    if name == "auto":
        return _AUTO_IMPL[device.type] if training else "plain"
    return name


# -- activations and their derivatives ---------------------------------------------------------


def _act_backward_(name: str, grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``grad * act'(pre)`` written over ``pre`` (aten's fused backward kernels: one pass, and no
    new wide tensor)."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(grad, pre, approximate="none", grad_input=pre)
    if name == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, pre, grad_input=pre)
    if name == "identity":
        return pre.copy_(grad)
    raise ConfigError(f"unknown activation {name!r}")


def _threshold(p: float) -> int:
    """Dropout draws 16 random bits per element and drops values below this threshold: ``p``
    rounded to a multiple of 2**-16 (0.05 becomes 0.0500031)."""
    return min(65535, max(1, round(p * 65536)))


def keep_scale(p: float) -> float:
    """1 / P(keep) for the rounded probability, so that a dropped-out tensor keeps its mean."""
    return 65536.0 / (65536 - _threshold(p))


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


_INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


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
        flat = t.detach().view(-1).view(_INT_VIEWS[t.element_size()])
        _core.dropout_zero_(flat.numpy(), self.seed, self.threshold, self.offsets[site])
        return t

    def zeroed(self, site: int, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``t`` with the site's dropped elements zeroed."""
        return self.zero_(site, t.clone(memory_format=torch.contiguous_format))


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


def dropout_masks(
    shapes: list[torch.Size], p: float, seed: int, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """The masks (0 or `keep_scale`) that the dropout sites multiply by for ``seed``."""
    return [
        torch.full(drop.shape, keep_scale(p), device=device, dtype=dtype).masked_fill_(drop, 0.0)
        for drop in dropout_drops(shapes, p, seed, device)
    ]


def site_shapes(x_shape: torch.Size, r_e: int, out_features: int) -> list[torch.Size]:
    """Shapes of the three dropout sites: the input, ``act(E x)`` and the output."""
    lead = tuple(x_shape[:-1])
    return [torch.Size(x_shape), torch.Size(lead + (r_e,)), torch.Size(lead + (out_features,))]


def draw_seed() -> int:
    return int(torch.randint(0, _SEED_BOUND, (), dtype=torch.int64).item())


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _DenseBranch(torch.autograd.Function):
    # The 1/P(keep) factors of dropout are applied to r-wide tensors (``E x`` and ``M h``) or
    # folded into the output scale, so each wide dropout costs one ``masked_fill`` with a bool mask.

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        encoder: torch.Tensor,
        m: torch.Tensor,
        decoder: torch.Tensor,
        scale: float,
        act_e: str,
        act_d: str,
        p: float,
        seed: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        e, mm, d = _cast(encoder, dtype), _cast(m, dtype), _cast(decoder, dtype)
        x1 = _cast(x, dtype)
        if p > 0:
            inv = keep_scale(p)
            drops = SiteDropout(site_shapes(x.shape, e.shape[0], d.shape[0]), p, seed, x.device)
            a = F.linear(drops.zeroed(0, x1), e).mul_(inv)  # (..., r_e), saved
            h = activation_fn(act_e)(a)
            h = drops.zeroed(1, h) if h is a else drops.zero_(1, h)
            g = F.linear(h, mm).mul_(inv)  # (..., r_d), saved
        else:
            inv, drops = 1.0, None
            a = F.linear(x1, e)
            g = F.linear(activation_fn(act_e)(a), mm)
        c = scale * inv
        if act_d == "identity":
            y = F.linear(g * c, d)  # the scale on the r-wide side: no wide pass for it
            if drops is not None:
                drops.zero_(2, y)
        else:
            y = F.linear(g, d)  # (..., out): the wide tensors, none of them kept
            if act_d == "silu":
                F.silu(y, inplace=True)
            else:
                torch.ops.aten.gelu_(y)
            if drops is not None:
                drops.zero_(2, y)
            y.mul_(c)
        ctx.save_for_backward(x, encoder, m, decoder, a, g)
        ctx.config = (scale, act_e, act_d, p, seed, dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, encoder, m, decoder, a, g = ctx.saved_tensors
        scale, act_e, act_d, p, seed, dtype = ctx.config
        need_x, need_e, need_m, need_d = ctx.needs_input_grad[:4]
        e, mm, d = _cast(encoder, dtype), _cast(m, dtype), _cast(decoder, dtype)
        r_e, r_d = a.shape[-1], g.shape[-1]
        if p > 0:
            inv = keep_scale(p)
            drops = SiteDropout(site_shapes(x.shape, r_e, d.shape[0]), p, seed, x.device)
        else:
            inv, drops = 1.0, None
        c = scale * inv

        gy = _cast(grad_out, dtype)
        if act_d == "identity":
            gz = gy if drops is None else drops.zeroed(2, gy)
        else:
            # act'(z) * (grad * keep) == (grad * act'(z)) * keep: one new wide tensor, z itself.
            gz = _act_backward_(act_d, gy, F.linear(g, d))
            if drops is not None:
                drops.zero_(2, gz)
        del gy
        # gz lacks the factor c (= scale / P(keep)); it is applied to the small results below.
        gz2 = gz.reshape(-1, gz.shape[-1])
        g2 = g.reshape(-1, r_d)
        grad_d = _cast((gz2.t() @ g2).mul_(c), decoder.dtype) if need_d else None
        gg = (gz2 @ d).mul_(c * inv)  # (N, r_d); inv: the 1/P(keep) inside g
        del gz, gz2

        a2 = a.reshape(-1, r_e)
        grad_m = None
        if need_m:
            h = activation_fn(act_e)(a2)
            if drops is not None:
                h = drops.zeroed(1, h) if h is a2 else drops.zero_(1, h)
            grad_m = _cast(gg.t() @ h, m.dtype)
        grad_x = grad_e = None
        if need_x or need_e:
            gh = gg @ mm  # (N, r_e)
            if drops is not None:
                drops.zero_(1, gh)
            ga = _act_backward_(act_e, gh, a2.clone()) if act_e != "identity" else gh
            if p > 0:
                ga.mul_(inv)  # the 1/P(keep) inside a
            if need_e:
                x1 = _cast(x.reshape(-1, x.shape[-1]), dtype)
                if drops is not None:
                    x1 = drops.zeroed(0, x1)
                grad_e = _cast(ga.t() @ x1, encoder.dtype)
                del x1
            if need_x:
                gx = (ga @ e).view(x.shape)
                if drops is not None:
                    drops.zero_(0, gx)
                grad_x = _cast(gx, x.dtype)
        return grad_x, grad_e, grad_m, grad_d, None, None, None, None, None, None


def efficient_branch(
    x: torch.Tensor,
    encoder: torch.Tensor,
    m: torch.Tensor,
    decoder: torch.Tensor,
    *,
    scale: float,
    activation: Activations,
    dropout: float = 0.0,
    training: bool = False,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """`functional.dense_branch` with r-wide saved tensors (see the module docstring).

    Runs in the autocast dtype when autocast is on for ``x``'s device, else in ``encoder``'s dtype.
    ``seed`` fixes the dropout masks (`dropout_masks` of `site_shapes`: the input, the encoder side
    and the output); by default one is drawn from torch's default generator.
    """
    encoder_side, decoder_side = split_activations(activation)
    activation_fn(encoder_side), activation_fn(decoder_side)  # typed error for an unknown name
    p = float(dropout) if training else 0.0
    if p > 0 and seed is None:
        seed = draw_seed()
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _DenseBranch.apply(x, encoder, m, decoder, scale, encoder_side, decoder_side, p, seed or 0, dtype)
    return _DenseBranch.apply(x, encoder, m, decoder, scale, encoder_side, decoder_side, p, seed or 0, encoder.dtype)


_compiled: Optional[Callable[..., torch.Tensor]] = None
_compile_failed = False


def compiled_branch(x: torch.Tensor, encoder: torch.Tensor, m: torch.Tensor, decoder: torch.Tensor, **kw: Any) -> torch.Tensor:
    """``torch.compile`` of the reference branch (its partitioner recomputes the cheap wide
    elementwise ops instead of saving them); the efficient path if compiling is not possible."""
    global _compiled, _compile_failed
    if not _compile_failed:
        try:
            if _compiled is None:
                _compiled = torch.compile(dense_branch, dynamic=True)
            if not torch.is_autocast_enabled(x.device.type):
                x = x.to(encoder.dtype)
            return _compiled(x, encoder, m, decoder, **kw)
        except Exception as exc:  # a missing compiler or backend: fall back for the whole process
            _compile_failed = True
            warnings.warn(f"torch.compile of the DenseLoRA branch failed ({type(exc).__name__}: {exc}); using the efficient path", RuntimeWarning, stacklevel=2)
    return efficient_branch(x, encoder, m, decoder, **kw)
