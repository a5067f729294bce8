"""`open_adapter`, the one way adapters are read: a directory and a bundle entry give the same
config, layout and tensors (checked against the safetensors package), the arrays view the
memory-mapped file without a copy, and bad files give typed errors naming the file or tensor."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import denselora as dl
from denselora import _core
from denselora.errors import ArgumentError, ChecksumError, FormatError, IncompatibleAdapterError
from denselora.io import GroupLayout, adapter_layout, open_adapter
from denselora.io.basis import basis_groups, fingerprint, tenant_config, tenant_tensors
from denselora.io.bundle import pack
from denselora.method.model import inject

from conftest import randomize_adapter, tiny_llama


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A full adapter and a tenant of it, as directories and as entries of one bundle."""
    root = tmp_path_factory.mktemp("open")
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    randomize_adapter(model)
    model.save_pretrained(root / "full")
    config, state = model.adapter_config_dict(), model.adapter_state()
    tenant = tenant_config(config, fingerprint(config, state), basis_groups(state))
    dl.save_adapter(root / "tenant", tenant, tenant_tensors(state))
    pack(root / "all.dl", {"full": root / "full", "tenant": root / "tenant"})
    return root


def _expected_layout(config):
    tensors_by_group: dict[str, list[str]] = {}
    for module, group in config["groups"].items():
        tensors_by_group.setdefault(group, []).append(module)
    return tensors_by_group


@pytest.mark.parametrize("name", ["full", "tenant"])
def test_directory_and_bundle_entry_open_alike(stored, name):
    from_dir = open_adapter(stored / name)
    from_entry = open_adapter(stored / "all.dl", name)
    assert open_adapter(f"{stored / 'all.dl'}:{name}").where == f"{stored / 'all.dl'}:{name}" == from_entry.where
    assert from_dir.where == str(stored / name)
    assert from_dir.config == from_entry.config == json.loads((stored / name / "adapter_config.json").read_text())
    assert from_dir.groups == from_entry.groups
    reference = load_file(stored / name / "adapter.safetensors")
    for opened in (from_dir, from_entry):
        assert opened.arrays.keys() == reference.keys()
        for key, (dtype, array) in opened.arrays.items():
            assert dtype == "F32"
            np.testing.assert_array_equal(array, reference[key])
    # The layout: every group's modules and shapes, as the stored tensors give them.
    modules = _expected_layout(from_dir.config)
    assert set(from_dir.groups) == set(modules)
    basis_groups = from_dir.config.get("basis", {}).get("groups", {})
    for group, layout in from_dir.groups.items():
        assert isinstance(layout, GroupLayout) and layout.name == group
        assert sorted(layout.modules) == sorted(modules[group]) == list(layout.modules)
        for module in layout.modules:
            assert reference[f"{module}.m"].shape == (layout.decoder_rank, layout.encoder_rank)
        dims = [layout.in_features, layout.out_features, layout.encoder_rank, layout.decoder_rank]
        if name == "full":
            assert reference[f"shared.{group}.encoder"].shape == (layout.encoder_rank, layout.in_features)
            assert reference[f"shared.{group}.decoder"].shape == (layout.out_features, layout.decoder_rank)
        else:
            assert basis_groups[group] == dims


def test_arrays_view_the_mapped_file_and_keep_it_alive(stored):
    for opened in (open_adapter(stored / "full"), open_adapter(stored / "all.dl", "full")):
        arrays = [a for _, a in opened.arrays.values()]
        assert all(not a.flags.writeable and not a.flags.owndata for a in arrays)
        bases = {id(a.base) for a in arrays}
        assert len(bases) == 1  # one owner of the map for all of them
        assert type(arrays[0].base).__name__ in {"MappedAdapter"}
        # Views of one buffer: their addresses lie within the file's size of each other.
        starts = sorted(a.__array_interface__["data"][0] for a in arrays)
        assert starts[-1] - starts[0] < (stored / "full" / "adapter.safetensors").stat().st_size + (1 << 20)
    config_json, groups, raw = _core.open_adapter(str(stored / "full"))
    copy = {k: np.array(a) for k, (_, a) in raw.items()}
    del config_json, groups
    gc.collect()
    for key, (_, array) in raw.items():
        np.testing.assert_array_equal(array, copy[key])


def test_torch_tensors_are_writable_copies(stored):
    opened = open_adapter(stored / "full")
    tensors = opened.torch_tensors()
    name = next(iter(tensors))
    tensors[name].add_(1.0)
    assert not np.array_equal(tensors[name].numpy(), opened.arrays[name][1])
    _, loaded = dl.load_adapter(stored / "full")
    np.testing.assert_array_equal(loaded[name].numpy(), opened.arrays[name][1])


def test_bfloat16_and_float16_arrive_as_stored(tmp_path, stored):
    config, tensors = dl.load_adapter(stored / "full")
    for dtype, name, numpy_dtype in [(torch.float16, "F16", np.float16), (torch.bfloat16, "BF16", np.uint16)]:
        dl.save_adapter(tmp_path / name, config, {k: v.to(dtype) for k, v in tensors.items()})
        opened = open_adapter(tmp_path / name)
        assert {d for d, _ in opened.arrays.values()} == {name}
        assert all(a.dtype == numpy_dtype for _, a in opened.arrays.values())
        back = opened.torch_tensors()
        assert all(back[k].dtype == dtype and torch.equal(back[k], tensors[k].to(dtype)) for k in tensors)


def test_unaligned_tensors_of_a_foreign_file_are_read(tmp_path):
    """Another writer may leave a float32 tensor at an odd offset; it arrives as a copy."""
    config = {"groups": {"a": "g"}, "format_version": 1}
    tensors = {
        "shared.g.encoder": np.arange(6, dtype=np.float32).reshape(2, 3),
        "shared.g.decoder": np.arange(6, dtype=np.float32).reshape(3, 2),
        "a.m": np.arange(4, dtype=np.float32).reshape(2, 2),
    }
    dl.save_adapter(tmp_path / "a", config, {k: torch.from_numpy(v) for k, v in tensors.items()})
    path = tmp_path / "a" / "adapter.safetensors"
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    # Shift the data section by 2 bytes (a header 2 bytes longer): every tensor is unaligned.
    text = json.dumps(header).encode()
    text += b" " * ((-len(text) - 8) % 8 + 2)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_len :])
    opened = open_adapter(tmp_path / "a")
    for key, (_, array) in opened.arrays.items():
        np.testing.assert_array_equal(array, tensors[key])


def test_bad_files_are_typed_errors_naming_the_file_or_tensor(stored, tmp_path):
    import shutil

    directory = tmp_path / "a"
    shutil.copytree(stored / "full", directory)
    path = directory / "adapter.safetensors"
    good = load_file(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FormatError, match="adapter.safetensors"):
        open_adapter(directory)
    save_file({**good, "shared.q_proj.encoder": good["shared.q_proj.encoder"].astype(np.float64)}, path)
    with pytest.raises(FormatError, match=r"shared\.q_proj\.encoder"):
        open_adapter(directory)
    save_file({**good, "model.layers.0.mlp.up_proj.m": np.zeros((3, 4), np.float32)}, path)
    with pytest.raises(IncompatibleAdapterError, match=r"model\.layers\.0\.mlp\.up_proj"):
        open_adapter(directory)
    with pytest.raises(ArgumentError, match="applies only to bundles"):
        open_adapter(stored / "full", "full")
    with pytest.raises(ArgumentError, match="holds 2 adapters"):
        open_adapter(stored / "all.dl")
    with pytest.raises(ArgumentError, match="nope"):
        open_adapter(stored / "all.dl", "nope")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_adapter(tmp_path / "nowhere")
    # A damaged blob of a bundle entry: a checksum error naming the tensor.
    bundle = tmp_path / "b.dl"
    shutil.copy(stored / "all.dl", bundle)
    info = dl.Bundle(bundle).tensor_info("full")[0]
    data = bytearray(bundle.read_bytes())
    data[info["offset"]] ^= 0xFF
    bundle.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=info["name"]):
        open_adapter(bundle, "full")


def test_adapter_layout_checks_tensors_held_in_memory(stored):
    opened = open_adapter(stored / "full")
    tensors = opened.torch_tensors()
    assert adapter_layout(opened.config, tensors) == opened.groups
    tensors.pop("shared.v_proj.decoder")
    with pytest.raises(IncompatibleAdapterError, match=r"given: .*shared\.v_proj\.decoder"):
        adapter_layout(opened.config, tensors, "given")


def test_inject_checks_modules_against_the_layout(stored, tokens):
    import transformers

    opened = open_adapter(stored / "full")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(config)
    cfg = dl.DenseLoRAConfig.from_saved(opened.config)
    with pytest.raises(IncompatibleAdapterError, match=r"full: tensor shared\.\w+_proj\.(en|de)coder has shape .*module model\.layers\.0\.mlp\.\w+_proj"):
        inject(base, cfg, groups=opened.config["groups"], tensors=opened.torch_tensors(), layout=opened.groups, source="full")
    assert not hasattr(base, "denselora_shared")
    # Without a layout, the core derives it from the tensors: the same model results.
    wrapped = inject(tiny_llama(), cfg, groups=opened.config["groups"], tensors=opened.torch_tensors())
    loaded = dl.DenseLoRAModel.from_pretrained(tiny_llama(), stored / "full")
    with torch.no_grad():
        torch.testing.assert_close(wrapped(tokens).logits, loaded(tokens).logits, rtol=0, atol=0)
