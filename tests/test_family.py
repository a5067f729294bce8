"""Families: full adapters compressed into one shared basis and tenants (cores only), checked
against a numpy reference of each adapter's update or branch output, and the bundle they go in."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import denselora as dl
from denselora.cli import main
from denselora.errors import ArgumentError, BasisMismatchError, IncompatibleAdapterError
from denselora.io.basis import families, fingerprint
from denselora.io.bundle import pack

from conftest import randomize_adapter, tiny_llama


def make_adapter(path, *, activation="identity", r=4, seed=3, target_modules=None, base=None):
    config = dl.DenseLoRAConfig(r=r, alpha=2 * r, activation=activation, dropout=0.0)
    if target_modules is not None:
        config.target_modules = target_modules
    model = dl.get_denselora_model(base if base is not None else tiny_llama(), config)
    randomize_adapter(model, std=0.3, seed=seed)
    model.save_pretrained(path)
    return path


def numpy_adapter(path):
    """(config, float64 tensors) read with the safetensors package, not the library."""
    config = json.loads((path / "adapter_config.json").read_text())
    return config, {k: v.astype(np.float64) for k, v in load_file(path / "adapter.safetensors").items()}


def scale_of(config):
    r, alpha = config["r"], config["alpha"]
    return alpha / math.sqrt(r) if config.get("scaling", "rslora") == "rslora" else alpha / r


def updates(config, shared, cores):
    """{module: s * D @ M @ E} from a config and numpy tensors (shared factors and cores)."""
    s = scale_of(config)
    return {
        module: s * shared[f"shared.{g}.decoder"] @ cores[f"{module}.m"] @ shared[f"shared.{g}.encoder"]
        for module, g in config["groups"].items()
    }


def as_numpy(tensors):
    return {k: v.double().numpy() for k, v in tensors.items()}


def gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


@pytest.fixture(scope="module")
def linear_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    return [make_adapter(root / name, seed=seed, r=r) for name, seed, r in (("a", 1, 4), ("b", 2, 4), ("c", 3, 2))]


@pytest.fixture(scope="module")
def gelu_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("gelu")
    return [make_adapter(root / name, activation="gelu", seed=seed) for name, seed in (("g1", 4), ("g2", 5))]


def reference_errors(report, sources):
    """Per tenant and module, ||dW' - dW|| / ||dW|| with both updates formed in numpy."""
    basis = as_numpy(report.basis_tensors)
    out = {}
    for name, path in zip(report.errors, sources):
        config, tensors = numpy_adapter(path)
        want = updates(config, tensors, tensors)
        tenant_config, cores = report.tenants[name]
        got = updates(tenant_config, basis, as_numpy(cores))
        out[name] = {m: np.linalg.norm(got[m] - want[m]) / np.linalg.norm(want[m]) for m in want}
    return out


def test_linear_family_at_full_rank_reproduces_every_update(linear_adapters):
    report = dl.build_family(linear_adapters)
    assert report.linear and list(report.errors) == ["a", "b", "c"]
    # Joint rank: 4 + 4 + 2 per side, wider than any adapter's r.
    assert set(report.ranks.values()) == {(10, 10)}
    for tenant, layers in reference_errors(report, linear_adapters).items():
        for module, err in layers.items():
            assert err < 1e-5, (tenant, module, err)
            assert report.errors[tenant][module] < 1e-10  # computed in float64 before storage
    # The basis entry is a full adapter equal to the first one's function, and the fingerprint is
    # the one io.basis computes.
    assert fingerprint(report.basis_config, report.basis_tensors) == report.fingerprint
    tenant_config, _ = report.tenants["b"]
    assert tenant_config["basis"]["fingerprint"] == report.fingerprint
    assert all(v[2:] == [10, 10] for v in tenant_config["basis"]["groups"].values())
    # Shared factors are orthonormal.
    for key, t in report.basis_tensors.items():
        if key.endswith(".encoder"):
            np.testing.assert_allclose(t.double() @ t.double().T, np.eye(t.shape[0]), atol=1e-6)


def test_truncated_linear_family_reports_its_error(linear_adapters):
    report = dl.build_family(linear_adapters, rank=3)
    assert set(report.ranks.values()) == {(3, 3)}
    reference = reference_errors(report, linear_adapters)
    for tenant, layers in reference.items():
        for module, err in layers.items():
            # The report's Gram-matrix error agrees with the explicit one (float32 storage aside).
            assert report.errors[tenant][module] == pytest.approx(err, rel=1e-3, abs=1e-5)
    assert report.max_error() > 0.05
    assert "rel. error" in report.table()


def reference_branch_errors(report, sources, samples=4096, seed=11):
    """Branch output error on fresh Gaussian inputs, in numpy (gelu on both sides)."""
    rng = np.random.default_rng(seed)
    basis = as_numpy(report.basis_tensors)
    out = {}
    for name, path in zip(report.errors, sources):
        config, tensors = numpy_adapter(path)
        _, cores = report.tenants[name]
        cores = as_numpy(cores)
        out[name] = {}
        for module, g in config["groups"].items():
            e, d = tensors[f"shared.{g}.encoder"], tensors[f"shared.{g}.decoder"]
            x = rng.standard_normal((samples, e.shape[1]))
            want = gelu(gelu(x @ e.T) @ tensors[f"{module}.m"].T @ d.T)
            e2, d2 = basis[f"shared.{g}.encoder"], basis[f"shared.{g}.decoder"]
            got = gelu(gelu(x @ e2.T) @ cores[f"{module}.m"].T @ d2.T)
            out[name][module] = np.linalg.norm(got - want) / np.linalg.norm(want)
    return out


def test_nonlinear_family_refits_cores_and_reports_branch_error(gelu_adapters):
    report = dl.build_family(gelu_adapters, samples=2048)
    assert not report.linear and "branch output" in report.measure
    reference = reference_branch_errors(report, gelu_adapters)
    for tenant, layers in reference.items():
        for module, err in layers.items():
            measured = report.errors[tenant][module]
            assert 0.0 < measured < 1.0
            # Same quantity on other random inputs: close to the report's figure.
            assert measured == pytest.approx(err, rel=0.25, abs=0.02), (tenant, module)
    # The first adapter's own factors are close to the basis, so it keeps more than the others.
    with pytest.raises(ArgumentError, match="linear families only"):
        dl.build_family(gelu_adapters, rank=2)


def test_aligned_family_of_one_function_in_other_latent_coordinates_is_exact(gelu_adapters, tmp_path):
    """The second adapter is the first with its latents permuted and its decoder side re-based
    (E -> P E, M -> B M P^T, D -> D B^-1: the same function); the alignment undoes the permutation,
    so the averaged basis spans the same features and both refit cores are exact."""
    rng = np.random.default_rng(0)
    config, tensors = dl.load_adapter(gelu_adapters[0])
    copy = dict(tensors)
    groups = sorted(set(config["groups"].values()))
    for g in groups:
        r = tensors[f"shared.{g}.encoder"].shape[0]
        p = torch.from_numpy(np.eye(r)[rng.permutation(r)])
        b = torch.from_numpy(np.eye(r) * 2 + rng.normal(size=(r, r)) * 0.3)
        copy[f"shared.{g}.encoder"] = (p @ tensors[f"shared.{g}.encoder"].double()).float()
        copy[f"shared.{g}.decoder"] = (tensors[f"shared.{g}.decoder"].double() @ torch.linalg.inv(b)).float()
        for module in (m for m, gg in config["groups"].items() if gg == g):
            copy[f"{module}.m"] = (b @ tensors[f"{module}.m"].double() @ p.T).float()
    dl.save_adapter(tmp_path / "copy", config, copy)
    report = dl.build_family([gelu_adapters[0], tmp_path / "copy"], samples=512)
    assert report.max_error() < 1e-4, report.table()


def test_stacked_nonlinear_family_is_exact(gelu_adapters):
    report = dl.build_family(gelu_adapters, nonlinear="stack", samples=256)
    assert set(report.ranks.values()) == {(8, 8)}  # 4 + 4 encoder rows side by side
    for tenant, layers in reference_branch_errors(report, gelu_adapters, samples=512).items():
        for module, err in layers.items():
            assert err < 1e-5 and report.errors[tenant][module] < 1e-5, (tenant, module)
    with pytest.raises(ArgumentError, match="nonlinear must be one of"):
        dl.build_family(gelu_adapters, nonlinear="best")


def test_nonlinear_family_of_one_adapter_is_exact(gelu_adapters):
    report = dl.build_family(gelu_adapters[:1], samples=512)
    assert report.max_error() < 1e-5


def test_adapters_of_other_models_or_groups_are_refused_by_name(linear_adapters, tmp_path):
    other_groups = make_adapter(tmp_path / "qv", target_modules=["q_proj", "v_proj"])
    with pytest.raises(IncompatibleAdapterError, match="'qv'"):
        dl.build_family([linear_adapters[0], other_groups])
    wider = make_adapter(tmp_path / "wide", base=tiny_llama(hidden_size=64, intermediate_size=48))
    with pytest.raises(IncompatibleAdapterError, match="'wide'"):
        dl.build_family([linear_adapters[0], wider])
    first, other = dl.load_adapter(linear_adapters[0]), dl.load_adapter(linear_adapters[1])
    first[0]["base_model_name_or_path"], other[0]["base_model_name_or_path"] = "org/model", "someone/else"
    with pytest.raises(IncompatibleAdapterError, match="'x'.*someone/else"):
        dl.build_family([first, other], names=["a", "x"])
    gelu = make_adapter(tmp_path / "gelu", activation="gelu")
    with pytest.raises(IncompatibleAdapterError, match="'gelu'.*activations"):
        dl.build_family([linear_adapters[0], gelu])
    with pytest.raises(ArgumentError, match="distinct"):
        dl.build_family(linear_adapters[:2], names=["basis", "b"])
    with pytest.raises(ArgumentError, match="2 names for 3"):
        dl.build_family(linear_adapters, names=["a", "b"])


# ---- the family bundle -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_bundle(linear_adapters, tmp_path_factory):
    path = tmp_path_factory.mktemp("family") / "fam.dl"
    report = dl.build_family(linear_adapters, path)
    return path, report


def test_family_bundle_holds_the_basis_once_and_every_tenant(family_bundle, linear_adapters):
    path, report = family_bundle
    bundle = dl.Bundle(path)
    assert bundle.names() == ["basis", "a", "b", "c"]
    bundle.verify()
    assert bundle.config("b")["format_version"] == 2 and "format_version" in bundle.config("basis")
    (family,) = families(bundle)
    assert family.fingerprint == report.fingerprint and family.bases == ["basis"]
    assert family.tenants == ["a", "b", "c"] and not family.missing_basis
    # A tenant stores only its cores: far less than the basis's shared factors.
    for tenant, size in family.tenant_bytes.items():
        assert not any(k.startswith("shared.") for k in bundle.dtypes(tenant))
        assert size < family.basis_bytes
    # Every tenant's update, read back from the bundle, is the original adapter's (numpy reference).
    basis = {k: v.astype(np.float64) for k, v in bundle.tensors("basis").items()}
    for name, source in zip(["a", "b", "c"], linear_adapters):
        config, tensors = numpy_adapter(source)
        want = updates(config, tensors, tensors)
        got = updates(bundle.config(name), basis, {k: v.astype(np.float64) for k, v in bundle.tensors(name).items()})
        for module in want:
            assert np.linalg.norm(got[module] - want[module]) / np.linalg.norm(want[module]) < 1e-5


def test_cli_family_build_and_inspect(linear_adapters, tmp_path, capsys):
    out = tmp_path / "cli.dl"
    assert main(["family", "build", *map(str, linear_adapters), "-o", str(out), "--rank", "6"]) == 0
    text = capsys.readouterr().out
    assert "ranks (encoder x decoder)" in text and "6x6" in text and f"wrote {out}" in text
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    fp = families(dl.Bundle(out))[0].fingerprint
    assert "families:" in text and f"basis basis (fingerprint {fp})" in text
    for tenant in ("a", "b", "c"):
        assert f"tenant {tenant}" in text
    assert main(["family", "build", str(linear_adapters[0]), "-o", str(tmp_path / "x.dl"), "--rank", "0"]) == 2
    assert "rank must be a positive integer" in capsys.readouterr().err


def test_inspect_flags_tenants_without_their_basis_and_imports_no_torch(family_bundle, tmp_path):
    path, report = family_bundle
    orphan = tmp_path / "orphan.dl"
    config, cores = report.tenants["b"]
    pack(orphan, {"b": (config, cores), "other": report.tenants["a"]})
    assert [f.missing_basis for f in families(dl.Bundle(orphan))] == [True]
    code = (
        "import sys\nfrom denselora.cli import main\n"
        "status = main(['inspect', sys.argv[1]])\n"
        "assert 'torch' not in sys.modules, 'inspect imported torch'\nsys.exit(status)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for target, flagged in ((path, False), (orphan, True)):
        proc = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert ("MISSING BASIS" in proc.stdout) == flagged
        assert ("without their basis" in proc.stderr) == flagged


def test_linear_tenant_exports_as_a_peft_lora_with_equal_outputs(family_bundle, linear_adapters, tmp_path, tokens):
    peft = pytest.importorskip("peft")
    path, report = family_bundle
    dl.algebra.export_tenant_lora(f"{path}:b", tmp_path / "lora_b")
    model = dl.DenseLoRAModel.from_pretrained(tiny_llama(), linear_adapters[1])
    with torch.no_grad():
        expected = model(tokens).logits
    # Each tenant itself, loaded on its basis found in the bundle, is its original adapter (c has
    # r = 2 and its own scale under cores 10 x 10).
    for name, source in zip("abc", linear_adapters):
        original = dl.DenseLoRAModel.from_pretrained(tiny_llama(), source)
        tenant = dl.DenseLoRAModel.from_pretrained(tiny_llama(), f"{path}:{name}")
        with torch.no_grad():
            torch.testing.assert_close(tenant(tokens).logits, original(tokens).logits, rtol=1e-4, atol=1e-4)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora_b").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, expected, rtol=1e-4, atol=1e-4)
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(tokens).logits, expected, atol=1e-3)
    # The wrong basis is refused with both fingerprints named; a full adapter is not a tenant.
    other = dl.build_family(linear_adapters[:2])
    assert other.fingerprint != report.fingerprint
    dl.save_adapter(tmp_path / "other", other.basis_config, other.basis_tensors)
    with pytest.raises(BasisMismatchError, match=f"'?b'?.*{report.fingerprint}.*{other.fingerprint}"):
        dl.algebra.export_tenant_lora(f"{path}:b", tmp_path / "x", basis=tmp_path / "other")
    with pytest.raises(ArgumentError, match="not a tenant"):
        dl.algebra.export_tenant_lora(linear_adapters[0], tmp_path / "y")


def test_damaged_family_bundles_raise_typed_errors_naming_what_is_wrong(family_bundle, tmp_path):
    from denselora.errors import ChecksumError

    path, report = family_bundle
    # A tenant whose basis is not in its bundle: named with the fingerprint it needs.
    orphan = tmp_path / "orphan.dl"
    pack(orphan, {"b": report.tenants["b"]})
    with pytest.raises(IncompatibleAdapterError, match=f"orphan.dl:b.*{report.fingerprint}"):
        dl.algebra.export_tenant_lora(f"{orphan}:b", tmp_path / "x")
    # A tenant whose cores do not fit the basis groups it names is refused when written.
    config, cores = report.tenants["c"]
    bad = {**config, "basis": {**config["basis"], "groups": {g: [i, o, r + 1, d] for g, (i, o, r, d) in config["basis"]["groups"].items()}}}
    with pytest.raises(IncompatibleAdapterError, match='adapter "c".*down_proj.m'):
        pack(tmp_path / "bad.dl", {"c": (bad, cores)})
    # Damaged bytes of the basis: the families listing names the damaged tensor.
    data = bytearray(path.read_bytes())
    info = dl.Bundle(path).tensor_info("basis")
    shared = next(t for t in info if t["name"].startswith("shared."))
    data[shared["offset"] + 3] ^= 0xFF
    damaged = tmp_path / "damaged.dl"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=shared["name"]):
        families(dl.Bundle(damaged))
