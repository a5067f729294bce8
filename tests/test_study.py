"""The method-study helpers of benches/_study. Diagnostics: effective rank against numpy's SVD,
update norms against parameter differences, and per-layer updates against the formula (DenseLoRA)
and against PEFT (LoRA). The PEFT LoRA baseline: built on the requested targets and trained by the
library's loop (its loss is checked in test_training.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import denselora as dl
from denselora.errors import ArgumentError, ConfigError
from denselora.training import TrainConfig, train
from denselora.training.data import Example, TokenizedDataset
from denselora.training.optim import create_optimizer

from _study import diagnostics
from _study.methods import build_adapter_model
from _tiny import char_llama, char_tokenizer
from conftest import randomize_adapter, tiny_llama


def test_effective_rank_of_known_spectra():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    v, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    flat = u[:, :3] @ np.diag([2.0, 2.0, 2.0]) @ v[:3]  # three equal singular values
    ranks = diagnostics.effective_rank(torch.tensor(flat))
    assert ranks["entropy"] == pytest.approx(3.0, rel=1e-6) and ranks["energy"] == 3
    skewed = u[:, :4] @ np.diag([10.0, 1.0, 0.5, 0.01]) @ v[:4]
    s = np.array([10.0, 1.0, 0.5, 0.01])
    p = s / s.sum()
    ranks = diagnostics.effective_rank(torch.tensor(skewed))
    assert ranks["entropy"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    # 10^2 = 100 of 101.25 total energy is 98.8 %: two values are needed for 99 %
    assert ranks["energy"] == 2
    assert diagnostics.effective_rank(torch.zeros(5, 4)) == {"entropy": 0.0, "energy": 0.0}
    with pytest.raises(ArgumentError):
        diagnostics.effective_rank(torch.zeros(2, 2, 2))


def test_update_tracker_matches_parameter_differences(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, dropout=0.0)).train()
    optimizer = create_optimizer(model, 1e-2)
    tracker = diagnostics.UpdateTracker(model)
    with pytest.raises(ArgumentError):
        tracker.after_step()
    for _ in range(2):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model(tokens, labels=tokens).loss.backward()
        grads = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.requires_grad}
        tracker.before_step()
        optimizer.step()
        record = tracker.after_step()
        optimizer.zero_grad()
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert record["update"]["tensors"][name] == pytest.approx((param.detach() - before[name]).norm().item(), rel=1e-5)
                assert record["grad"]["tensors"][name] == pytest.approx(grads[name], rel=1e-6)
    shared = [n for n in grads if diagnostics.parameter_group(n) == "shared"]
    assert shared and all(".denselora_shared." in n for n in shared)
    expected = np.sqrt(sum(record["update"]["tensors"][n] ** 2 for n in shared))
    assert record["update"]["groups"]["shared"] == pytest.approx(expected)
    assert set(record["grad"]["groups"]) == {"shared", "m"}
    assert len(tracker.history) == 2
    # step 0: the decoder starts at zero, so E and M get no gradient and do not move
    first = tracker.history[0]["update"]["tensors"]
    assert all(first[n] == 0 for n in first if n.endswith(".encoder") or n.endswith(".m"))


def test_layer_updates_follow_the_formula(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig.paper(r=4, alpha=8))
    randomize_adapter(model)
    captured = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, p=path: captured.__setitem__(p, a[0])) for path, layer in model.adapter_layers()]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    results = diagnostics.layer_updates(model, tokens)
    assert set(results) == set(model.groups)
    path, layer = next(iter(model.adapter_layers()))
    x = captured[path].reshape(-1, layer.shared.in_features).double()
    e, d, m = (t.detach().double() for t in (layer.shared.encoder, layer.shared.decoder, layer.m))
    gelu = torch.nn.functional.gelu
    delta = 2.0 * gelu(gelu(x @ e.T) @ m.T @ d.T)
    base = x @ layer.base_layer.weight.detach().double().T
    assert results[path]["norm"] == pytest.approx(delta.norm().item(), rel=1e-4)
    assert results[path]["relative_norm"] == pytest.approx((delta.norm() / base.norm()).item(), rel=1e-4)
    assert results[path]["energy_rank"] <= 4  # D M act(E x) has rank <= r
    summary = diagnostics.summarize(results)
    assert set(summary) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "all"}


def test_shared_gradient_shares_sum_to_the_autograd_gradient(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig.paper(r=4, alpha=8, dropout=0.0))
    randomize_adapter(model)
    model.train()
    inputs = {"input_ids": tokens, "labels": tokens}
    shares = diagnostics.shared_gradient_contributions(model, inputs)
    assert model.training and all(p.grad is None for p in model.parameters())
    layers_per_group = {}
    for _, layer in model.adapter_layers():
        layers_per_group[layer.group] = layers_per_group.get(layer.group, 0) + 1
    assert {g: len(f["encoder"]) for g, f in shares.items()} == layers_per_group
    model.eval()
    model(**inputs).loss.backward()
    for group, shared in model.shared_modules.items():
        for factor in ("encoder", "decoder"):
            total = torch.stack(shares[group][factor]).sum(0)
            expected = getattr(shared, factor).grad.double()
            np.testing.assert_allclose(total.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    summary = diagnostics.shared_agreement(model, inputs)
    assert set(summary) == set(layers_per_group)
    assert all(0.0 < row["decoder_l1"] <= 1.0 + 1e-12 for row in summary.values())
    with pytest.raises(ArgumentError, match="labels"):
        diagnostics.shared_gradient_contributions(model, {"input_ids": tokens})


def test_gradient_agreement_of_known_shares():
    c = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    same = diagnostics.gradient_agreement([c, 2 * c, 0.5 * c])
    assert same["l1"] == pytest.approx(1.0) and same["cosine"] == pytest.approx(1.0)
    cancelling = diagnostics.gradient_agreement([c, -c, c])
    # |c|_1 / (3 |c|_1); cosines with the sum c: 1, -1, 1
    assert cancelling["l1"] == pytest.approx(1 / 3) and cancelling["cosine"] == pytest.approx(1 / 3)
    e = torch.eye(4)
    orthogonal = diagnostics.gradient_agreement(list(e))
    assert orthogonal["l1"] == pytest.approx(1.0) and orthogonal["cosine"] == pytest.approx(0.5)  # 1/sqrt(4)
    with pytest.raises(ArgumentError):
        diagnostics.gradient_agreement([])


def test_layer_updates_of_a_peft_lora_match_peft(tokens):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    results = diagnostics.layer_updates(lora, tokens)
    assert len(results) == 4  # 2 layers x (q, v)
    path = next(p for p in results if p.endswith("layers.0.self_attn.q_proj"))
    layer = lora.get_submodule(path)
    x = {}
    hook = layer.register_forward_pre_hook(lambda m, a: x.__setitem__("x", a[0]))
    with torch.no_grad():
        lora(tokens)
        hook.remove()
        full = layer(x["x"])
        with lora.disable_adapter():
            plain = layer(x["x"])
    assert results[path]["norm"] == pytest.approx((full - plain).norm().item(), rel=1e-4)
    assert 1 <= results[path]["energy_rank"] <= 4


def test_attached_tracker_records_an_external_loop(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, dropout=0.0)).train()
    optimizer = create_optimizer(model, 1e-2)
    tracker = diagnostics.UpdateTracker(model).attach()
    for step in range(1, 3):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        for half in (tokens[:1], tokens[1:]):  # two accumulated micro-batches
            model(half, labels=half).loss.backward()
        grads = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad()
        tracker.on_step(step)
        record = tracker.history[-1]
        assert record["step"] == step
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert record["grad"]["tensors"][name] == pytest.approx(grads[name], rel=1e-6)
                assert record["update"]["tensors"][name] == pytest.approx((param.detach() - before[name]).norm().item(), rel=1e-5)
    tracker.detach()  # no more gradient hooks: the next record sees no gradients
    model(tokens, labels=tokens).loss.backward()
    tracker.on_step(3)
    assert set(tracker.history[-1]["grad"]["tensors"].values()) == {0.0}


def test_layer_updates_ignore_dropout_and_keep_the_training_mode(tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, dropout=0.3))
    randomize_adapter(model)
    model.eval()
    expected = diagnostics.layer_updates(model, tokens)
    model.train()
    measured = diagnostics.layer_updates(model, tokens)
    assert model.training and all(layer.training for _, layer in model.adapter_layers())
    for path, values in expected.items():
        assert measured[path] == pytest.approx(values), path
        assert values["energy_rank"] <= 4  # a linear branch of rank r


# -- the PEFT LoRA baseline ---------------------------------------------------------------------


def test_lora_baseline_trains_with_the_library_loop(tmp_path):
    tok = char_tokenizer()
    model = build_adapter_model(char_llama(), "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and len(names) == 2 * 2 * 2
    data = TokenizedDataset([Example(f"Q: {i}", [" yes", " no"][i % 2]) for i in range(8)], tok, cutoff_len=64)
    train(model, tok, data, TrainConfig(lr=1e-2, max_steps=2, micro_batch_size=4, progress=False, plot=False), output_dir=tmp_path)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with pytest.raises(ConfigError, match="DenseLoRA"):  # checkpoints restore DenseLoRA adapters only
        train(model, tok, data, TrainConfig(max_steps=2, save_every=1, progress=False, plot=False), output_dir=tmp_path)
    with pytest.raises(ConfigError, match="method"):
        build_adapter_model(char_llama(), "dora")



def _randomize_lora(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


def test_basis_capture_against_numpy_projections(tmp_path):
    """The share of a LoRA update inside another adapter's subspaces, against projectors built
    with numpy's least squares: 1 against itself, the formula against a DenseLoRA adapter's
    shared encoder and decoder."""
    lora = build_adapter_model(tiny_llama(), "lora", r=2, alpha=4)
    _randomize_lora(lora, 0)
    lora.save_pretrained(tmp_path / "lora")
    dense = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=3))
    randomize_adapter(dense)
    dense.save_pretrained(tmp_path / "dense")

    itself = diagnostics.basis_capture(str(tmp_path / "lora"), str(tmp_path / "lora"))
    assert itself and all(v["captured"] == pytest.approx(1.0, abs=1e-9) for v in itself.values())

    captured = diagnostics.basis_capture(str(tmp_path / "lora"), str(tmp_path / "dense"))
    state = {k: v.detach().double().numpy() for k, v in dense.adapter_state().items()}

    def projector(columns):  # onto the column space: X pinv(X)
        return columns @ np.linalg.pinv(columns)

    assert set(captured) == set(dense.groups)
    for module, group in dense.groups.items():
        layer = lora.base_model.model.get_submodule(module)
        a, b = layer.lora_A["default"].weight.detach().double().numpy(), layer.lora_B["default"].weight.detach().double().numpy()
        update = b @ a
        inside = projector(state[f"shared.{group}.decoder"]) @ update @ projector(state[f"shared.{group}.encoder"].T)
        assert captured[module]["captured"] == pytest.approx(np.linalg.norm(inside) / np.linalg.norm(update), rel=1e-9)
        fan_out, fan_in = update.shape
        assert captured[module]["random"] == pytest.approx(np.sqrt(3 * 3 / (fan_in * fan_out)))
