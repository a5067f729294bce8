"""The memory-lean autograd path of the DenseLoRA branch.

The branch ``s * drop3(act_d(D @ M @ drop2(act_e(E @ drop1(x)))))`` written as plain tensor
operations (`functional.dense_branch`, the reference) makes autograd keep the decoder's
pre-activation and the last dropout mask, both as wide as the layer's output, for every adapted
layer and token. This path keeps only what is ``r`` wide (``E @ x`` before its activation, and
``M @ h``) plus the input ``x``, which the base layer keeps anyway (the same tensor, so no extra
memory):

- the decoder's pre-activation ``D @ g`` is recomputed in backward (one ``r``-wide matmul), and
  not at all when the decoder side is ``identity``;
- dropout masks are a function of a seed drawn per call, redrawn in backward, never stored
  (`denselora.kernels.dropout`).

It is a plain ``torch.autograd.Function`` over the factors: DDP's gradient hooks and FSDP's
parameter gathering see it as they see ``F.linear``. Under autocast the branch runs in the autocast
dtype, as the reference's matmuls do; the inputs are cast inside the function and the float32
originals are what is saved, so nothing extra is kept. Double backward is not supported (use the
``"reference"`` branch path for higher-order gradients).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..kernels.dropout import SiteDropout, draw_seed, keep_scale, site_shapes
from .functional import Activations, activation_fn, split_activations

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
    ``seed`` fixes the dropout masks (`denselora.kernels.dropout.dropout_masks` of its
    `site_shapes`: the input, the encoder side and the output); by default one is drawn from
    torch's default generator.
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
