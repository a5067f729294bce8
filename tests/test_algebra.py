"""Adapter algebra: averaging with latent alignment and rank truncation, checked against numpy,
scipy's linear_sum_assignment and the model's own outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import denselora as dl
from denselora import _core
from denselora.cli import main
from denselora.errors import ArgumentError, IncompatibleAdapterError, NonFiniteError

from conftest import randomize_adapter, tiny_llama

scipy_optimize = pytest.importorskip("scipy.optimize")


def make_adapter(path, *, activation="gelu", r=4, init_seed=0, seed=3, std=0.2):
    """A saved adapter on the tiny LLaMA; `init_seed` fixes the initial adapter (its fingerprint)."""
    base = tiny_llama()
    torch.manual_seed(init_seed)
    model = dl.get_denselora_model(base, dl.DenseLoRAConfig(r=r, activation=activation, dropout=0.0))
    randomize_adapter(model, std=std, seed=seed)
    model.save_pretrained(path)
    return path


def groups_of(config, tensors):
    """{group: (E, D, [(module, M)])} as float64 numpy arrays."""
    out = {}
    for module, group in sorted(config["groups"].items()):
        if group not in out:
            out[group] = (
                tensors[f"shared.{group}.encoder"].double().numpy(),
                tensors[f"shared.{group}.decoder"].double().numpy(),
                [],
            )
        out[group][2].append((module, tensors[f"{module}.m"].double().numpy()))
    return out


def symmetric_copy(src, dst, *, seed, linear_encoder=False):
    """The same function with permuted, re-based latents: E -> A E, D -> D B^-1, M -> B M A^-1,
    A a permutation (any invertible map for a linear encoder)."""
    rng = np.random.default_rng(seed)
    config, tensors = dl.load_adapter(src)
    out = dict(tensors)
    for group, (e, d, ms) in groups_of(config, tensors).items():
        r_e, r_d = e.shape[0], d.shape[1]
        cycle = rng.permutation(r_e)  # one r-cycle: no latent dim stays in place
        perm = np.empty(r_e, dtype=int)
        perm[cycle] = np.roll(cycle, -1)
        a = np.eye(r_e)[perm]
        if linear_encoder:
            a = a @ (np.eye(r_e) * 2 + rng.normal(size=(r_e, r_e)) * 0.5)
        b = np.eye(r_d) * 2 + rng.normal(size=(r_d, r_d)) * 0.5
        out[f"shared.{group}.encoder"] = torch.from_numpy((a @ e).astype(np.float32))
        out[f"shared.{group}.decoder"] = torch.from_numpy((d @ np.linalg.inv(b)).astype(np.float32))
        for module, m in ms:
            out[f"{module}.m"] = torch.from_numpy((b @ m @ np.linalg.inv(a)).astype(np.float32))
    dl.save_adapter(dst, config, out)
    return dst


def logits(path, tokens):
    model = dl.DenseLoRAModel.from_pretrained(tiny_llama(), path)
    with torch.no_grad():
        return model(tokens).logits


def base_logits(tokens):
    with torch.no_grad():
        return tiny_llama()(tokens).logits


# -- assignment ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 16, 40])
def test_assignment_matches_scipy(n):
    rng = np.random.default_rng(n)
    for trial in range(5):
        cost = rng.normal(size=(n, n))
        if trial == 4:
            cost = np.round(cost)  # ties: the optimum's value is what must agree
        ours = np.array(_core.linear_assignment(cost.tolist()))
        rows, cols = scipy_optimize.linear_sum_assignment(cost)
        assert sorted(ours) == list(range(n))
        assert cost[np.arange(n), ours].sum() == pytest.approx(cost[rows, cols].sum(), abs=1e-9)


def test_assignment_rejects_bad_costs():
    with pytest.raises(dl.errors.ShapeError):
        _core.linear_assignment([[1.0, 2.0]])
    with pytest.raises(NonFiniteError):
        _core.linear_assignment([[float("nan")]])


# -- averaging -----------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "silu", "identity"])
def test_aligned_average_of_a_symmetric_copy_is_the_same_function(tmp_path, tokens, activation):
    a = make_adapter(tmp_path / "a", activation=activation)
    b = symmetric_copy(a, tmp_path / "b", seed=1, linear_encoder=activation == "identity")
    expected = logits(a, tokens)
    effect = (expected - base_logits(tokens)).abs().max()
    assert effect > 1e-2  # the adapter does something measurable

    report = dl.average([a, b], tmp_path / "aligned", mode="aligned")
    assert report.mode == "aligned"
    assert (logits(tmp_path / "aligned", tokens) - expected).abs().max() < 1e-4 * effect + 1e-6
    for g in report.groups:
        assert g.refactor_error < 1e-5
        assert g.product_residual_after[0] == 0.0
        if activation != "identity":  # a linear encoder is re-based, not only permuted
            assert g.encoder_residual_after[1] < 1e-6 < g.encoder_residual_before[1]
            assert g.product_residual_after[1] < 1e-5 < g.product_residual_before[1]

    dl.average([a, b], tmp_path / "linear", mode="linear")
    assert (logits(tmp_path / "linear", tokens) - expected).abs().max() > 0.05 * effect


def test_procrustes_alignment_undoes_orthogonal_rebasing(tmp_path, tokens):
    """Procrustes on the decoder recovers an orthogonal decoder-side map exactly."""
    a = make_adapter(tmp_path / "a")
    config, tensors = dl.load_adapter(a)
    rng = np.random.default_rng(5)
    out = dict(tensors)
    for group, (e, d, ms) in groups_of(config, tensors).items():
        p = np.eye(4)[rng.permutation(4)]
        q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
        out[f"shared.{group}.encoder"] = torch.from_numpy((p @ e).astype(np.float32))
        out[f"shared.{group}.decoder"] = torch.from_numpy((d @ q).astype(np.float32))
        for module, m in ms:
            out[f"{module}.m"] = torch.from_numpy((q.T @ m @ p.T).astype(np.float32))
    dl.save_adapter(tmp_path / "b", config, out)
    report = dl.average([a, tmp_path / "b"], tmp_path / "avg", mode="aligned", decoder_alignment="procrustes")
    assert report.decoder_alignment == "procrustes" and report.groups[0].refactor_error is None
    _, merged = dl.load_adapter(tmp_path / "avg")
    for name, tensor in tensors.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-5, rtol=1e-5)


def test_weighted_mean_and_ema_are_exact(tmp_path):
    paths = [make_adapter(tmp_path / f"run{i}", seed=10 + i) for i in range(3)]
    loaded = [dl.load_adapter(p)[1] for p in paths]
    weights = [1.0, 2.0, 5.0]
    report = dl.average(paths, tmp_path / "mean", weights=weights, mode="linear")
    assert report.weights == pytest.approx([0.125, 0.25, 0.625])
    _, merged = dl.load_adapter(tmp_path / "mean")
    for name in merged:
        want = sum(w * t[name].double().numpy() for w, t in zip(report.weights, loaded))
        np.testing.assert_allclose(merged[name].numpy(), want, rtol=1e-6, atol=1e-7)

    decay = 0.9
    dl.average(paths, tmp_path / "ema", ema=decay, mode="linear")
    _, merged = dl.load_adapter(tmp_path / "ema")
    for name in merged:
        running = loaded[0][name].double().numpy()
        for t in loaded[1:]:
            running = decay * running + (1 - decay) * t[name].double().numpy()
        np.testing.assert_allclose(merged[name].numpy(), running, rtol=1e-6, atol=1e-7)


def test_auto_mode_uses_the_init_fingerprint(tmp_path):
    same_a = make_adapter(tmp_path / "a", init_seed=0, seed=1)
    same_b = make_adapter(tmp_path / "b", init_seed=0, seed=2)
    other = make_adapter(tmp_path / "c", init_seed=1, seed=3)
    fingerprints = [json.loads((p / "adapter_config.json").read_text())["init_fingerprint"] for p in (same_a, same_b, other)]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
    soup = dl.average([same_a, same_b])
    assert soup.mode == "linear" and soup.config["init_fingerprint"] == fingerprints[0]
    assert dl.average([same_a, other], mode="linear").config["init_fingerprint"] is None
    report = dl.average([same_a, other], tmp_path / "out")
    assert report.mode == "aligned" and "init_fingerprint" in report.reason
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["init_fingerprint"] is None


def test_average_keeps_dtypes_and_accepts_in_memory_adapters(tmp_path):
    config, tensors = dl.load_adapter(make_adapter(tmp_path / "a"))
    half = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    report = dl.average([(config, half), (config, half)], mode="linear")
    assert all(t.dtype == torch.bfloat16 for t in report.tensors.values())
    for name, t in report.tensors.items():
        torch.testing.assert_close(t, half[name], rtol=0, atol=0)


# -- truncation ----------------------------------------------------------------------------------


def numpy_truncation(e, d, ms, rank):
    """Reference for a GELU/SiLU encoder: keep the `rank` latent dims with the largest
    ||E_j||^2 * sum_l ||D M_l e_j||^2, then project the products on their top singular vectors."""
    products = [d @ m for _, m in ms]
    importance = (e**2).sum(1) * sum((p**2).sum(0) for p in products)
    kept = sorted(sorted(range(e.shape[0]), key=lambda j: (-importance[j], j))[:rank])
    stack = np.hstack([p[:, kept] for p in products])
    u, sigma, _ = np.linalg.svd(stack, full_matrices=False)
    u = u[:, :rank]
    errors = [np.sqrt(max((p**2).sum() - ((u.T @ p[:, kept]) ** 2).sum(), 0) / (p**2).sum()) for p in products]
    return kept, sigma, u, errors


def test_truncation_errors_match_numpy_and_the_dropped_singular_values(tmp_path):
    src = make_adapter(tmp_path / "a", r=6)
    config, tensors = dl.load_adapter(src)
    report = dl.truncate(src, tmp_path / "t", rank=3)
    _, out = dl.load_adapter(tmp_path / "t")
    for g in report.groups:
        e, d, ms = groups_of(config, tensors)[g.group]
        kept, sigma, u, errors = numpy_truncation(e, d, ms, 3)
        assert g.encoder_dims_kept == kept
        assert (g.encoder_rank, g.decoder_rank) == (3, 3)
        np.testing.assert_allclose(g.decoder_singular_values, sigma, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose([layer.relative_error for layer in g.layers], errors, rtol=1e-6, atol=1e-9)
        # Overall: energy of the dropped latent dims plus the dropped singular values.
        total = sum(((d @ m) ** 2).sum() for _, m in ms)
        dropped_dims = total - (sigma**2).sum()
        assert g.relative_error**2 == pytest.approx((dropped_dims + (sigma[3:] ** 2).sum()) / total, rel=1e-6)
        # The written tensors realise that approximation.
        e2 = out[f"shared.{g.group}.encoder"].double().numpy()
        d2 = out[f"shared.{g.group}.decoder"].double().numpy()
        np.testing.assert_array_equal(e2, e[kept])
        for module, m in ms:
            m2 = out[f"{module}.m"].double().numpy()
            assert m2.shape == (3, 3)
            want = u @ u.T @ (d @ m)[:, kept]
            np.testing.assert_allclose(d2 @ m2, want, atol=1e-5 * np.abs(want).max())
    assert "model.layers.0.self_attn.q_proj" in report.table()


def test_identity_truncation_is_the_joint_two_sided_factorization(tmp_path):
    src = make_adapter(tmp_path / "a", activation="identity", r=6)
    config, tensors = dl.load_adapter(src)
    report = dl.truncate(src, tmp_path / "t", rank=3)
    _, out = dl.load_adapter(tmp_path / "t")
    for g in report.groups:
        e, d, ms = groups_of(config, tensors)[g.group]
        ws = [d @ m @ e for _, m in ms]
        total = sum((w**2).sum() for w in ws)
        left = np.linalg.svd(np.hstack(ws), compute_uv=False)
        right = np.linalg.svd(np.vstack(ws), compute_uv=False)
        ul = np.linalg.svd(np.hstack(ws))[0][:, :3]
        vr = np.linalg.svd(np.vstack(ws))[2][:3].T
        hosvd_err = sum(((w - ul @ ul.T @ w @ vr @ vr.T) ** 2).sum() for w in ws)
        lower = max((left[3:] ** 2).sum(), (right[3:] ** 2).sum())
        err2 = g.relative_error**2 * total
        assert lower * (1 - 1e-6) <= err2 <= hosvd_err * (1 + 1e-6)
        e2, d2 = (out[f"shared.{g.group}.{k}"].double().numpy() for k in ("encoder", "decoder"))
        approx_err = sum(((w - d2 @ out[f"{mod}.m"].double().numpy() @ e2) ** 2).sum() for w, (mod, _) in zip(ws, ms))
        assert approx_err == pytest.approx(err2, rel=1e-3, abs=1e-9 * total)


def test_truncating_to_the_current_rank_changes_nothing(tmp_path):
    src = make_adapter(tmp_path / "a")
    report = dl.truncate(src, tmp_path / "same", rank=4)
    assert all(g.relative_error == 0.0 for g in report.groups)
    before = load_file(src / "adapter.safetensors")
    after = load_file(tmp_path / "same" / "adapter.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_rectangular_truncation_loads_into_the_model_and_keeps_the_function(tmp_path, tokens):
    """A decoder side of true rank 2 with every encoder dim in use: energy truncation gives a
    2 x 4 M per layer, and the model built from it computes the same outputs."""
    src = make_adapter(tmp_path / "a")
    config, tensors = dl.load_adapter(src)
    rng = np.random.default_rng(0)
    out = dict(tensors)
    for group, (_, d, _) in groups_of(config, tensors).items():
        low = d[:, :2] @ rng.normal(size=(2, 4))
        out[f"shared.{group}.decoder"] = torch.from_numpy(low.astype(np.float32))
    dl.save_adapter(tmp_path / "low", config, out)
    expected = logits(tmp_path / "low", tokens)

    report = dl.truncate(tmp_path / "low", tmp_path / "t", energy=1 - 1e-9)
    assert all((g.encoder_rank, g.decoder_rank) == (4, 2) for g in report.groups)
    assert max(report.layer_errors.values()) < 1e-5
    _, truncated = dl.load_adapter(tmp_path / "t")
    assert tuple(truncated["model.layers.0.mlp.up_proj.m"].shape) == (2, 4)
    model = dl.DenseLoRAModel.from_pretrained(tiny_llama(), tmp_path / "t")
    assert model.shared_modules["up_proj"].decoder_rank == 2
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-5)
    # A lossy truncation changes the outputs, by less than the adapter's own effect.
    dl.truncate(src, tmp_path / "t1", rank=1)
    full = logits(src, tokens)
    effect = (full - base_logits(tokens)).abs().max()
    diff = (logits(tmp_path / "t1", tokens) - full).abs().max()
    assert 1e-4 * effect < diff < 2 * effect


def test_energy_picks_the_smallest_rank_that_holds_it(tmp_path):
    src = make_adapter(tmp_path / "a", r=6)
    for energy in (0.5, 0.9, 0.99):
        report = dl.truncate(src, None, energy=energy)
        for g in report.groups:
            s2 = np.asarray(g.encoder_spectrum) ** 2
            want_e = int(np.searchsorted(np.cumsum(s2) / s2.sum(), energy * (1 - 1e-12)) + 1)
            assert g.encoder_rank == want_e
            d2 = np.asarray(g.decoder_singular_values) ** 2
            want_d = min(int(np.searchsorted(np.cumsum(d2) / d2.sum(), energy * (1 - 1e-12)) + 1), 6)
            assert g.decoder_rank == want_d


# -- errors --------------------------------------------------------------------------------------


def test_incompatible_adapters_are_named(tmp_path):
    a = make_adapter(tmp_path / "a")
    wider = make_adapter(tmp_path / "b", r=5)
    with pytest.raises(IncompatibleAdapterError, match=r"b: group .*module model\.layers\.0"):
        dl.average([a, wider], tmp_path / "out")
    lin = make_adapter(tmp_path / "c", activation="identity")
    with pytest.raises(IncompatibleAdapterError, match="activations"):
        dl.average([a, lin], tmp_path / "out")
    config, tensors = dl.load_adapter(a)
    dl.save_adapter(tmp_path / "d", {**config, "base_model_name_or_path": "other/model"}, tensors)
    config["base_model_name_or_path"] = "tiny/llama"
    dl.save_adapter(tmp_path / "e", config, tensors)
    with pytest.raises(IncompatibleAdapterError, match="other/model"):
        dl.average([tmp_path / "e", tmp_path / "d"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_values_are_named(tmp_path):
    a = make_adapter(tmp_path / "a")
    config, tensors = dl.load_adapter(a)
    tensors["model.layers.1.mlp.up_proj.m"][0, 1] = float("inf")
    dl.save_adapter(tmp_path / "bad", config, tensors)
    with pytest.raises(NonFiniteError, match=r"bad.*model\.layers\.1\.mlp\.up_proj\.m"):
        dl.average([a, tmp_path / "bad"], tmp_path / "out")
    with pytest.raises(NonFiniteError, match="up_proj"):
        dl.truncate(tmp_path / "bad", tmp_path / "out", rank=2)


def test_bad_arguments_raise_argument_errors(tmp_path):
    a = make_adapter(tmp_path / "a")
    cases = [
        lambda: dl.average([], tmp_path / "o"),
        lambda: dl.average(a, tmp_path / "o"),
        lambda: dl.average([a, a], tmp_path / "o", mode="soup"),
        lambda: dl.average([a, a], tmp_path / "o", weights=[1.0]),
        lambda: dl.average([a, a], tmp_path / "o", weights=[1.0, -1.0]),
        lambda: dl.average([a, a], tmp_path / "o", weights=[1.0, 1.0], ema=0.5),
        lambda: dl.average([a, a], tmp_path / "o", ema=1.0),
        lambda: dl.truncate(a, tmp_path / "o"),
        lambda: dl.truncate(a, tmp_path / "o", rank=0),
        lambda: dl.truncate(a, tmp_path / "o", rank=9),
        lambda: dl.truncate(a, tmp_path / "o", energy=1.5),
        lambda: dl.truncate(a, tmp_path / "o", rank=2, energy=0.5),
    ]
    for case in cases:
        with pytest.raises(ArgumentError):
            case()
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError):
        dl.average([a, tmp_path / "missing"], tmp_path / "o")


def test_bundle_entries_in_and_out(tmp_path):
    """Inputs read from a bundle, outputs written into one, and the same numbers as directories."""
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2)
    bundle = tmp_path / "runs.dl"
    dl.io.bundle.pack(bundle, {"a": a, "b": b})
    from_dirs = dl.average([a, b], mode="linear", weights=[1, 3])
    dl.average([f"{bundle}:a", f"{bundle}:b"], f"{bundle}:mean", mode="linear", weights=[1, 3])
    dl.truncate(f"{bundle}:mean", f"{bundle}:small", rank=2)
    assert sorted(dl.Bundle(bundle).names()) == ["a", "b", "mean", "small"]
    _, merged = dl.load_adapter(bundle, "mean")
    for name, tensor in from_dirs.tensors.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0)
    _, small = dl.load_adapter(f"{bundle}:small")
    assert small["shared.q_proj.encoder"].shape[0] == 2


# -- command line --------------------------------------------------------------------------------


def test_cli_merge_and_truncate(tmp_path, capsys):
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m"), "--weights", "1,3", "--mode", "linear"]) == 0
    printed = capsys.readouterr().out
    assert "mode: linear" in printed and "q_proj" in printed
    _, merged = dl.load_adapter(tmp_path / "m")
    _, ta = dl.load_adapter(a)
    _, tb = dl.load_adapter(b)
    torch.testing.assert_close(merged["shared.q_proj.encoder"], 0.25 * ta["shared.q_proj.encoder"] + 0.75 * tb["shared.q_proj.encoder"])

    assert main(["truncate", str(tmp_path / "m"), "-r", "2", "-o", str(tmp_path / "t")]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "4x4->2x2" in printed
    assert load_file(tmp_path / "t" / "adapter.safetensors")["shared.q_proj.encoder"].shape == (2, 32)

    assert main(["merge", str(a), str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("denselora merge: error:") and "nope" in err and err.count("\n") == 1
    assert main(["truncate", str(a), "-r", "0", "-o", str(tmp_path / "x")]) == 2
    assert "rank" in capsys.readouterr().err
    assert main(["merge", str(a), str(b), "--weights", "1", "-o", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
