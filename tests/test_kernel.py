"""The fused Rust kernel against a float64 numpy reference, its errors and threads, and its use by
the adapted layers at CPU inference."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy.special import erfc

import denselora as dl
from denselora import _core, kernels
from denselora.errors import ArgumentError, ConfigError, DTypeError, LayoutError, NonFiniteError, ShapeError

from conftest import randomize_adapter, tiny_gpt2, tiny_llama

ACTIVATIONS = ["gelu", "identity", "silu"]


def act64(name: str, v: np.ndarray) -> np.ndarray:
    if name == "gelu":
        return v * 0.5 * erfc(-v / np.sqrt(2.0))  # erfc: no cancellation in the left tail
    if name == "silu":
        return v / (1.0 + np.exp(-v))
    return v


def reference(x, e, m, d, scale, acts) -> np.ndarray:
    """float64 numpy: ``scale * act_d(D (M act_e(E x)))`` row by row."""
    h = act64(acts[0], x @ e.T)
    return scale * act64(acts[1], (h @ m.T) @ d.T)


# bfloat16 has no numpy dtype: arrays carry its bits as uint16; torch does the rounding.
def to_dtype(a: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(array the kernel takes, its exact values as float64)."""
    if dtype == "bfloat16":
        t = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
        return t.view(torch.uint16).numpy().copy(), t.double().numpy()
    arr = a.astype(dtype)
    return arr, arr.astype(np.float64)


def values(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return torch.from_numpy(a).view(torch.bfloat16).double().numpy()
    return a.astype(np.float64)


EPS = {"float32": 1.2e-7, "float16": 9.8e-4, "bfloat16": 7.9e-3}

CASES = [
    # (n, in, r_e, r_d, out)
    (1, 576, 16, 16, 192),
    (3, 33, 5, 7, 20),
    (8, 128, 32, 32, 96),
    (40, 100, 16, 16, 77),
    (130, 64, 8, 12, 48),
]


ISAS = ["avx512bf16", "avx512", "avx2", "portable"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Each vector backend in turn; skipped where this CPU lacks it."""
    if request.param not in kernels.available_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernel")
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(None)


def test_isa_choice_is_checked():
    available = kernels.available_isas()
    assert available[-1] == "portable" and set(available) <= set(ISAS)
    assert kernels.isa() in available
    with pytest.raises(ArgumentError, match="isa"):
        kernels.set_isa("sse9")
    with pytest.raises(ArgumentError, match="isa"):
        kernels.set_isa(3)
    try:
        kernels.set_isa("portable")
        assert kernels.isa() == "portable"
    finally:
        kernels.set_isa(None)
    if not {"DENSELORA_KERNEL_ISA", "DENSELORA_KERNEL_PORTABLE"} & set(os.environ):
        assert kernels.isa() == available[0]


@pytest.mark.parametrize("act_dtype,weight_dtype", [
    ("float32", "float32"),
    ("bfloat16", "float32"),
    ("bfloat16", "bfloat16"),
    ("float16", "float32"),
    ("float16", "float16"),
])
@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_float64_reference(case, act_dtype, weight_dtype, isa):
    n, d_in, r_e, r_d, d_out = case
    rng = np.random.default_rng(n * 1000 + d_in)
    acts = (ACTIVATIONS[n % 3], ACTIVATIONS[(n + d_in) % 3])
    x, xv = to_dtype(rng.normal(size=(n, d_in)), act_dtype)
    e, ev = to_dtype(rng.normal(size=(r_e, d_in)) / np.sqrt(d_in), weight_dtype)
    m, mv = to_dtype(rng.normal(size=(r_d, r_e)) / np.sqrt(r_e), weight_dtype)
    d, dv = to_dtype(rng.normal(size=(d_out, r_d)) / np.sqrt(r_d), weight_dtype)
    out0, out0v = to_dtype(rng.normal(size=(n, d_out)), act_dtype)
    want = out0v + reference(xv, ev, mv, dv, 0.5, acts)

    out = out0.copy()
    returned = kernels.fused_branch(x, e, m, d, scale=0.5, activation=acts, out=out)
    assert returned is out
    got = values(out, act_dtype)
    # One rounding to the output dtype, after f32 accumulation.
    tol = 2 * EPS[act_dtype] * np.abs(want) + 1e-5 * (1 + np.abs(want))
    assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want) - tol)

    fresh = kernels.fused_branch(x, e, m, d, scale=0.5, activation=acts)
    assert fresh.shape == (n, d_out) and fresh.dtype == x.dtype
    branch = reference(xv, ev, mv, dv, 0.5, acts)
    assert np.all(np.abs(values(fresh, act_dtype) - branch) <= 2 * EPS[act_dtype] * np.abs(branch) + 1e-5 * (1 + np.abs(branch)))


def test_gelu_is_the_exact_erf_form_over_a_wide_range():
    # E = M = D = I and identity after the decoder: the branch is gelu(x) itself.
    x = np.linspace(-12, 12, 24001, dtype=np.float32).reshape(-1, 1)
    one = np.ones((1, 1), np.float32)
    for name in ("gelu", "silu"):
        got = kernels.fused_branch(x, one, one, one, scale=1.0, activation=(name, "identity"))
        want = act64(name, x.astype(np.float64))
        slope = np.abs(act64(name, x.astype(np.float64) * (1 + 1e-7)) - want) * 1e7
        assert np.all(np.abs(got - want) <= 4e-7 * np.abs(want) + 2 * 1.2e-7 * slope + 1e-37)
        # ... and agrees with torch's own implementation (whose far tails are off by ~1e-6).
        torch_act = torch.nn.functional.gelu if name == "gelu" else torch.nn.functional.silu
        np.testing.assert_allclose(got, torch_act(torch.from_numpy(x)).numpy(), rtol=2e-6, atol=2e-6)


def test_torch_tensors_in_and_out_with_leading_dimensions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 24, generator=g).bfloat16()
    e, m, d = torch.randn(4, 24, generator=g), torch.randn(4, 4, generator=g), torch.randn(10, 4, generator=g)
    y = kernels.fused_branch(x, e, m, d, scale=2.0, activation="gelu")
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.shape == (2, 3, 10)
    want = reference(x.double().numpy().reshape(6, 24), e.double().numpy(), m.double().numpy(), d.double().numpy(), 2.0, ("gelu", "gelu"))
    np.testing.assert_allclose(y.double().numpy().reshape(6, 10), want, rtol=2e-2, atol=1e-3)
    # In place into a torch tensor, through a parameter that requires grad.
    out = torch.ones(2, 3, 10, dtype=torch.bfloat16)
    kernels.fused_branch(x, torch.nn.Parameter(e), m, d, scale=2.0, activation="gelu", out=out)
    np.testing.assert_allclose(out.double().numpy().reshape(6, 10), 1 + want, rtol=2e-2, atol=1e-2)


def small(dtype=np.float32):
    rng = np.random.default_rng(5)
    return (
        rng.normal(size=(3, 8)).astype(dtype),
        rng.normal(size=(4, 8)).astype(dtype),
        rng.normal(size=(4, 4)).astype(dtype),
        rng.normal(size=(6, 4)).astype(dtype),
    )


@pytest.mark.parametrize("argument,bad", [
    ("encoder", lambda x, e, m, d: (x, e[:, :7].copy(), m, d)),
    ("m", lambda x, e, m, d: (x, e, m[:, :3].copy(), d)),
    ("decoder", lambda x, e, m, d: (x, e, m, d[:, :3].copy())),
    ("encoder", lambda x, e, m, d: (x, e.reshape(-1), m, d)),
])
def test_shape_mismatches_name_the_argument(argument, bad):
    args = bad(*small())
    with pytest.raises(ShapeError, match=f"^{argument}:"):
        kernels.fused_branch(*args, scale=1.0, activation="gelu")


def test_dtype_layout_and_value_errors_name_the_argument():
    x, e, m, d = small()
    with pytest.raises(DTypeError, match="^x:"):
        kernels.fused_branch(x.astype(np.float64), e, m, d, scale=1.0, activation="gelu")
    with pytest.raises(DTypeError, match="^m:"):
        kernels.fused_branch(x, e, m.astype(np.float16), d, scale=1.0, activation="gelu")
    with pytest.raises(DTypeError, match="^decoder:"):
        kernels.fused_branch(x, e, m, torch.from_numpy(d).double(), scale=1.0, activation="gelu")
    with pytest.raises(DTypeError, match="^out:"):
        kernels.fused_branch(x, e, m, d, scale=1.0, activation="gelu", out=np.zeros((3, 6), np.float16))
    with pytest.raises(DTypeError, match="^encoder:"):
        kernels.fused_branch(x, e.tolist(), m, d, scale=1.0, activation="gelu")
    with pytest.raises(LayoutError, match="^x:"):
        kernels.fused_branch(np.asfortranarray(x), e, m, d, scale=1.0, activation="gelu")
    with pytest.raises(LayoutError, match="^encoder:"):
        kernels.fused_branch(x, np.ascontiguousarray(e.T).T, m, d, scale=1.0, activation="gelu")
    with pytest.raises(LayoutError, match="^x:"):
        kernels.fused_branch(torch.from_numpy(x).T, e[:, :3].copy(), m, d, scale=1.0, activation="gelu")
    read_only = np.zeros((3, 6), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(LayoutError, match="^out:.*read-only"):
        kernels.fused_branch(x, e, m, d, scale=1.0, activation="gelu", out=read_only)
    buffer = np.zeros(64, np.float32)
    with pytest.raises(LayoutError, match="^out:.*shares memory with x"):
        kernels.fused_branch(buffer[:24].reshape(3, 8), e, m, d, scale=1.0, activation="gelu", out=buffer[20:38].reshape(3, 6))
    with pytest.raises(LayoutError, match="^out:"):
        kernels.fused_branch(x, e, m, d, scale=1.0, activation="gelu", out=np.zeros((3, 12), np.float32)[:, ::2])
    with pytest.raises(ShapeError, match="^out:"):
        kernels.fused_branch(x, e, m, d, scale=1.0, activation="gelu", out=np.zeros((2, 6), np.float32))
    with pytest.raises(ShapeError, match="^out:"):
        kernels.fused_branch(x, e, m, d, scale=1.0, activation="gelu", out=np.zeros((3, 5), np.float32))
    with pytest.raises(ArgumentError, match="^decoder_activation:"):
        kernels.fused_branch(x, e, m, d, scale=1.0, activation=("gelu", "relu"))
    with pytest.raises(ArgumentError, match="^scale:"):
        kernels.fused_branch(x, e, m, d, scale=float("nan"), activation="gelu")
    with pytest.raises(ArgumentError, match="^x:"):
        kernels.fused_branch(torch.zeros(3, 8, device="meta"), e, m, d, scale=1.0, activation="gelu")


def test_nan_propagates_by_row_or_is_reported_with_check_finite():
    x, e, m, d = small()
    x[1, 3] = np.nan
    y = kernels.fused_branch(x, e, m, d, scale=1.0, activation="gelu")
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()
    out = np.ones((3, 6), np.float32)
    with pytest.raises(NonFiniteError, match="^x:"):
        kernels.fused_branch(x, e, m, d, scale=1.0, activation="gelu", out=out, check_finite=True)
    assert (out == 1).all()  # nothing written
    x[1, 3] = 0
    m[0, 0] = np.inf
    with pytest.raises(NonFiniteError, match="^m:"):
        kernels.fused_branch(x, e, m, d, scale=1.0, activation="gelu", check_finite=True)


def test_thread_setting_gives_identical_results():
    rng = np.random.default_rng(2)
    for n in (2, 200):  # decode split over the weights, prefill split over rows
        x = rng.normal(size=(n, 1024)).astype(np.float32)
        e = rng.normal(size=(64, 1024)).astype(np.float32)
        m = rng.normal(size=(64, 64)).astype(np.float32)
        d = rng.normal(size=(2048, 64)).astype(np.float32)
        results = []
        try:
            for threads in (1, 2, 3):
                kernels.set_num_threads(threads)
                assert kernels.get_num_threads() == threads
                results.append(kernels.fused_branch(x, e, m, d, scale=0.1, activation="gelu"))
        finally:
            kernels.set_num_threads(None)
        assert all(np.array_equal(results[0], r) for r in results[1:])
    assert kernels.get_num_threads() == torch.get_num_threads()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ArgumentError, match="num_threads"):
            kernels.set_num_threads(bad)


# -- the adapted layers -----------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """The input dtype of every layer call the kernel served."""
    calls = []
    real = kernels.KernelPath.add_

    def counting(self, out, x, *args, **kwargs):
        used = real(self, out, x, *args, **kwargs)
        if used:
            calls.append(x.dtype)
        return used

    monkeypatch.setattr(kernels.KernelPath, "add_", counting)
    return calls


def logits(model, tokens, path):
    model.set_branch_path(path)
    with torch.no_grad():
        return model(tokens).logits.double()


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("activation", ["gelu", "silu", "identity"])
def test_model_outputs_agree_between_branch_paths_in_float32(factory, activation, tokens, kernel_calls):
    config = dl.DenseLoRAConfig(r=4, activation=activation, encoder_activation="gelu")
    if factory is tiny_gpt2:
        config.target_modules = ["c_attn", "c_proj", "c_fc"]  # Conv1D layers
    model = dl.get_denselora_model(factory(), config)
    randomize_adapter(model)
    model.eval()
    torch_out = logits(model, tokens, "reference")
    assert kernel_calls == []
    rust_out = logits(model, tokens, "fused")
    layers = sum(1 for _ in model.adapter_layers())
    assert len(kernel_calls) == layers
    auto_out = logits(model, tokens, "auto")
    assert len(kernel_calls) == 2 * layers
    with model.disable_adapter():
        base = logits(model, tokens, "auto")
    assert (torch_out - base).abs().max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(rust_out.numpy(), torch_out.numpy(), rtol=1e-5, atol=1e-5)
    assert torch.equal(rust_out, auto_out)


def test_model_outputs_agree_in_bfloat16(tokens, kernel_calls):
    base = tiny_llama()
    # The paper's branch (GELU, s = alpha / r) keeps the adapter's share of the logits in the range
    # the bfloat16 tolerance below is written for.
    model = dl.get_denselora_model(base, dl.DenseLoRAConfig.paper(r=4))
    randomize_adapter(model)
    torch_f32 = logits(model, tokens, "reference")
    model.to(torch.bfloat16)  # adapter and base both in bfloat16
    kernel_calls.clear()
    rust_out = logits(model, tokens, "auto")
    assert kernel_calls and all(dt == torch.bfloat16 for dt in kernel_calls)
    torch_out = logits(model, tokens, "reference")
    scale = torch_f32.abs().max().item()
    assert (rust_out - torch_out).abs().max().item() < 0.05 * scale
    assert (rust_out - torch_f32).abs().max().item() < 0.05 * scale


def test_bfloat16_base_with_float32_adapter_uses_the_kernel(tokens, kernel_calls):
    model = dl.get_denselora_model(tiny_llama().to(torch.bfloat16), dl.DenseLoRAConfig(r=4))
    randomize_adapter(model)
    layer = next(layer for _, layer in model.adapter_layers())
    x = torch.randn(3, 5, layer.shared.in_features).bfloat16()
    with torch.no_grad():
        fast = layer(x)
        layer.branch_path = "reference"
        slow = layer(x)
    assert len(kernel_calls) == 1
    np.testing.assert_allclose(fast.double().numpy(), slow.double().numpy(), rtol=2e-2, atol=2e-2)


def test_auto_leaves_half_precision_prefill_to_torch(kernel_calls):
    model = dl.get_denselora_model(tiny_llama().to(torch.bfloat16), dl.DenseLoRAConfig(r=4))
    randomize_adapter(model)
    layer = next(layer for _, layer in model.adapter_layers())
    decode = torch.randn(1, 4, layer.shared.in_features).bfloat16()
    prefill = torch.randn(1, 64, layer.shared.in_features).bfloat16()
    with torch.no_grad():
        layer(decode)
        assert len(kernel_calls) == 1
        auto = layer(prefill)
        assert len(kernel_calls) == 1  # 64 rows in bfloat16: PyTorch
        layer.branch_path = "fused"
        forced = layer(prefill)
        assert len(kernel_calls) == 2
    np.testing.assert_allclose(forced.double().numpy(), auto.double().numpy(), rtol=2e-2, atol=2e-2)


def test_training_and_autograd_use_torch(tokens, kernel_calls):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    randomize_adapter(model)
    model.train()
    model(tokens, labels=tokens).loss.backward()
    model.eval()
    model(tokens, labels=tokens).loss.backward()  # eval, but gradients are wanted
    assert kernel_calls == []
    assert all(t.grad is not None for t in model.adapter_state().values())
    with torch.no_grad():
        model(tokens)
    assert len(kernel_calls) == sum(1 for _ in model.adapter_layers())


def test_kernel_sees_adapter_updates(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    randomize_adapter(model, seed=1)
    first = logits(model, tokens, "auto")
    randomize_adapter(model, seed=2)  # in place
    second = logits(model, tokens, "auto")
    np.testing.assert_allclose(second.numpy(), logits(model, tokens, "reference").numpy(), rtol=1e-5, atol=1e-5)
    assert (first - second).abs().max() > 1e-3
    layer = next(layer for _, layer in model.adapter_layers())
    layer.m = torch.nn.Parameter(torch.zeros_like(layer.m))  # replaced
    np.testing.assert_allclose(logits(model, tokens, "auto").numpy(), logits(model, tokens, "reference").numpy(), rtol=1e-5, atol=1e-5)


def test_copies_and_pickles_after_kernel_use(tokens):
    import copy
    import io

    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    randomize_adapter(model)
    first = logits(model, tokens, "auto")
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        assert torch.equal(logits(other, tokens, "auto"), first)
    with torch.no_grad():  # the clone's kernel reads the clone's own parameters
        next(layer for _, layer in clone.adapter_layers()).m.zero_()
    assert not torch.equal(logits(clone, tokens, "auto"), first)
    assert torch.equal(logits(model, tokens, "auto"), first)


def test_branch_path_names_are_checked(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    with pytest.raises(ConfigError, match="set_branch_path"):
        model.set_branch_path("cuda")
    layer = next(layer for _, layer in model.adapter_layers())
    with pytest.raises(ConfigError, match="branch_path"):
        layer.branch_path = "fast"
    assert layer.branch_path == "auto"
    # "fused" refuses what the kernel cannot take; "auto" falls back to torch.
    model.to(torch.float64)
    model.set_branch_path("fused")
    with torch.no_grad(), pytest.raises(ArgumentError, match="branch path 'fused'"):
        model(tokens)
    model.set_branch_path("auto")
    with torch.no_grad():
        assert model(tokens).logits.dtype == torch.float64
    # The kernel computes no gradients: "fused" refuses training, "auto" trains on PyTorch.
    model.to(torch.float32).train()
    model.set_branch_path("fused")
    with pytest.raises(ArgumentError, match="branch path 'fused'.*no gradients"):
        model(tokens)
    model.set_branch_path("auto")
    model(tokens, labels=tokens).loss.backward()


def test_prepared_branch_checks_its_weights():
    x, e, m, d = small()
    with pytest.raises(ShapeError, match="^m:"):
        _core.PreparedBranch(e, m[:, :3].copy(), d, scale=1.0, encoder_activation="gelu", decoder_activation="gelu")
    with pytest.raises(ArgumentError, match="^encoder_activation:"):
        _core.PreparedBranch(e, m, d, scale=1.0, encoder_activation="tanh", decoder_activation="gelu")
    prepared = _core.PreparedBranch(e, m, d, scale=0.5, encoder_activation="gelu", decoder_activation="silu")
    assert (prepared.in_features, prepared.out_features) == (8, 6)
    xt, out = torch.from_numpy(x), torch.zeros(3, 6)
    prepared.add_unchecked(xt.data_ptr(), out.data_ptr(), 3, "f32", 1)
    want = reference(x.astype(np.float64), e.astype(np.float64), m.astype(np.float64), d.astype(np.float64), 0.5, ("gelu", "silu"))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(DTypeError, match='^dtype: unsupported dtype "f64"'):
        prepared.add_unchecked(xt.data_ptr(), out.data_ptr(), 3, "f64", 1)
