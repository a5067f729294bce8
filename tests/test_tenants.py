"""Tenants (cores only, on a basis named by fingerprint): saving, loading with their basis, training
on a frozen basis, and batches whose rows use different tenants, each against the one-adapter path
(a model with that adapter alone) as the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import denselora as dl
from denselora import _core
from denselora.errors import ArgumentError, BasisMismatchError, IncompatibleAdapterError
from denselora.io import basis as basis_io
from denselora.io.adapter import load_adapter
from denselora.io.bundle import Bundle, pack
from denselora.method import tenants
from denselora.method.model import DenseLoRAModel

from conftest import randomize_adapter, tiny_llama


def make_basis(directory, activation="gelu", seed=3):
    """A full adapter (random values everywhere) saved to ``directory``: the basis."""
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, alpha=8, activation=activation, dropout=0.0))
    randomize_adapter(model, seed=seed)
    model.save_pretrained(directory)
    return directory


def make_tenant(basis_dir, directory, seed):
    """A tenant of ``basis_dir`` with random cores, saved to ``directory``."""
    model = DenseLoRAModel.from_pretrained(tiny_llama(), basis_dir, freeze_shared=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            layer.m.copy_(torch.randn(layer.m.shape, generator=generator) * 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def family(tmp_path):
    basis_dir = make_basis(tmp_path / "basis")
    return basis_dir, {f"t{i}": make_tenant(basis_dir, tmp_path / f"t{i}", seed=10 + i) for i in range(3)}


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


# -- the tenant on disk and its basis -----------------------------------------------------------


def test_a_tenant_stores_only_its_cores_and_names_its_basis(family):
    basis_dir, tenant_dirs = family
    basis_config, basis_tensors = load_adapter(basis_dir)
    config = json.loads((tenant_dirs["t0"] / "adapter_config.json").read_text())
    stored = load_file(tenant_dirs["t0"] / "adapter.safetensors")  # the safetensors package, independently
    assert config["format_version"] == _core.TENANT_FORMAT_VERSION == 2
    assert basis_config["format_version"] == _core.ADAPTER_FORMAT_VERSION == 1
    assert basis_io.is_tenant(config) and not basis_io.is_tenant(basis_config)
    assert config["basis"]["fingerprint"] == basis_io.fingerprint(basis_config, basis_tensors)
    assert set(stored) == {f"{path}.m" for path in config["groups"]}
    assert config["basis"]["groups"]["q_proj"] == [32, 32, 4, 4]
    assert config["basis"]["groups"]["k_proj"] == [32, 16, 4, 4]


def test_a_tenant_loads_on_its_basis_and_equals_the_model_that_saved_it(family, tokens):
    basis_dir, tenant_dirs = family
    trained = DenseLoRAModel.from_pretrained(tiny_llama(), basis_dir, freeze_shared=True)
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for _, layer in trained.adapter_layers():
            layer.m.copy_(torch.randn(layer.m.shape, generator=generator))
    trained.eval()
    tenant_dir = tenant_dirs["t0"].parent / "again"
    trained.save_pretrained(tenant_dir)
    loaded = DenseLoRAModel.from_pretrained(tiny_llama(), tenant_dir, basis=basis_dir)
    assert torch.equal(logits(loaded, tokens), logits(trained, tokens))
    assert loaded.basis_fingerprint == trained.basis_fingerprint
    # Its save is a tenant again, identical.
    loaded.save_pretrained(tenant_dir.parent / "resaved")
    assert load_file(tenant_dir.parent / "resaved" / "adapter.safetensors").keys() == load_file(tenant_dir / "adapter.safetensors").keys()


def test_a_wrong_or_missing_basis_is_a_typed_error_naming_the_fingerprints(family, tmp_path):
    basis_dir, tenant_dirs = family
    other = make_basis(tmp_path / "other", seed=7)
    needed = json.loads((tenant_dirs["t0"] / "adapter_config.json").read_text())["basis"]["fingerprint"]
    given = basis_io.fingerprint(*load_adapter(other))
    with pytest.raises(BasisMismatchError) as info:
        DenseLoRAModel.from_pretrained(tiny_llama(), tenant_dirs["t0"], basis=other)
    assert needed in str(info.value) and given in str(info.value) and "t0" in str(info.value)
    assert isinstance(info.value, IncompatibleAdapterError)
    with pytest.raises(IncompatibleAdapterError, match=needed) as info:
        DenseLoRAModel.from_pretrained(tiny_llama(), tenant_dirs["t0"])
    assert "t0" in str(info.value) and not isinstance(info.value, BasisMismatchError)
    with pytest.raises(IncompatibleAdapterError, match="itself a tenant"):
        DenseLoRAModel.from_pretrained(tiny_llama(), tenant_dirs["t0"], basis=tenant_dirs["t1"])
    # Groups that claim other dimensions than the basis has (the cores alone cannot show it).
    config, tensors = load_adapter(tenant_dirs["t0"])
    config["basis"]["groups"]["q_proj"] = [32, 33, 4, 4]
    dl.save_adapter(tmp_path / "lying", config, tensors)
    with pytest.raises(IncompatibleAdapterError, match=r"group 'q_proj' is \[32, 33, 4, 4\]"):
        DenseLoRAModel.from_pretrained(tiny_llama(), tmp_path / "lying", basis=basis_dir)


def test_in_a_bundle_the_basis_is_found_by_fingerprint(family, tmp_path, tokens):
    basis_dir, tenant_dirs = family
    other = make_basis(tmp_path / "other", seed=7)
    bundle = tmp_path / "family.dl"
    pack(bundle, {"other": other, "basis": basis_dir, **tenant_dirs})
    want = logits(DenseLoRAModel.from_pretrained(tiny_llama(), tenant_dirs["t1"], basis=basis_dir), tokens)
    for source, kw in [(f"{bundle}:t1", {}), (bundle, {"adapter_name": "t1"}), (tenant_dirs["t1"], {"basis": f"{bundle}:basis"}),
                       (tenant_dirs["t1"], {"basis": (bundle, "basis")})]:
        got = logits(DenseLoRAModel.from_pretrained(tiny_llama(), source, **kw), tokens)
        assert torch.equal(got, want), (source, kw)
    with pytest.raises(BasisMismatchError, match="family.dl:other"):
        DenseLoRAModel.from_pretrained(tiny_llama(), f"{bundle}:t1", basis=f"{bundle}:other")
    lonely = tmp_path / "lonely.dl"
    pack(lonely, {"t1": tenant_dirs["t1"], "other": other})
    with pytest.raises(IncompatibleAdapterError, match="no full adapter of"):
        DenseLoRAModel.from_pretrained(tiny_llama(), f"{lonely}:t1")


def test_freeze_shared_trains_only_the_cores(family, tokens, tmp_path):
    basis_dir, _ = family
    model = DenseLoRAModel.from_pretrained(tiny_llama(), basis_dir, freeze_shared=True)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".m") for n in trainable)
    assert len(trainable) == len(model.groups)
    shared_before = {n: t.clone() for n, t in model.adapter_state().items() if n.startswith("shared.")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = model.adapter_state()
    assert all(torch.equal(state[n], t) for n, t in shared_before.items())
    model.save_pretrained(tmp_path / "tenant")
    assert basis_io.is_tenant(load_adapter(tmp_path / "tenant")[0])
    # A basis that changed after all cannot carry the tenant: refused by name, nothing written.
    with torch.no_grad():
        next(iter(model.shared_modules.values())).encoder.add_(1.0)
    with pytest.raises(BasisMismatchError, match=model.basis_fingerprint):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# -- mixed-adapter batches ----------------------------------------------------------------------


def resident_model(basis_dir, tenant_dirs, dtype=torch.float32):
    model = DenseLoRAModel.from_pretrained(tiny_llama().to(dtype), basis_dir)
    for name, directory in tenant_dirs.items():
        model.load_adapter(directory, adapter_name=name)
    return model


def one_adapter_rows(basis_dir, tenant_dirs, names, tokens, dtype):
    """Each row alone through a model with its own adapter: the reference."""
    rows = []
    for i, name in enumerate(names):
        if name is None:
            model = tiny_llama().to(dtype)
        elif name == "default":
            model = DenseLoRAModel.from_pretrained(tiny_llama().to(dtype), basis_dir)
        else:
            model = DenseLoRAModel.from_pretrained(tiny_llama().to(dtype), tenant_dirs[name], basis=basis_dir)
        rows.append(logits(model, tokens[i : i + 1]))
    return torch.cat(rows)


@pytest.fixture(params=["kernel", "torch"])
def routed_path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(tenants.LayerStack, "_add_fused", lambda *a, **k: False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "identity"])
def test_routed_rows_equal_each_row_alone_with_its_adapter(tmp_path, activation, dtype, routed_path):
    basis_dir = make_basis(tmp_path / "basis", activation=activation)
    tenant_dirs = {f"t{i}": make_tenant(basis_dir, tmp_path / f"t{i}", seed=10 + i) for i in range(3)}
    names = ["t1", None, "default", "t0", "t1", "t2"]
    tokens = torch.randint(0, 96, (len(names), 5), generator=torch.Generator().manual_seed(5))
    model = resident_model(basis_dir, tenant_dirs, dtype)
    with model.route(names):
        got = logits(model, tokens)
    want = one_adapter_rows(basis_dir, tenant_dirs, names, tokens, dtype)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # The rows really differ (each tenant changes the output).
    assert not torch.allclose(got[0], got[3], atol=1e-3)
    # Outside the block the model is its own adapter again.
    torch.testing.assert_close(logits(model, tokens[:1]), one_adapter_rows(basis_dir, tenant_dirs, ["default"], tokens, dtype),
                               rtol=tol, atol=tol)


def test_generate_with_routed_rows_equals_generating_each_row_alone(family):
    basis_dir, tenant_dirs = family
    names = ["t0", "t2", None, "t0"]
    prompts = torch.randint(2, 96, (len(names), 4), generator=torch.Generator().manual_seed(8))
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    model = resident_model(basis_dir, tenant_dirs)
    with torch.no_grad(), model.route(names):
        got = model.generate(prompts, attention_mask=torch.ones_like(prompts), **options)
    for i, name in enumerate(names):
        alone = tiny_llama() if name is None else DenseLoRAModel.from_pretrained(tiny_llama(), tenant_dirs[name], basis=basis_dir)
        with torch.no_grad():
            want = alone.generate(prompts[i : i + 1], attention_mask=torch.ones_like(prompts[i : i + 1]), **options)
        assert torch.equal(got[i : i + 1], want), name


def test_a_full_adapter_on_the_same_basis_is_accepted_and_its_cores_taken(family, tmp_path, tokens):
    basis_dir, tenant_dirs = family
    full = tmp_path / "full"
    DenseLoRAModel.from_pretrained(tiny_llama(), tenant_dirs["t2"], basis=basis_dir).save_pretrained(full)
    assert basis_io.is_tenant(load_adapter(full)[0])  # a loaded tenant saves as a tenant
    with_shared = tmp_path / "with_shared"
    model = DenseLoRAModel.from_pretrained(tiny_llama(), tenant_dirs["t2"], basis=basis_dir)
    model.basis_fingerprint = None
    model.save_pretrained(with_shared)  # the same adapter, written whole
    assert not basis_io.is_tenant(load_adapter(with_shared)[0])
    routed = DenseLoRAModel.from_pretrained(tiny_llama(), basis_dir)
    routed.load_adapter(with_shared, adapter_name="whole")
    with routed.route(["whole", "whole"]):
        got = logits(routed, tokens)
    assert torch.allclose(got, logits(model, tokens), atol=1e-5)


def test_hot_swap_leaves_the_other_residents_alone(family, tokens):
    basis_dir, tenant_dirs = family
    model = resident_model(basis_dir, {"t0": tenant_dirs["t0"], "t1": tenant_dirs["t1"]})
    with model.route(["t0", "t0"]):
        before = logits(model, tokens)
    slot = model.tenants._slots["t0"]
    cores = {p: s.cores[slot].clone() for p, s in model.tenants.stacks.items()}
    model.delete_adapter("t1")
    model.load_adapter(tenant_dirs["t2"], adapter_name="t2")
    model.load_adapter(tenant_dirs["t1"], adapter_name="t1-again")
    with model.route(["t0", "t2"]):
        after = logits(model, tokens)
    assert all(torch.equal(s.cores[slot], cores[p]) for p, s in model.tenants.stacks.items())
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-5)
    assert model.tenants.names() == ["t1-again", "t0", "t2"]  # least recently routed first
    # Many more than the first stack's slots: it grows, residents keep their values.
    for i in range(20):
        model.load_adapter(tenant_dirs[f"t{i % 3}"], adapter_name=f"extra{i}")
    with model.route(["t0", "extra19"]):
        grown = logits(model, tokens)
    assert all(torch.equal(s.cores[slot], cores[p]) for p, s in model.tenants.stacks.items())
    torch.testing.assert_close(grown[0], before[0], rtol=1e-5, atol=1e-5)


def test_lru_bound_and_a_bundle_as_tenant_source(family, tmp_path, tokens):
    basis_dir, tenant_dirs = family
    bundle = tmp_path / "family.dl"
    pack(bundle, {"basis": basis_dir, **tenant_dirs})
    model = DenseLoRAModel.from_pretrained(tiny_llama(), f"{bundle}:basis")
    model.max_resident = 2
    model.add_tenant_source(bundle)
    with model.route(["t0", "t1"]):
        first = logits(model, tokens)
    assert model.tenants.names() == ["t0", "t1"]
    with model.route(["t2", "t1"]):  # t0 is the least recently routed: evicted
        second = logits(model, tokens)
    assert model.tenants.names() == ["t2", "t1"]
    torch.testing.assert_close(second[1], first[1], rtol=1e-5, atol=1e-5)
    want = one_adapter_rows(basis_dir, tenant_dirs, ["t2"], tokens, torch.float32)
    torch.testing.assert_close(second[:1], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ArgumentError, match="max_resident is 2"):
        with model.route(["t0", "t1", "t2"]):
            pass
    model.max_resident = 1
    assert model.tenants.names() == ["t1"]


def test_bad_input_is_refused_by_name_and_changes_nothing(family, tmp_path, tokens):
    basis_dir, tenant_dirs = family
    model = resident_model(basis_dir, {"t0": tenant_dirs["t0"]})
    stacks = {p: s.cores.clone() for p, s in model.tenants.stacks.items()}
    other_basis = make_basis(tmp_path / "other", seed=7)
    stranger = make_tenant(other_basis, tmp_path / "stranger", seed=1)
    with pytest.raises(BasisMismatchError, match="stranger") as info:
        model.load_adapter(stranger, adapter_name="s")
    assert model.shared_fingerprint() in str(info.value)
    with pytest.raises(BasisMismatchError, match="other"):
        model.load_adapter(other_basis, adapter_name="s")  # a full adapter of another basis
    # A tenant of this basis whose modules are not the model's.
    config, tensors = load_adapter(tenant_dirs["t1"])
    dropped = "model.layers.1.mlp.down_proj"
    del config["groups"][dropped], tensors[f"{dropped}.m"]
    dl.save_adapter(tmp_path / "fewer", config, tensors)
    with pytest.raises(IncompatibleAdapterError, match=dropped):
        model.load_adapter(tmp_path / "fewer", adapter_name="fewer")
    with pytest.raises(ArgumentError, match="already resident"):
        model.load_adapter(tenant_dirs["t1"], adapter_name="t0")
    with pytest.raises(ArgumentError, match="'default'"):
        model.load_adapter(tenant_dirs["t1"], adapter_name="default")
    assert model.tenants.names() == ["t0"]
    assert all(torch.equal(s.cores, stacks[p]) for p, s in model.tenants.stacks.items())

    with pytest.raises(ArgumentError, match="unknown tenant 'nope'"):
        with model.route(["t0", "nope"]):
            pass
    with pytest.raises(ArgumentError, match="3 tenant names for a batch of 2 rows"):
        with model.route(["t0", None, "t0"]):
            logits(model, tokens)
    with pytest.raises(ArgumentError, match="no resident tenant 'nope'"):
        model.delete_adapter("nope")
    assert not model.tenants.active  # a failed route leaves no routing behind
    assert torch.equal(logits(model, tokens), logits(DenseLoRAModel.from_pretrained(tiny_llama(), basis_dir), tokens))


def test_a_resident_tenant_costs_r2_numbers_per_layer(family):
    basis_dir, tenant_dirs = family
    model = resident_model(basis_dir, {})
    stacks = model.tenants.stacks.values()
    per_tenant = sum(s.cores[0].numel() * s.cores.element_size() for s in stacks)
    assert per_tenant == len(model.groups) * 4 * 4 * 4  # r x r float32 per adapted layer
    np.testing.assert_array_equal(next(iter(stacks)).cores[1:].numpy(), 0)


def test_one_route_serves_every_shape_of_its_batch(family, routed_path):
    # generate routes once, then runs the prompt and one token at a time: the token slots follow.
    basis_dir, tenant_dirs = family
    names = ["t1", None, "default", "t0"]
    prompts = torch.randint(0, 96, (len(names), 6), generator=torch.Generator().manual_seed(4))
    model = resident_model(basis_dir, tenant_dirs)
    parts = [prompts, prompts[:, :1], prompts[:, 2:5], prompts[:, :1]]
    with model.route(names):
        got = [logits(model, part) for part in parts]
        with pytest.raises(ArgumentError, match="4 tenant names for a batch of 2 rows"):
            logits(model, prompts[:2, :1])
    alone = {"t0": DenseLoRAModel.from_pretrained(tiny_llama(), tenant_dirs["t0"], basis=basis_dir),
             "t1": DenseLoRAModel.from_pretrained(tiny_llama(), tenant_dirs["t1"], basis=basis_dir),
             "default": DenseLoRAModel.from_pretrained(tiny_llama(), basis_dir), None: tiny_llama()}
    for part, out in zip(parts, got):
        want = torch.cat([logits(alone[name], part[i : i + 1]) for i, name in enumerate(names)])
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stored", [None, "f16", "bf16"])
def test_a_tenant_brought_in_from_a_bundle_has_its_stored_cores(family, tmp_path, stored, model_dtype):
    basis_dir, tenant_dirs = family
    bundle = tmp_path / "tenants.dl"
    pack(bundle, tenant_dirs, dtype=stored)
    model = DenseLoRAModel.from_pretrained(tiny_llama().to(model_dtype), basis_dir)
    model.add_tenant_source(bundle)
    with model.route(["t2", "t0"]):
        pass
    reader = Bundle(bundle)
    for name in ("t2", "t0"):
        slot = model.tenants._slots[name]
        want = reader.torch_tensors(name)  # copies, bfloat16 restored: an independent path
        for path, stack in model.tenants.stacks.items():
            assert torch.equal(stack.cores[slot], want[f"{path}.m"].to(stack.cores.dtype)), (name, path)
    slot = model.tenants._slots["t2"]
    model.delete_adapter("t2")
    assert all(not stack.cores[slot].any() for stack in model.tenants.stacks.values())


def test_a_bundle_tenant_is_checked_against_the_basis_as_it_is_now(family, tmp_path, tokens):
    basis_dir, tenant_dirs = family
    bundle = tmp_path / "family.dl"
    pack(bundle, {"basis": basis_dir, **tenant_dirs})
    model = DenseLoRAModel.from_pretrained(tiny_llama(), f"{bundle}:basis")
    model.add_tenant_source(bundle)
    with model.route(["t0"]):
        pass
    with torch.no_grad():
        next(iter(model.shared_modules.values())).encoder.add_(1.0)  # another basis now
    with pytest.raises(BasisMismatchError, match="t1"):
        with model.route(["t1"]):
            pass
    assert model.tenants.names() == ["t0"]
