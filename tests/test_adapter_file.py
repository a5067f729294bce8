"""The adapter directory written and read by the Rust core: standard safetensors, strict loading,
typed errors that name what is wrong, and atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import denselora as dl
from denselora import _core

from conftest import randomize_adapter, tiny_llama


@pytest.fixture
def saved(tmp_path, tokens):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    randomize_adapter(model)
    with torch.no_grad():
        expected = model(tokens).logits
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model, expected


def test_file_is_plain_safetensors_with_documented_names(saved):
    directory, model, _ = saved
    tensors = load_file(directory / "adapter.safetensors")
    state = model.adapter_state()
    assert set(tensors) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(tensors[name], value.detach().numpy())
    assert tensors["shared.q_proj.encoder"].shape == (4, 32)
    assert tensors["shared.k_proj.decoder"].shape == (16, 4)
    assert tensors["model.layers.1.mlp.down_proj.m"].shape == (4, 4)
    trainable, _ = model.get_nb_trainable_parameters()
    size = os.path.getsize(directory / "adapter.safetensors")
    assert trainable * 4 <= size <= trainable * 4 + 4096  # each shared tensor stored once

    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["format_version"] == _core.ADAPTER_FORMAT_VERSION
    assert config["groups"]["model.layers.0.self_attn.q_proj"] == "q_proj"
    assert config["r"] == 4 and config["activation"] == dl.DenseLoRAConfig().activation and config["scaling"] == "rslora"
    assert config["init_fingerprint"]


def test_save_then_load_gives_identical_outputs(saved, tokens):
    directory, _, expected = saved
    loaded = dl.DenseLoRAModel.from_pretrained(tiny_llama(), directory)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)
    assert not any(t.requires_grad for t in loaded.adapter_state().values())
    trainable = dl.DenseLoRAModel.from_pretrained(tiny_llama(), directory, is_trainable=True)
    assert all(t.requires_grad for t in trainable.adapter_state().values())


def test_load_adapter_returns_config_and_tensors(saved):
    directory, model, _ = saved
    config, tensors = dl.load_adapter(directory)
    assert config["groups"] == model.groups
    for name, value in model.adapter_state().items():
        torch.testing.assert_close(tensors[name], value.detach(), rtol=0, atol=0)


def test_module_missing_from_the_model_is_named(saved):
    directory, _, _ = saved
    with pytest.raises(dl.IncompatibleAdapterError, match=r"5 adapted modules are not in LlamaForCausalLM: model\.layers\.1\."):
        dl.DenseLoRAModel.from_pretrained(tiny_llama(layers=1), directory)


def test_shape_mismatch_is_named(saved):
    transformers = pytest.importorskip("transformers")
    directory, _, _ = saved
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(config)
    with pytest.raises(dl.IncompatibleAdapterError, match=r"tensor shared\.(up|down)_proj\.(en|de)coder has shape"):
        dl.DenseLoRAModel.from_pretrained(base, directory)
    # A refused adapter leaves the user's model as it was.
    assert not hasattr(base, "denselora_shared") and all(p.requires_grad for p in base.parameters())


def _rewrite_tensors(directory, edit):
    tensors = load_file(directory / "adapter.safetensors")
    edit(tensors)
    save_file(tensors, directory / "adapter.safetensors")


def test_extra_or_missing_tensor_is_named(saved):
    directory, _, _ = saved
    _rewrite_tensors(directory, lambda t: t.update({"model.layers.0.self_attn.o_proj.m": np.zeros((4, 4), np.float32)}))
    with pytest.raises(dl.IncompatibleAdapterError, match="o_proj"):
        dl.load_adapter(directory)
    _rewrite_tensors(directory, lambda t: (t.pop("model.layers.0.self_attn.o_proj.m"), t.pop("shared.v_proj.decoder")))
    with pytest.raises(dl.IncompatibleAdapterError, match=r"shared\.v_proj\.decoder"):
        dl.load_adapter(directory)


def test_wrong_dtype_and_wrong_m_shape_are_named(saved):
    directory, _, _ = saved
    _rewrite_tensors(directory, lambda t: t.update({"shared.q_proj.encoder": t["shared.q_proj.encoder"].astype(np.int32)}))
    with pytest.raises(dl.FormatError, match=r"shared\.q_proj\.encoder"):
        dl.load_adapter(directory)
    _rewrite_tensors(directory, lambda t: t.update({"shared.q_proj.encoder": np.zeros((4, 32), np.float32), "model.layers.0.mlp.up_proj.m": np.zeros((3, 4), np.float32)}))
    with pytest.raises(dl.IncompatibleAdapterError, match=r"model\.layers\.0\.mlp\.up_proj"):
        dl.load_adapter(directory)


def test_truncated_or_garbage_files_raise_format_errors_naming_the_file(saved):
    directory, _, _ = saved
    path = directory / "adapter.safetensors"
    data = path.read_bytes()
    for cut in (0, 7, 8, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(dl.FormatError, match="adapter.safetensors"):
            dl.load_adapter(directory)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(dl.FormatError, match="adapter.safetensors"):
        dl.load_adapter(directory)


def test_bad_configs_raise_format_errors_naming_the_file(saved):
    directory, _, _ = saved
    config_path = directory / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for text in ["{", "[]", json.dumps({**good, "format_version": 999}), json.dumps({k: v for k, v in good.items() if k != "format_version"})]:
        config_path.write_text(text)
        with pytest.raises(dl.FormatError, match="adapter_config.json"):
            dl.load_adapter(directory)
    config_path.write_text(json.dumps({**good, "groups": {}}))
    with pytest.raises(dl.IncompatibleAdapterError, match="groups"):
        dl.load_adapter(directory)


def test_missing_files_raise_file_not_found(tmp_path, saved):
    directory, _, _ = saved
    with pytest.raises(FileNotFoundError):
        dl.load_adapter(tmp_path / "nowhere")
    (directory / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        dl.load_adapter(directory)


def test_failed_save_leaves_the_previous_adapter_intact(saved):
    directory, model, _ = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    bad_config = {**model.adapter_config_dict(), "groups": {"model.layers.0.self_attn.q_proj": "q_proj", "model.layers.9.nowhere": "q_proj"}}
    with pytest.raises(dl.IncompatibleAdapterError, match="model.layers.9.nowhere"):
        dl.save_adapter(directory, bad_config, model.adapter_state())
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_non_contiguous_and_integer_arrays_are_refused_by_the_core(tmp_path):
    config = json.dumps({"groups": {"a": "g"}})
    base = {"shared.g.encoder": np.zeros((2, 3), np.float32), "shared.g.decoder": np.zeros((3, 2), np.float32), "a.m": np.zeros((2, 2), np.float32)}
    with pytest.raises(dl.errors.LayoutError, match="shared.g.decoder"):
        _core.save_adapter(str(tmp_path / "x"), config, {**base, "shared.g.decoder": np.zeros((2, 3), np.float32).T})
    with pytest.raises(dl.errors.DTypeError, match="a.m"):
        _core.save_adapter(str(tmp_path / "x"), config, {**base, "a.m": np.zeros((2, 2), np.int64)})
    _core.save_adapter(str(tmp_path / "x"), config, base)
    assert sorted(os.listdir(tmp_path / "x")) == ["adapter.safetensors", "adapter_config.json"]


# -- the directory writer and the array seam ---------------------------------------------------


def test_atomic_directory_creates_merges_or_replaces_and_leaves_nothing_behind(tmp_path):
    from denselora.io.atomic import atomic_directory

    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        assert staging.parent == tmp_path and not target.exists()  # nothing visible while writing
        (staging / "a.txt").write_text("1")
        (staging / "sub").mkdir()
        (staging / "sub" / "x").write_text("x")
    (target / "mine.txt").write_text("kept")
    with atomic_directory(target) as staging:  # entries replace their namesakes; others stay
        (staging / "a.txt").write_text("2")
        (staging / "sub").mkdir()
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "mine.txt", "sub"]
    assert (target / "a.txt").read_text() == "2" and not any((target / "sub").iterdir())
    with atomic_directory(target, replace=True) as staging:  # the whole folder is the new one
        (staging / "b.txt").write_text("3")
    assert [p.name for p in target.iterdir()] == ["b.txt"]

    class Boom(Exception):
        pass

    for replace in (False, True):
        with pytest.raises(Boom):
            with atomic_directory(target, replace=replace) as staging:
                (staging / "b.txt").write_text("half")
                raise Boom
        assert [p.name for p in target.iterdir()] == ["b.txt"] and (target / "b.txt").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or set-aside folders
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="file"):
        with atomic_directory(tmp_path / "file"):
            pass


def test_saving_into_a_directory_keeps_its_other_files(saved):
    directory, model, _ = saved
    (directory / "README.md").write_text("notes")
    randomize_adapter(model, seed=8)
    model.save_pretrained(directory)
    assert (directory / "README.md").read_text() == "notes"
    _, tensors = dl.load_adapter(directory)
    for name, value in model.adapter_state().items():
        assert torch.equal(tensors[name], value.detach()), name
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]


def test_bfloat16_crosses_as_its_bit_patterns_both_ways():
    from denselora.io import arrays

    t = torch.tensor([1.0, -2.5, 3.140625, 1e-30], dtype=torch.bfloat16)
    bits = arrays.to_numpy(t)
    assert bits.dtype == np.uint16 and bits.tolist() == t.view(torch.int16).numpy().view(np.uint16).tolist()
    back = arrays.to_tensor("BF16", bits)
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)
    assert np.shares_memory(arrays.view(t, "t"), t.view(torch.int16).numpy())  # a view, no copy
    assert arrays.to_numpy(t.double()).dtype == np.float32
    with pytest.raises(dl.errors.ArgumentError, match="'w' is a list"):
        arrays.to_numpy([1.0], "w")
    with pytest.raises(dl.errors.DTypeError, match="^x:"):
        arrays.view(t.double(), "x")


def test_bfloat16_adapters_are_written_and_packed_as_bfloat16(tmp_path):
    """No silent widening: a bfloat16 adapter's file holds BF16 tensors (read by the safetensors
    package), loads back bit for bit, and packs into a bundle as BF16."""
    from safetensors import safe_open

    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    randomize_adapter(model)
    model.to(torch.bfloat16)
    state = {k: v.detach().clone() for k, v in model.adapter_state().items()}
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "adapter.safetensors"), "pt") as f:
        assert set(f.keys()) == set(state)
        for name in f.keys():
            stored = f.get_tensor(name)
            assert stored.dtype == torch.bfloat16 and torch.equal(stored, state[name]), name
    _, back = dl.load_adapter(tmp_path / "a")
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], state[k]) for k in state)
    from denselora.io.bundle import pack

    pack(tmp_path / "b.dl", {"a": tmp_path / "a"})
    with dl.Bundle(tmp_path / "b.dl") as bundle:
        assert set(bundle.dtypes("a").values()) == {"BF16"}


def test_peft_adapters_are_told_apart_from_denselora_ones(saved, tmp_path):
    from denselora.io.peft import is_peft_lora

    directory, model, _ = saved
    model.export_lora(tmp_path / "lora")
    assert is_peft_lora(tmp_path / "lora") and not is_peft_lora(directory)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    assert not is_peft_lora(tmp_path / "broken") and not is_peft_lora(tmp_path / "nowhere")


def test_load_adapter_state_is_strict_and_all_or_nothing(saved):
    directory, model, _ = saved
    _, tensors = dl.load_adapter(directory)
    fresh = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    before = {k: v.detach().clone() for k, v in fresh.adapter_state().items()}
    name = "model.layers.1.mlp.down_proj.m"
    bad = [
        ({k: v for k, v in tensors.items() if k != name}, "missing tensors"),
        ({**tensors, "extra.m": tensors[name]}, "unexpected tensors.*extra.m"),
        ({**tensors, name: torch.zeros(3, 4)}, f"{name} has shape"),
    ]
    for given, message in bad:
        with pytest.raises(dl.IncompatibleAdapterError, match=message):
            fresh.load_adapter_state(given, source="given")
        for key, value in fresh.adapter_state().items():
            assert torch.equal(value, before[key]), key
    fresh.load_adapter_state({k: v.double() for k, v in tensors.items()})
    for key, value in fresh.adapter_state().items():
        assert value.dtype == torch.float32 and torch.equal(value, tensors[key]), key
