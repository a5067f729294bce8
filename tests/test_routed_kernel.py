"""The routed kernel (rows of a batch on different adapters of one basis) against a float64 numpy
reference, against the single-adapter kernel, its errors, and its prepared form."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from denselora import _core, kernels
from denselora.errors import ArgumentError, DTypeError, LayoutError, NonFiniteError, ShapeError
from test_kernel import ACTIVATIONS, EPS, act64, isa, to_dtype, values  # noqa: F401 (isa: the fixture of every backend)


def routed_reference(x, e, cores, d, row_core, scale, acts) -> np.ndarray:
    """float64 numpy: ``scale * act_d(D (M[t_i] act_e(E x_i)))`` for rows with t_i >= 0, else 0."""
    h = act64(acts[0], x @ e.T)
    z = np.einsum("nij,nj->ni", cores[np.maximum(row_core, 0)], h)
    y = scale * act64(acts[1], z @ d.T)
    y[row_core < 0] = 0.0
    return y


def row_cores(rng: np.random.Generator, n: int, t: int) -> np.ndarray:
    """Indices in -1..t-1: a core for one row alone, -1 from two rows on, every value when n
    allows; in runs (rows of one sequence) and single rows."""
    v = np.concatenate([np.full(int(rng.integers(1, 5)), rng.integers(-1, t)) for _ in range(n)])[:n]
    first = np.concatenate([[0, -1], np.arange(1, t)])[: min(n, t + 1)]
    v[: len(first)] = first
    return (rng.permutation(v) if n < 8 else v).astype(np.int32)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.itemsize == 2 else np.uint32)


CASES = [
    # (n, in, r_e, r_d, out, T): decode and prefill row counts
    (1, 576, 16, 16, 192, 3),
    (3, 33, 5, 7, 20, 4),
    (8, 128, 16, 16, 96, 8),
    (100, 100, 16, 16, 77, 12),
    (130, 64, 8, 12, 48, 5),
]


@pytest.mark.parametrize("act_dtype,weight_dtype", [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")])
@pytest.mark.parametrize("acts", list(itertools.product(ACTIVATIONS, ACTIVATIONS)))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.usefixtures("isa")
def test_routed_matches_numpy_float64_reference(case, acts, act_dtype, weight_dtype):
    n, d_in, r_e, r_d, d_out, t = case
    rng = np.random.default_rng(n * 1000 + d_in)
    x, xv = to_dtype(rng.normal(size=(n, d_in)), act_dtype)
    e, ev = to_dtype(rng.normal(size=(r_e, d_in)) / np.sqrt(d_in), weight_dtype)
    cores, cv = to_dtype(rng.normal(size=(t, r_d, r_e)) / np.sqrt(r_e), weight_dtype)
    d, dv = to_dtype(rng.normal(size=(d_out, r_d)) / np.sqrt(r_d), weight_dtype)
    row_core = row_cores(rng, n, t)
    out0, out0v = to_dtype(rng.normal(size=(n, d_out)), act_dtype)
    # Rows without a branch hold a negative zero and a NaN: adding 0 to them would change bits.
    skip = row_core < 0
    base = np.array([-0.0, np.nan], dtype=np.float64)
    out0[skip, :2] = to_dtype(base, act_dtype)[0]
    out0v[skip, :2] = base
    want = out0v + routed_reference(xv, ev, cv, dv, row_core, 0.5, acts)

    out = out0.copy()
    returned = kernels.fused_routed_branch(x, e, cores, d, row_core, scale=0.5, activation=acts, out=out)
    assert returned is out
    assert np.array_equal(bits(out[skip]), bits(out0[skip]))
    got = values(out, act_dtype)[~skip]
    tol = 2 * EPS[act_dtype] * np.abs(want[~skip]) + 1e-5 * (1 + np.abs(want[~skip]))
    assert np.all(np.abs(got - want[~skip]) <= tol), np.max(np.abs(got - want[~skip]) - tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.usefixtures("isa")
def test_routed_is_the_single_adapter_kernel_with_a_core_per_row(case, dtype):
    n, d_in, r_e, r_d, d_out, t = case
    rng = np.random.default_rng(n + 7)
    x = to_dtype(rng.normal(size=(n, d_in)), dtype)[0]
    e = to_dtype(rng.normal(size=(r_e, d_in)) / np.sqrt(d_in), dtype)[0]
    cores = to_dtype(rng.normal(size=(t, r_d, r_e)) / np.sqrt(r_e), dtype)[0]
    d = to_dtype(rng.normal(size=(d_out, r_d)) / np.sqrt(r_d), dtype)[0]
    out0 = to_dtype(rng.normal(size=(n, d_out)), dtype)[0]
    acts = ("gelu", "silu")
    # One core (T = 1) for every row: the single-adapter kernel, bit for bit.
    single = kernels.fused_branch(x, e, cores[0], d, scale=0.5, activation=acts, out=out0.copy())
    routed = kernels.fused_routed_branch(x, e, cores[:1], d, np.zeros(n, np.int32), scale=0.5, activation=acts, out=out0.copy())
    assert np.array_equal(bits(routed), bits(single))
    # Each row as the single-adapter kernel on that row alone with its own core, to rounding.
    row_core = row_cores(rng, n, t)
    routed = values(kernels.fused_routed_branch(x, e, cores, d, row_core, scale=0.5, activation=acts, out=out0.copy()), dtype)
    for i, c in enumerate(row_core):
        if c < 0:
            alone = values(out0[i : i + 1], dtype)
        else:
            alone = values(kernels.fused_branch(x[i : i + 1], e, cores[c], d, scale=0.5, activation=acts, out=out0[i : i + 1].copy()), dtype)
        # Both rounded to the dtype, from f32 sums in another order (prefill and decode paths).
        tol = 2 * EPS[dtype] * np.abs(alone[0]) + 1e-5 * (1 + np.abs(alone[0]))
        assert np.all(np.abs(routed[i] - alone[0]) <= tol), f"row {i} (core {c})"


def test_routed_torch_tensors_leading_dimensions_and_new_output():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 24, generator=g).bfloat16()
    e, d = torch.randn(4, 24, generator=g), torch.randn(10, 4, generator=g)
    cores = torch.randn(5, 4, 4, generator=g)
    row_core = torch.tensor([[0, 4, -1], [2, 2, 1]])  # int64: converted
    y = kernels.fused_routed_branch(x, e, cores, d, row_core, scale=2.0, activation="gelu")
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.shape == (2, 3, 10)
    rc = row_core.numpy().reshape(6)
    want = routed_reference(x.double().numpy().reshape(6, 24), e.double().numpy(), cores.double().numpy(), d.double().numpy(), rc, 2.0, ("gelu", "gelu"))
    np.testing.assert_allclose(y.double().numpy().reshape(6, 10), want, rtol=2e-2, atol=1e-3)
    assert (y[0, 2] == 0).all()
    # In place, numpy stack and a list of indices, into a torch tensor.
    out = torch.ones(2, 3, 10, dtype=torch.bfloat16)
    kernels.fused_routed_branch(x, e, cores.numpy(), d, rc.reshape(2, 3).tolist(), scale=2.0, activation="gelu", out=out)
    np.testing.assert_allclose(out.double().numpy().reshape(6, 10), 1 + want, rtol=2e-2, atol=1e-2)


def small_routed():
    rng = np.random.default_rng(5)
    return (
        rng.normal(size=(3, 8)).astype(np.float32),
        rng.normal(size=(4, 8)).astype(np.float32),
        rng.normal(size=(2, 4, 4)).astype(np.float32),
        rng.normal(size=(6, 4)).astype(np.float32),
    )


def test_routed_errors_name_the_argument_and_write_nothing():
    x, e, cores, d = small_routed()
    out = np.ones((3, 6), np.float32)

    def call(row_core, cores=cores, **kw):
        return kernels.fused_routed_branch(x, e, cores, d, row_core, scale=1.0, activation="gelu", out=out, **kw)

    with pytest.raises(ArgumentError, match="^row_core: row 2 has core index 2, expected -1 or 0..2"):
        call(np.array([0, 1, 2], np.int32))
    with pytest.raises(ArgumentError, match="^row_core: row 0 has core index -2"):
        call(np.array([-2, 1, 1], np.int32))
    with pytest.raises(ArgumentError, match="^row_core: row 1 has core index 4294967296"):
        call(np.array([0, 2**32, 1]))
    with pytest.raises(DTypeError, match="^row_core:"):
        call(np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ShapeError, match="^row_core:"):
        call(np.array([0, 1], np.int32))
    with pytest.raises(ShapeError, match="^row_core:"):
        call(np.array([[0, 1, 1]], np.int32))
    with pytest.raises(ShapeError, match="^cores:"):
        call(np.zeros(3, np.int32), cores=cores[0])
    with pytest.raises(ShapeError, match="^cores:"):
        call(np.zeros(3, np.int32), cores=cores[:, :, :3].copy())
    with pytest.raises(ShapeError, match="^decoder:"):
        call(np.zeros(3, np.int32), cores=cores[:, :3, :].copy())
    with pytest.raises(DTypeError, match="^cores:"):
        call(np.zeros(3, np.int32), cores=cores.astype(np.float16))
    with pytest.raises(LayoutError, match="^cores:"):
        call(np.zeros(3, np.int32), cores=np.ascontiguousarray(cores.transpose(2, 1, 0)).transpose(2, 1, 0))
    with pytest.raises(DTypeError, match="^row_core:"):
        _core.fused_routed_branch(x, e, cores, d, np.zeros(3, np.int64), out, scale=1.0, encoder_activation="gelu", decoder_activation="gelu", num_threads=1)
    with pytest.raises(LayoutError, match="^row_core:"):
        _core.fused_routed_branch(x, e, cores, d, np.zeros(6, np.int32)[::2], out, scale=1.0, encoder_activation="gelu", decoder_activation="gelu", num_threads=1)
    assert (out == 1).all()  # nothing written


def test_routed_non_finite_values_reach_only_the_rows_that_read_them():
    x, e, cores, d = small_routed()
    cores = np.concatenate([cores, np.full((1, 4, 4), np.inf, np.float32)])  # core 2: taken by no row
    cores[1, 0, 0] = np.nan
    x[2, 0] = np.nan  # row 2: no branch
    y = kernels.fused_routed_branch(x, e, cores, d, np.array([0, 1, -1], np.int32), scale=1.0, activation="gelu")
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all() and (y[2] == 0).all()
    # check_finite looks at what the call reads.
    kernels.fused_routed_branch(x, e, cores, d, np.array([0, 0, -1], np.int32), scale=1.0, activation="gelu", check_finite=True)
    out = np.ones((3, 6), np.float32)
    with pytest.raises(NonFiniteError, match="^cores:"):
        kernels.fused_routed_branch(x, e, cores, d, np.array([0, 1, -1], np.int32), scale=1.0, activation="gelu", out=out, check_finite=True)
    with pytest.raises(NonFiniteError, match="^x:"):
        kernels.fused_routed_branch(x, e, cores, d, np.array([0, 0, 0], np.int32), scale=1.0, activation="gelu", out=out, check_finite=True)
    assert (out == 1).all()


def test_routed_thread_setting_gives_identical_results():
    rng = np.random.default_rng(3)
    for n in (4, 200):  # decode and prefill
        x = rng.normal(size=(n, 1024)).astype(np.float32)
        e = rng.normal(size=(32, 1024)).astype(np.float32)
        cores = rng.normal(size=(9, 32, 32)).astype(np.float32)
        d = rng.normal(size=(2048, 32)).astype(np.float32)
        row_core = rng.integers(-1, 9, size=n).astype(np.int32)
        results = []
        try:
            for threads in (1, 3):
                kernels.set_num_threads(threads)
                results.append(kernels.fused_routed_branch(x, e, cores, d, row_core, scale=0.1, activation="gelu"))
        finally:
            kernels.set_num_threads(None)
        assert np.array_equal(results[0], results[1])


def test_prepared_routed_branch_sees_cores_written_in_place():
    x, e, cores, d = small_routed()
    stack = np.zeros((3, 4, 4), np.float32)  # the caller's resident stack; slot 2 empty
    stack[:2] = cores
    prepared = _core.PreparedRoutedBranch(e, stack, d, scale=0.5, encoder_activation="gelu", decoder_activation="silu")
    assert (prepared.in_features, prepared.out_features, prepared.num_cores) == (8, 6, 3)
    xt, out = torch.from_numpy(x), torch.zeros(3, 6)
    row_core = torch.tensor([1, 2, -1], dtype=torch.int32)
    prepared.add_unchecked(xt.data_ptr(), out.data_ptr(), row_core.data_ptr(), 3, "f32", 1)
    want = routed_reference(*(a.astype(np.float64) for a in (x, e, stack, d)), row_core.numpy(), 0.5, ("gelu", "silu"))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)
    assert (out[1] == 0).all()  # the empty slot: act_d(0) = 0
    # A tenant loaded into slot 2 in place is used by the next call, without preparing again.
    stack[2] = cores[0] * 3
    out.zero_()
    prepared.add_unchecked(xt.data_ptr(), out.data_ptr(), row_core.data_ptr(), 3, "f32", 1)
    want = routed_reference(*(a.astype(np.float64) for a in (x, e, stack, d)), row_core.numpy(), 0.5, ("gelu", "silu"))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)
    assert (out[1] != 0).all() and (out[2] == 0).all()
    # Indices are still checked; addresses are not.
    bad = torch.tensor([0, 3, 0], dtype=torch.int32)
    with pytest.raises(ArgumentError, match="^row_core: row 1 has core index 3"):
        prepared.add_unchecked(xt.data_ptr(), out.data_ptr(), bad.data_ptr(), 3, "f32", 1)
    with pytest.raises(LayoutError, match="^row_core: null address"):
        prepared.add_unchecked(xt.data_ptr(), out.data_ptr(), 0, 3, "f32", 1)
    with pytest.raises(ShapeError, match="^cores:"):
        _core.PreparedRoutedBranch(e, stack[0], d, scale=1.0, encoder_activation="gelu", decoder_activation="gelu")
    with pytest.raises(ShapeError, match="^cores:"):
        _core.PreparedRoutedBranch(e, stack[:, :, :3].copy(), d, scale=1.0, encoder_activation="gelu", decoder_activation="gelu")
