"""The training-method options (scaling, M init, per-group learning rates), the paper preset and
loading adapters saved before these options existed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import erf

import denselora as dl
from denselora.errors import ConfigError
from denselora.training.optim import create_optimizer

from conftest import randomize_adapter, tiny_llama


def _numpy_gelu(v: np.ndarray) -> np.ndarray:
    return 0.5 * v * (1.0 + erf(v / np.sqrt(2.0)))


def test_paper_preset_is_the_papers_formula():
    config = dl.DenseLoRAConfig.paper(r=4, alpha=8)
    assert config.activations == ("gelu", "gelu")
    assert (config.scaling, config.m_init, config.shared_lr_ratio, config.m_lr_ratio) == ("standard", "kaiming", 1.0, 1.0)
    model = dl.get_denselora_model(tiny_llama(), config)
    for _, layer in model.adapter_layers():  # Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in)
        assert layer.m.abs().max() <= 1 / math.sqrt(4) + 1e-7
        assert not torch.allclose(layer.m.T @ layer.m, torch.eye(4), atol=1e-2)
    randomize_adapter(model)
    path, layer = next(iter(model.adapter_layers()))
    x = torch.randn(5, layer.shared.in_features, generator=torch.Generator().manual_seed(2))
    e, d, m = (t.detach().double().numpy() for t in (layer.shared.encoder, layer.shared.decoder, layer.m))
    w = layer.base_layer.weight.detach().double().numpy()
    xs = x.double().numpy()
    expected = xs @ w.T + (8 / 4) * _numpy_gelu(_numpy_gelu(xs @ e.T) @ m.T @ d.T)
    np.testing.assert_allclose(layer(x).detach().double().numpy(), expected, rtol=1e-4, atol=1e-5, err_msg=path)


def test_preset_overrides_and_unknown_preset():
    config = dl.DenseLoRAConfig.from_preset("paper", r=8, m_init="identity")
    assert config.r == 8 and config.m_init == "identity" and config.scaling == "standard"
    assert dl.DenseLoRAConfig.from_preset("default") == dl.DenseLoRAConfig()
    with pytest.raises(ConfigError, match="unknown preset 'lora'"):
        dl.DenseLoRAConfig.from_preset("lora")


@pytest.mark.parametrize("scaling, expected", [("standard", 32 / 16), ("rslora", 32 / 4)])
def test_scaling_sets_the_branch_multiplier(scaling, expected):
    config = dl.DenseLoRAConfig(r=16, alpha=32, scaling=scaling)
    assert config.scale == pytest.approx(expected)
    model = dl.get_denselora_model(tiny_llama(), config)
    assert all(layer.scaling == pytest.approx(expected) for _, layer in model.adapter_layers())


def test_m_init_options():
    eye = torch.eye(4)
    orthogonal = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, m_init="orthogonal"))
    ms = [layer.m.detach() for _, layer in orthogonal.adapter_layers()]
    for m in ms:
        torch.testing.assert_close(m.T @ m, eye, atol=1e-5, rtol=0)
    assert not torch.allclose(ms[0], ms[1])  # each layer draws its own
    identity = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, m_init="identity"))
    for _, layer in identity.adapter_layers():
        torch.testing.assert_close(layer.m.detach(), eye, atol=0, rtol=0)
        assert torch.count_nonzero(layer.shared.decoder) == 0  # still the base model at step 0


@pytest.mark.parametrize(
    "bad",
    [
        dict(scaling="sqrt"),
        dict(m_init="zeros"),
        dict(shared_lr_ratio=0),
        dict(m_lr_ratio=-2.0),
        dict(m_lr_ratio=float("inf")),
        dict(shared_lr_ratio=True),
        dict(shared_lr_ratio="4"),
    ],
)
def test_bad_method_options_raise_config_error(bad):
    name = next(iter(bad))
    with pytest.raises(ConfigError, match=name):
        dl.DenseLoRAConfig(**bad)


def test_method_options_round_trip_through_json_and_the_adapter_dir(tmp_path):
    config = dl.DenseLoRAConfig(r=4, scaling="standard", m_init="identity", shared_lr_ratio=4.0, m_lr_ratio=0.5, decoder_activation="silu")
    assert dl.DenseLoRAConfig.from_json(config.to_json()) == config
    model = dl.get_denselora_model(tiny_llama(), config)
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {k: saved[k] for k in ("scaling", "m_init", "shared_lr_ratio", "m_lr_ratio", "decoder_activation")} == {
        "scaling": "standard", "m_init": "identity", "shared_lr_ratio": 4.0, "m_lr_ratio": 0.5, "decoder_activation": "silu"
    }
    loaded = dl.DenseLoRAModel.from_pretrained(tiny_llama(), tmp_path / "a")
    assert loaded.denselora_config.scaling == "standard" and loaded.denselora_config.shared_lr_ratio == 4.0


def test_rslora_adapter_reloads_with_its_scale(tmp_path, tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, alpha=8, scaling="rslora", dropout=0.0)).eval()
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "a")
    loaded = dl.DenseLoRAModel.from_pretrained(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits)


def test_config_saved_before_the_method_options_loads_with_the_papers_math(tmp_path, tokens):
    # An adapter written before the options existed: its config has no scaling / per-side fields.
    paper = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig.paper(r=4, alpha=8, dropout=0.0)).eval()
    randomize_adapter(paper)
    paper.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "adapter_config.json"
    old = json.loads(config_path.read_text())
    for key in ("scaling", "m_init", "shared_lr_ratio", "m_lr_ratio", "encoder_activation", "decoder_activation"):
        del old[key]
    config_path.write_text(json.dumps(old))
    assert dl.DenseLoRAConfig.from_saved(old).activations == ("gelu", "gelu")
    loaded = dl.DenseLoRAModel.from_pretrained(tiny_llama(), tmp_path / "old")
    assert loaded.denselora_config.scaling == "standard" and loaded.denselora_config.activations == ("gelu", "gelu")
    torch.testing.assert_close(loaded(tokens).logits, paper(tokens).logits)


def test_create_optimizer_uses_the_configs_learning_rate_ratios():
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, shared_lr_ratio=4.0, m_lr_ratio=0.25))
    lrs = {group["name"]: group["lr"] for group in create_optimizer(model, 1e-3).param_groups}
    assert lrs == {"shared": pytest.approx(4e-3), "m": pytest.approx(2.5e-4)}
    shared_ids = {id(t) for g in model.shared_modules.values() for t in (g.encoder, g.decoder)}
    groups = {group["name"]: group["params"] for group in create_optimizer(model, 1e-3).param_groups}
    assert {id(p) for p in groups["shared"]} == shared_ids
    assert {id(p) for p in groups["m"]} == {id(layer.m) for _, layer in model.adapter_layers()}
    explicit = {g["name"]: g["lr"] for g in create_optimizer(model, 1e-3, shared_lr_ratio=1.0, m_lr_ratio=1.0).param_groups}
    assert explicit == {"shared": pytest.approx(1e-3), "m": pytest.approx(1e-3)}


def test_build_adapter_model_presets_and_overrides():
    from denselora.training import build_adapter_model

    paper = build_adapter_model(tiny_llama(), r=4, alpha=8, preset="paper")
    assert paper.denselora_config == dl.DenseLoRAConfig.paper(r=4, alpha=8, dropout=0.05, init_fingerprint=paper.denselora_config.init_fingerprint)
    tuned = build_adapter_model(tiny_llama(), r=4, alpha=8, activation="gelu", scaling="standard", m_lr_ratio=2.0)
    config = tuned.denselora_config
    assert (config.activations, config.scaling, config.m_init, config.m_lr_ratio) == (("gelu", "gelu"), "standard", "orthogonal", 2.0)
    with pytest.raises(ConfigError, match="unknown preset"):
        build_adapter_model(tiny_llama(), preset="lora")
    with pytest.raises(ConfigError, match="m_init"):
        build_adapter_model(tiny_llama(), m_init="zeros")


def test_cli_train_preset_paper_records_the_papers_settings(tmp_path, capsys):
    from denselora.cli import main

    from _tiny import char_llama, char_tokenizer

    model_dir = tmp_path / "model"
    char_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    task = tmp_path / "task.json"
    examples = [{"input": f"{i} is?", "target_scores": {"even": int(i % 2 == 0), "odd": int(i % 2)}} for i in range(20)]
    task.write_text(json.dumps({"canary": "x", "name": "t", "examples": examples}))
    common = ["train", "--model", str(model_dir), "--data", str(task), "--test-size", "4", "--val-size", "2", "--steps", "2", "--r", "4", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "paper"), "--preset", "paper", "--m-lr-ratio", "2"]) == 0
    saved = json.loads((tmp_path / "paper" / "adapter" / "adapter_config.json").read_text())
    assert (saved["activation"], saved["encoder_activation"], saved["decoder_activation"]) == ("gelu", None, None)
    assert (saved["scaling"], saved["m_init"], saved["shared_lr_ratio"], saved["m_lr_ratio"]) == ("standard", "kaiming", 1.0, 2.0)
    assert main([*common, "--output", str(tmp_path / "default")]) == 0
    saved = json.loads((tmp_path / "default" / "adapter" / "adapter_config.json").read_text())
    default = dl.DenseLoRAConfig()
    assert (saved["activation"], saved["scaling"], saved["m_init"]) == (default.activation, default.scaling, default.m_init)
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "bad"), "--shared-lr-ratio", "0"]) == 2
    assert "shared_lr_ratio" in capsys.readouterr().err
