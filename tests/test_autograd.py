"""The efficient autograd path of the branch against the plain tensor ops: forward, gradients,
gradcheck, dropout masks, autocast, gradient checkpointing, devices, and what autograd keeps."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binomtest

import denselora as dl
from denselora import _core
from denselora.errors import ArgumentError, ConfigError, DTypeError, LayoutError, ShapeError
from denselora.kernels import dropout as dl_dropout
from denselora.kernels.dropout import dropout_masks, site_shapes
from denselora.method import paths as dl_paths
from denselora.method.autograd import efficient_branch
from denselora.method.functional import dense_branch

from conftest import randomize_adapter, tiny_llama

ACTS = ("gelu", "identity", "silu")
PAIRS = list(itertools.product(ACTS, ACTS))
REFERENCE_ACT = {"gelu": lambda t: F.gelu(t), "identity": lambda t: t, "silu": lambda t: t * torch.sigmoid(t)}


def _factors(dtype=torch.float32, seed=0, in_f=12, out_f=10, r_e=4, r_d=3, shape=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, in_f, generator=g, dtype=dtype).requires_grad_()
    e = (torch.randn(r_e, in_f, generator=g, dtype=dtype) * 0.5).requires_grad_()
    m = (torch.randn(r_d, r_e, generator=g, dtype=dtype) * 0.5).requires_grad_()
    d = (torch.randn(out_f, r_d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    return x, e, m, d


def _float32_atol(reference):
    """Two float32 computations of the same sums in a different order agree to a few units of
    roundoff of the largest term, not of each element: 1e-6 relative to the tensor's largest value."""
    return 1e-6 * max(1.0, float(reference.abs().max()) if reference.numel() else 0.0)


def _run(fn, tensors, weights, **kw):
    for t in tensors:
        t.grad = None
    y = fn(*tensors, **kw)
    (y * weights).sum().backward()
    return [y.detach()] + [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("pair", PAIRS)
def test_forward_and_gradients_equal_plain_path(pair):
    tensors = _factors()
    weights = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(9))
    kw = dict(scale=1.7, activation=pair, dropout=0.0, training=True)
    plain = _run(dense_branch, tensors, weights, **kw)
    fast = _run(efficient_branch, tensors, weights, **kw)
    for name, a, b in zip(("y", "x", "E", "M", "D"), plain, fast):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=_float32_atol(a), msg=f"{pair} {name}")


@pytest.mark.parametrize("shape", [(0, 12), (12,), "transposed"])
def test_odd_input_shapes_equal_plain_path(shape):
    """No tokens, a single vector, and a non-contiguous input."""
    _, e, m, d = _factors()
    g = torch.Generator().manual_seed(2)
    if shape == "transposed":
        x = torch.randn(3, 12, 4, generator=g).transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(*shape, generator=g).requires_grad_()
    tensors = (x, e, m, d)
    weights = torch.randn(*x.shape[:-1], 10, generator=g)
    kw = dict(scale=1.1, activation=("silu", "gelu"), dropout=0.0, training=True)
    plain = _run(dense_branch, tensors, weights, **kw)
    fast = _run(efficient_branch, tensors, weights, **kw)
    for name, a, b in zip(("y", "x", "E", "M", "D"), plain, fast):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=_float32_atol(a), msg=name)


def _masked_reference(x, e, m, d, *, scale, pair, p, seed):
    """The formula written out with the three masks drawn from ``seed`` (autograd differentiates it)."""
    act_e, act_d = REFERENCE_ACT[pair[0]], REFERENCE_ACT[pair[1]]
    m1, m2, m3 = dropout_masks(site_shapes(x.shape, e.shape[0], d.shape[0]), p, seed, x.device, x.dtype)
    h = act_e((x * m1) @ e.T)
    y = act_d((h * m2) @ m.T @ d.T)
    return scale * y * m3


@pytest.mark.parametrize("pair", [("gelu", "gelu"), ("silu", "identity"), ("identity", "gelu")])
def test_dropout_masks_regenerated_from_seed(pair):
    tensors = _factors()
    weights = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(9))
    ref = _run(lambda *t: _masked_reference(*t, scale=0.9, pair=pair, p=0.3, seed=1234), tensors, weights)
    fast = _run(efficient_branch, tensors, weights, scale=0.9, activation=pair, dropout=0.3, training=True, seed=1234)
    for name, a, b in zip(("y", "x", "E", "M", "D"), ref, fast):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=_float32_atol(a), msg=f"{pair} {name}")
    # Dropout really acts: some outputs are zeroed, and not in eval.
    assert (fast[0] == 0).any()
    evaluated = efficient_branch(*tensors, scale=0.9, activation=pair, dropout=0.3, training=False, seed=1234)
    plain_eval = dense_branch(*tensors, scale=0.9, activation=pair, dropout=0.3, training=False)
    torch.testing.assert_close(evaluated, plain_eval)


def test_dropout_mask_statistics_and_seeds():
    p, cpu = 0.3, torch.device("cpu")
    shapes = [torch.Size([200, 500]), torch.Size([200, 7]), torch.Size([200, 500])]
    masks = dropout_masks(shapes, p, 5, cpu, torch.float32)
    assert [m.shape for m in masks] == shapes
    for mask in (masks[0], masks[2]):
        torch.testing.assert_close(torch.unique(mask), torch.tensor([0.0, 1.0 / (1.0 - p)]), rtol=1e-4, atol=0)  # p rounded to 2**-16
        assert abs((mask == 0).float().mean().item() - p) < 0.01
    assert not torch.equal(masks[0], masks[2])  # the sites are independent
    for again, mask in zip(dropout_masks(shapes, p, 5, cpu, torch.float32), masks):
        assert torch.equal(again, mask)
    assert not torch.equal(dropout_masks(shapes, p, 6, cpu, torch.float32)[0], masks[0])


# -- the CPU mask generator (Rust, counter-based) -------------------------------------------


def _mask(n, seed, threshold, offset=0):
    out = np.empty(n, dtype=bool)
    _core.dropout_mask(out, seed, threshold, offset)
    return out


_U64 = (1 << 64) - 1


def _splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def _fmix32(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _reference_mask(n, seed, threshold, offset):
    """The generator's definition in numpy uint32 arithmetic (block keys from Python integers);
    counters wrap modulo 2**64."""
    counters = np.arange(n, dtype=np.uint64) + np.uint64(offset)
    words = counters >> np.uint64(1)
    blocks = words >> np.uint64(32)
    hashes = np.empty(n, dtype=np.uint32)
    for hi in np.unique(blocks):
        block = _splitmix64((_splitmix64(seed) + int(hi)) & _U64)
        k1, k2 = np.uint32(block & 0xFFFFFFFF), np.uint32(block >> 32)
        sel = blocks == hi
        lo = (words[sel] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        hashes[sel] = _fmix32(_fmix32(lo ^ k1) ^ k2)
    halves = np.where(counters % np.uint64(2) == 0, hashes & np.uint32(0xFFFF), hashes >> np.uint32(16))
    return halves < threshold


@pytest.mark.parametrize(("seed", "offset"), [(0, 0), (1234, 7), (2**64 - 1, 2**33 - 1501), (99, 2**64 - 1000)])
def test_cpu_mask_equals_numpy_reference(seed, offset):
    # The third range crosses the first 2**32-word block boundary, the last one wraps at 2**64.
    with np.errstate(over="ignore"):
        expected = _reference_mask(3001, seed, 20000, offset)
    np.testing.assert_array_equal(_mask(3001, seed, 20000, offset), expected)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_cpu_mask_drop_rate_is_binomial(p):
    threshold = dl_dropout._threshold(p)
    (drops,) = dl_dropout.dropout_drops([torch.Size([1 << 21])], p, 31 + int(p * 100), torch.device("cpu"))
    assert binomtest(int(drops.sum()), drops.numel(), threshold / 65536).pvalue > 1e-4


def test_cpu_mask_neighbours_and_seeds_independent():
    """At p = 1/2, disjoint pairs of neighbours (within one 32-bit hash and across two), and the
    same index under consecutive seeds, are both dropped a quarter of the time."""
    n = 1 << 21
    a = _mask(n, 1000, 32768)
    within, across = a[0::2] & a[1::2], a[1:-1:2] & a[2::2]
    for pairs in (within, across):
        assert binomtest(int(pairs.sum()), pairs.size, 0.25).pvalue > 1e-4
    for seed in (1000, 1001, 2**40):
        both = _mask(n, seed, 32768) & _mask(n, seed + 1, 32768)
        assert binomtest(int(both.sum()), n, 0.25).pvalue > 1e-4


def test_cpu_mask_chunks_equal_the_whole():
    n = 10007
    whole = _mask(n, 77, 9000)
    for k in (1, 2, 255, 512, 513, 4096, n - 1):
        np.testing.assert_array_equal(np.concatenate([_mask(k, 77, 9000), _mask(n - k, 77, 9000, offset=k)]), whole)
    # A torch bool tensor's numpy view is filled in place (what dropout_drops does).
    t = torch.zeros(n, dtype=torch.bool)
    _core.dropout_mask(t.numpy(), 77, 9000)
    np.testing.assert_array_equal(t.numpy(), whole)
    # Negative seeds wrap modulo 2**64, as torch.Generator.manual_seed takes them.
    drops = [dl_dropout.dropout_drops([torch.Size([n])], 0.3, seed, "cpu")[0] for seed in (-5, 2**64 - 5)]
    assert torch.equal(*drops)


def test_cpu_mask_bad_inputs():
    out = np.zeros(100, dtype=bool)
    for threshold in (0, 65536, -1, 1.5):
        with pytest.raises(ArgumentError, match="threshold"):
            _core.dropout_mask(out, 1, threshold)
    for name, kwargs in (("seed", {"seed": -1}), ("seed", {"seed": 2**64}), ("offset", {"offset": -3})):
        with pytest.raises(ArgumentError, match=name):
            _core.dropout_mask(out, **{"seed": 1, "threshold": 5, **kwargs})
    with pytest.raises(LayoutError, match="out.*contiguous"):
        _core.dropout_mask(np.zeros(100, dtype=bool)[::2], 1, 5)
    readonly = np.zeros(10, dtype=bool)
    readonly.flags.writeable = False
    with pytest.raises(LayoutError, match="out"):
        _core.dropout_mask(readonly, 1, 5)
    with pytest.raises(ShapeError, match="out"):
        _core.dropout_mask(np.zeros((4, 4), dtype=bool), 1, 5)
    for bad in (np.zeros(10, dtype=np.uint8), [False] * 10):
        with pytest.raises(DTypeError, match="out"):
            _core.dropout_mask(bad, 1, 5)
    with pytest.raises(ArgumentError, match="seed"):
        dl_dropout.dropout_drops([torch.Size([4])], 0.1, 2**64, "cpu")
    assert not out.any() and not readonly.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_site_dropout_zeroes_what_the_masks_drop(dtype):
    # The in-place zeroing of each site (the CPU training path) equals masked_fill with the bool
    # masks of the same seed, site by site (each site at its offset of the stream).
    shapes = site_shapes(torch.Size([3, 7, 33]), 5, 19)
    drops = dl_dropout.SiteDropout(shapes, 0.3, 4242, torch.device("cpu"))
    masks = dl_dropout.dropout_drops(shapes, 0.3, 4242, "cpu")
    for site, (shape, mask) in enumerate(zip(shapes, masks)):
        t = torch.randn(shape, generator=torch.Generator().manual_seed(site)).to(dtype) + 3.0  # no zeros
        expected = t.masked_fill(mask, 0.0)
        assert torch.equal(drops.zeroed(site, t), expected)
        assert not (t == 0).any()  # zeroed copies
        assert torch.equal(drops.zero_(site, t), expected) and torch.equal(t, expected)
        assert (expected == 0).any() and (expected != 0).any()
    # A non-contiguous input is copied in row-major order; the mask follows its logical layout.
    x = torch.randn(33, 7, 3).permute(2, 1, 0)
    assert torch.equal(drops.zeroed(0, x), x.masked_fill(masks[0], 0.0))
    with pytest.raises(ArgumentError, match="dropout site 0"):
        drops.zero_(0, x)


def test_cpu_zeroing_bad_inputs():
    data = np.ones(100, dtype=np.int32)
    with pytest.raises(ArgumentError, match="threshold"):
        _core.dropout_zero_(data, 1, 0)
    with pytest.raises(ArgumentError, match="seed"):
        _core.dropout_zero_(data, -1, 5)
    with pytest.raises(LayoutError, match="data.*contiguous"):
        _core.dropout_zero_(data[::2], 1, 5)
    with pytest.raises(ShapeError, match="data"):
        _core.dropout_zero_(np.ones((4, 4), dtype=np.int32), 1, 5)
    for bad in (np.ones(10, dtype=np.float32), np.ones(10, dtype=np.int8), [1] * 10):
        with pytest.raises(DTypeError, match="data"):
            _core.dropout_zero_(bad, 1, 5)
    assert (data == 1).all()


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_gradcheck_float64(pair, dropout):
    x, e, m, d = _factors(torch.float64, in_f=5, out_f=4, r_e=3, r_d=2, shape=(2, 3))

    def fn(x, e, m, d):
        return efficient_branch(x, e, m, d, scale=1.3, activation=pair, dropout=dropout, training=True, seed=77)

    assert torch.autograd.gradcheck(fn, (x, e, m, d), eps=1e-6, atol=1e-5)


def _adapted_llama(dropout=0.1, activation="gelu", targets=("up_proj",), **base_config):
    """A tiny llama with DenseLoRA (r=4) on ``targets`` (up_proj: 32 -> 48), non-zero adapter."""
    base = tiny_llama(**base_config)
    config = dl.DenseLoRAConfig(r=4, dropout=dropout, activation=activation, target_modules=list(targets))
    model = dl.get_denselora_model(base, config)
    randomize_adapter(model)
    model.train()
    return model


def _grads(model, tokens, impl, **autocast):
    model.set_branch_path(impl)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(42)
    if autocast:
        with torch.autocast("cpu", **autocast):
            loss = model(input_ids=tokens, labels=tokens).loss
    else:
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach().float(), {k: t.grad.clone() for k, t in model.adapter_state().items()}


def test_layer_dropout_uses_seed_from_default_generator(tokens):
    """In a model, the efficient path's masks are the reference formula's for the seed drawn from
    torch's default generator: ``torch.manual_seed`` makes a training step repeatable."""
    model = _adapted_llama(dropout=0.2)
    _, layer = next(iter(model.adapter_layers()))
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    encoder, m, decoder = layer._factors(x.device)
    torch.manual_seed(11)
    seed = dl_dropout.draw_seed()
    expected = _masked_reference(x, encoder, m, decoder, scale=layer.scaling, pair=layer.activation, p=0.2, seed=seed)
    torch.manual_seed(11)
    torch.testing.assert_close(layer.branch(x), expected, rtol=1e-5, atol=1e-6)
    loss_a, grads_a = _grads(model, tokens, "efficient")
    loss_b, grads_b = _grads(model, tokens, "efficient")
    assert loss_a == loss_b
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["gelu", "identity"])
def test_model_gradients_equal_plain_path(tokens, activation):
    model = _adapted_llama(dropout=0.0, activation=activation, targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"))
    loss_p, grads_p = _grads(model, tokens, "reference")
    loss_e, grads_e = _grads(model, tokens, "efficient")
    loss_a, grads_a = _grads(model, tokens, "auto")
    torch.testing.assert_close(loss_e, loss_p)
    torch.testing.assert_close(loss_a, loss_p)
    for k in grads_p:
        assert grads_p[k].abs().sum() > 0, k
        torch.testing.assert_close(grads_e[k], grads_p[k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(grads_a[k], grads_p[k], rtol=1e-4, atol=1e-6, msg=k)


def test_autocast_bfloat16_cpu(tokens):
    model = _adapted_llama(dropout=0.0)
    _, layer = next(iter(model.adapter_layers()))
    x = torch.randn(2, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.branch(x.requires_grad_()).dtype == torch.bfloat16
    loss_p, grads_p = _grads(model, tokens, "reference", dtype=torch.bfloat16)
    loss_e, grads_e = _grads(model, tokens, "efficient", dtype=torch.bfloat16)
    _, grads_32 = _grads(model, tokens, "reference")
    torch.testing.assert_close(loss_e, loss_p, rtol=2e-2, atol=2e-2)
    for k in grads_p:
        assert grads_e[k].dtype == torch.float32  # the parameters' dtype, not the autocast one
        # Both bf16 paths are as close to each other as to the float32 gradients.
        scale = grads_32[k].abs().max()
        assert (grads_e[k] - grads_p[k]).abs().max() <= 0.05 * scale, k
        assert (grads_e[k] - grads_32[k]).abs().max() <= 0.05 * scale, k


def _enable_checkpointing(model, reentrant):
    base = model.get_base_model()
    kwargs = {"use_reentrant": reentrant}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_gradients(tokens, reentrant):
    """With dropout on, recomputation must draw the forward's masks again."""
    # Eager attention: some torch versions' SDPA backward differs in the last bits when recomputed.
    targets = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    model = _adapted_llama(dropout=0.2, targets=targets, attn_implementation="eager")
    loss_ref, grads_ref = _grads(model, tokens, "auto")
    fresh = _adapted_llama(dropout=0.2, targets=targets, attn_implementation="eager")
    fresh.load_state_dict(model.state_dict())
    _enable_checkpointing(fresh, reentrant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_ck, grads_ck = _grads(fresh, tokens, "auto")
    torch.testing.assert_close(loss_ck, loss_ref)
    for k in grads_ref:
        assert grads_ref[k].abs().sum() > 0, k
        torch.testing.assert_close(grads_ck[k], grads_ref[k], rtol=1e-5, atol=1e-7, msg=k)


def _saved(fn):
    """The tensors autograd keeps for backward while ``fn`` runs."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _activation_bytes(saved, params):
    """Bytes of distinct storages kept for backward, leaving out parameters."""
    param_ptrs = {p.data_ptr() for p in params}
    storages = {}
    for t in saved:
        if t.data_ptr() not in param_ptrs:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("pair", [("gelu", "gelu"), ("gelu", "identity"), ("silu", "silu")])
def test_saved_tensors_are_r_wide(pair):
    """What autograd keeps: the plain path keeps out-wide tensors; the efficient path only the
    input (which the base layer keeps anyway), the parameters and r-wide tensors."""
    r, out_f, in_f = 4, 96, 48
    layer_model = dl.get_denselora_model(
        torch.nn.Sequential(torch.nn.Linear(in_f, out_f)),
        dl.DenseLoRAConfig(r=r, dropout=0.1, encoder_activation=pair[0], decoder_activation=pair[1], target_modules=["0"]),
    )
    layer_model.train()
    _, layer = next(iter(layer_model.adapter_layers()))
    params = [layer.shared.encoder, layer.shared.decoder, layer.m]
    x = torch.randn(3, 5, in_f, requires_grad=True)

    layer.branch_path = "reference"
    _, saved_plain = _saved(lambda: layer.branch(x))
    layer.branch_path = "efficient"
    out, saved_fast = _saved(lambda: layer.branch(x))
    out.sum().backward()  # the saved tensors suffice for backward

    assert any(t.shape[-1] == out_f for t in saved_plain)
    for t in saved_fast:
        is_param = any(t is p for p in params)
        assert is_param or t is x or t.shape[-1] <= r, (tuple(t.shape), pair)
    assert sum(t is x for t in saved_fast) == 1
    plain_bytes = _activation_bytes(saved_plain, params) - x.untyped_storage().nbytes()
    fast_bytes = _activation_bytes(saved_fast, params) - x.untyped_storage().nbytes()
    assert fast_bytes == 2 * 3 * 5 * r * 4  # E x before its activation and M h: r wide, float32
    assert plain_bytes > 4 * fast_bytes

    # Through a whole model the same holds: fewer bytes kept, the base model's own unchanged.
    def kept(impl):
        model = _adapted_llama(dropout=0.1)
        model.set_branch_path(impl)
        tokens = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
        loss, saved = _saved(lambda: model(input_ids=tokens, labels=tokens).loss)
        return _activation_bytes(saved, list(model.parameters()))

    assert kept("efficient") < kept("reference")


def test_branch_path_setting_and_errors(tokens):
    model = _adapted_llama(dropout=0.0)
    with pytest.raises(ConfigError, match="set_branch_path"):
        model.set_branch_path("plain")
    _, layer = next(iter(model.adapter_layers()))
    with pytest.raises(ConfigError, match="bogus"):
        layer.branch_path = "bogus"
    assert layer.branch_path == "auto"
    model.set_branch_path("reference")
    assert all(layer.branch_path == "reference" for _, layer in model.adapter_layers())
    x = torch.randn(2, 3, 32, requires_grad=True)
    _, saved = _saved(lambda: layer.branch(x))
    assert any(t.shape[-1] == 48 for t in saved)  # up_proj is 32 -> 48: the plain path keeps wide tensors
    model.set_branch_path("auto")
    _, saved = _saved(lambda: layer.branch(x))
    assert not any(t.shape[-1] == 48 and t.dim() == 3 for t in saved)
    # Inference under no_grad: the plain ops (nothing is kept either way) give the same output.
    model.eval()
    with torch.no_grad():
        plain = layer.branch(x)
        layer.branch_path = "efficient"
        torch.testing.assert_close(layer.branch(x), plain)


def test_compiled_falls_back_when_compile_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(dl_paths, "_compiled", None)
    monkeypatch.setattr(dl_paths, "_compile_failed", False)
    tensors = _factors()
    weights = torch.ones(2, 5, 10)
    kw = dict(scale=1.0, activation="gelu", dropout=0.0, training=True)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        compiled = _run(dl_paths.compiled_branch, tensors, weights, **kw)
    plain = _run(dense_branch, tensors, weights, **kw)
    for a, b in zip(plain, compiled):
        torch.testing.assert_close(b, a)


def test_bfloat16_base_model_float32_adapter(tokens):
    """A bf16 base model without autocast: the branch runs in float32 (the adapter's dtype) on a
    cast of the input; the efficient path keeps the bf16 input itself, not the float32 copy."""
    model = _adapted_llama(dropout=0.0)
    model.get_base_model().to(torch.bfloat16)
    for tensor in model.adapter_state().values():
        tensor.data = tensor.data.float()
    loss_p, grads_p = _grads(model, tokens, "reference")
    loss_e, grads_e = _grads(model, tokens, "efficient")
    torch.testing.assert_close(loss_e, loss_p)
    for k in grads_p:
        assert grads_e[k].dtype == torch.float32
        torch.testing.assert_close(grads_e[k], grads_p[k], rtol=1e-3, atol=1e-5, msg=k)
    _, layer = next(iter(model.adapter_layers()))
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16, requires_grad=True)
    out, saved = _saved(lambda: layer.branch(x))
    assert out.dtype == torch.float32
    assert not any(t.dtype == torch.float32 and t.shape[-1] == 32 and t.dim() == 3 for t in saved)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_factors_on_another_device_cuda():
    """Shared factors on the CPU, the layer on CUDA: gradients reach the one CPU parameter and
    equal the plain path's."""
    model = _adapted_llama(dropout=0.0)
    for _, layer in model.adapter_layers():
        layer.base_layer.cuda()
        layer.m.data = layer.m.data.cuda()
    _, layer = next(iter(model.adapter_layers()))
    x = torch.randn(2, 3, 32, device="cuda", requires_grad=True)
    grads = {}
    for impl in ("reference", "efficient"):
        layer.branch_path = impl
        layer.shared.encoder.grad = None
        layer(x).square().sum().backward()
        grads[impl] = layer.shared.encoder.grad.clone()
    assert grads["reference"].device.type == "cpu"
    torch.testing.assert_close(grads["efficient"], grads["reference"], rtol=1e-4, atol=1e-5)
