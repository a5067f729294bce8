"""The .dl bundle: round trips against the safetensors package, conversions against numpy/torch
casts, deduplication, zero-copy views, every kind of damage, the CLI, and atomic writes."""

from __future__ import annotations

import gc
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from safetensors.numpy import load_file

import denselora as dl
from denselora import _core
from denselora.cli import main, pack_main
from denselora.errors import ArgumentError, ChecksumError, DenseLoRAError, FormatError
from denselora.io import load_adapter, save_adapter_to
from denselora.io.bundle import pack

from conftest import randomize_adapter, tiny_llama

FOOTER = struct.Struct("<QQQ8s")


# ---- fixtures ----------------------------------------------------------------------------------


def _model(seed: int):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4, alpha=8))
    randomize_adapter(model, seed=seed)
    return model


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> Path:
    """Three adapters: two trained apart, and `shared` with task0's encoders/decoders."""
    root = tmp_path_factory.mktemp("adapters")
    m0 = _model(1)
    m0.save_pretrained(root / "task0")
    _model(2).save_pretrained(root / "task1")
    m2 = _model(3)
    with torch.no_grad():
        for name, tensor in m2.adapter_state().items():
            if name.startswith("shared."):
                tensor.copy_(m0.adapter_state()[name])
    m2.save_pretrained(root / "shared")
    return root


@pytest.fixture(scope="module")
def bundle_path(adapter_dirs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "all.dl"
    pack(path, {p.name: p for p in sorted(adapter_dirs.iterdir())})
    return path


def _index(data: bytes) -> tuple[int, dict]:
    """The catalog: the index of adapter records at the end of the file."""
    offset, length, _, magic = FOOTER.unpack(data[-32:])
    assert magic == b"DLBNDEND"
    return offset, json.loads(data[offset : offset + length])


def _records(data: bytes) -> list[dict]:
    """Every adapter's record (config and tensor table)."""
    _, index = _index(data)
    return [json.loads(data[a["offset"] : a["offset"] + a["length"]]) for a in index["adapters"]]


def _reframe(data: bytes, catalog: dict) -> bytes:
    text = json.dumps(catalog).encode()
    return data + text + FOOTER.pack(len(data), len(text), xxhash.xxh3_64_intdigest(text), b"DLBNDEND")


def _with_index(data: bytes, edit) -> bytes:
    """Rewrite the catalog with `edit` and a correct checksum, so only the lie remains."""
    offset, index = _index(data)
    edit(index)
    return _reframe(data[:offset], index)


def _with_record(data: bytes, i: int, edit) -> bytes:
    """Rewrite adapter i's record with `edit`: appended to the data section, with the index
    pointing at it under a correct checksum, so only the lie remains."""
    offset, index = _index(data)
    record = _records(data)[i]
    edit(record)
    text = json.dumps(record).encode()
    index["adapters"][i].update(offset=offset, length=len(text), xxh3=f"{xxhash.xxh3_64_intdigest(text):016x}")
    return _reframe(data[:offset] + text, index)


def _open_all(path: Path) -> None:
    bundle = dl.Bundle(path)
    for name in bundle.names():
        bundle.tensors(name)


# ---- round trips -------------------------------------------------------------------------------


def test_round_trip_is_bit_exact_against_the_safetensors_package(adapter_dirs, bundle_path):
    with dl.Bundle(bundle_path) as bundle:
        assert bundle.names() == ["shared", "task0", "task1"]
        assert len(bundle) == 3 and "task0" in bundle and "nope" not in bundle
        for name in bundle.names():
            reference = load_file(adapter_dirs / name / "adapter.safetensors")
            arrays = bundle.tensors(name)
            assert arrays.keys() == reference.keys()
            for key, ref in reference.items():
                assert arrays[key].dtype == ref.dtype and arrays[key].shape == ref.shape
                assert arrays[key].tobytes() == ref.tobytes(), f"{name}/{key}"
            config = json.loads((adapter_dirs / name / "adapter_config.json").read_text())
            assert bundle.config(name) == config


def test_catalog_checksums_match_an_independent_xxh3(bundle_path):
    data = bundle_path.read_bytes()
    offset, index = _index(data)
    assert FOOTER.unpack(data[-32:])[2] == xxhash.xxh3_64_intdigest(data[offset:-32])
    assert data[:8] == b"DLBUNDLE" and struct.unpack("<I", data[8:12])[0] == 1
    for entry in index["adapters"]:
        record = data[entry["offset"] : entry["offset"] + entry["length"]]
        assert f"{xxhash.xxh3_64_intdigest(record):016x}" == entry["xxh3"]
    for record in _records(data):
        for t in record["tensors"]:
            assert t["offset"] % 64 == 0
            blob = data[t["offset"] : t["offset"] + t["length"]]
            assert f"{xxhash.xxh3_64_intdigest(blob):016x}" == t["xxh3"]


def test_float16_adapter_round_trips(tmp_path):
    config = {"r": 2, "groups": {"layers.0.q": "q"}}
    rng = np.random.default_rng(0)
    tensors = {
        "shared.q.encoder": rng.standard_normal((2, 5)).astype(np.float16),
        "shared.q.decoder": rng.standard_normal((3, 2)).astype(np.float16),
        "layers.0.q.m": rng.standard_normal((2, 2)).astype(np.float16),
    }
    _core.save_adapter(os.fspath(tmp_path / "a"), json.dumps(config), tensors)
    pack(tmp_path / "h.dl", {"a": tmp_path / "a"})
    got = dl.Bundle(tmp_path / "h.dl").tensors("a")
    for key, ref in tensors.items():
        assert got[key].dtype == np.float16 and got[key].tobytes() == ref.tobytes()


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_pack_time_conversion_matches_numpy_and_torch_casts(adapter_dirs, tmp_path, dtype):
    path = tmp_path / f"{dtype}.dl"
    pack(path, {"task0": adapter_dirs / "task0"}, dtype=dtype)
    reference = load_file(adapter_dirs / "task0" / "adapter.safetensors")
    with dl.Bundle(path) as bundle:
        info = {t["name"]: t for t in bundle.tensor_info("task0")}
        arrays = bundle.tensors("task0")
        for key, ref in reference.items():
            assert info[key]["converted_from"] == "F32"
            if dtype == "f16":
                expected = ref.astype(np.float16)
                assert info[key]["dtype"] == "F16"
            else:
                expected = torch.from_numpy(ref).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                assert info[key]["dtype"] == "BF16"
            assert arrays[key].tobytes() == expected.tobytes(), key
        # Loading restores torch bfloat16 / float16 values equal to the casts.
        _, loaded = load_adapter(path, "task0")
        want = torch.float16 if dtype == "f16" else torch.bfloat16
        for key, ref in reference.items():
            assert loaded[key].dtype == want
            assert torch.equal(loaded[key], torch.from_numpy(ref).to(want))


def test_unpack_reproduces_adapter_directories(adapter_dirs, bundle_path, tmp_path):
    assert main(["unpack", str(bundle_path), "-o", str(tmp_path / "out")]) == 0
    for name in ("shared", "task0", "task1"):
        ref = load_file(adapter_dirs / name / "adapter.safetensors")
        got = load_file(tmp_path / "out" / name / "adapter.safetensors")
        assert got.keys() == ref.keys()
        assert all(got[k].tobytes() == ref[k].tobytes() for k in ref)
        assert json.loads((tmp_path / "out" / name / "adapter_config.json").read_text()) == json.loads(
            (adapter_dirs / name / "adapter_config.json").read_text()
        )


# ---- deduplication -----------------------------------------------------------------------------


def test_identical_tensors_are_stored_once(adapter_dirs, bundle_path, tmp_path):
    ref0 = load_file(adapter_dirs / "task0" / "adapter.safetensors")
    ref_shared = load_file(adapter_dirs / "shared" / "adapter.safetensors")
    size = lambda d: sum(a.nbytes for a in d.values())  # noqa: E731
    m_bytes = sum(a.nbytes for k, a in ref_shared.items() if not k.startswith("shared."))
    stats = dl.Bundle(bundle_path).stats()
    assert stats["logical_bytes"] == 3 * size(ref0)
    assert stats["stored_bytes"] == 2 * size(ref0) + m_bytes  # `shared` adds only its M matrices
    # A checkpoint and its copy cost nothing twice.
    pack(tmp_path / "one.dl", {"a": adapter_dirs / "task0"})
    pack(tmp_path / "two.dl", {"a": adapter_dirs / "task0", "b": adapter_dirs / "task0"})
    assert dl.Bundle(tmp_path / "two.dl").stats()["stored_bytes"] == dl.Bundle(tmp_path / "one.dl").stats()["stored_bytes"]


# ---- zero copy ---------------------------------------------------------------------------------


def test_tensors_are_read_only_views_of_the_map_that_keep_it_alive(bundle_path):
    bundle = dl.Bundle(bundle_path)
    a = bundle.tensors("task0")
    b = bundle.tensors("shared")
    key = next(k for k in a if k.startswith("shared."))
    # Shared factors are one blob: both adapters' arrays view the same bytes.
    assert np.shares_memory(a[key], b[key])
    assert a[key].__array_interface__["data"][0] == bundle.tensors("task0")[key].__array_interface__["data"][0]
    for array in a.values():
        assert not array.flags.writeable and not array.flags.owndata
        assert array.__array_interface__["data"][0] % 64 == 0
        assert type(array.base).__name__ == "MappedBundle"
        with pytest.raises(ValueError):
            array[...] = 0
        with pytest.raises(ValueError):
            array.flags.writeable = True
    expected = a[key].copy()
    bundle.close()
    del bundle, b
    gc.collect()
    assert np.array_equal(a[key], expected)  # the map outlives the Bundle object
    with pytest.raises(ArgumentError, match="closed"):
        _closed(bundle_path).names()


def _closed(path):
    b = dl.Bundle(path)
    b.close()
    return b


def test_opening_does_not_read_tensor_data(bundle_path, tmp_path):
    # Zero every blob: the catalog still validates (nothing checks tensor bytes at open),
    # but fetching a tensor or verifying notices.
    data = bytearray(bundle_path.read_bytes())
    for record in _records(bytes(data)):
        for t in record["tensors"]:
            data[t["offset"] : t["offset"] + t["length"]] = bytes(t["length"])
    path = tmp_path / "zeroed.dl"
    path.write_bytes(bytes(data))
    bundle = dl.Bundle(path)
    assert bundle.names() == ["shared", "task0", "task1"]
    assert bundle.config("task0")["r"] == 4
    with pytest.raises(ChecksumError, match="task0"):
        bundle.tensors("task0")
    assert bundle.tensors("task0", verify=False)  # the unchecked view is the caller's choice
    with pytest.raises(ChecksumError):
        bundle.verify()


# ---- bundles wherever adapters are accepted -----------------------------------------------------


def test_load_adapter_and_from_pretrained_accept_bundle_entries(adapter_dirs, bundle_path, tokens):
    config_dir, tensors_dir = load_adapter(adapter_dirs / "task1")
    for source in [(f"{bundle_path}:task1",), (bundle_path, "task1")]:
        config, tensors = load_adapter(*source)
        assert config == config_dir
        assert tensors.keys() == tensors_dir.keys()
        assert all(torch.equal(tensors[k], tensors_dir[k]) for k in tensors)
    tensors["shared.q_proj.encoder"].add_(1.0)  # a copy: writing never touches the map
    assert torch.equal(load_adapter(bundle_path, "task1")[1]["shared.q_proj.encoder"], tensors_dir["shared.q_proj.encoder"])
    from_dir = dl.DenseLoRAModel.from_pretrained(tiny_llama(), adapter_dirs / "task1")
    from_bundle = dl.DenseLoRAModel.from_pretrained(tiny_llama(), bundle_path, adapter_name="task1")
    with torch.no_grad():
        assert torch.equal(from_dir(tokens).logits, from_bundle(tokens).logits)
    with pytest.raises(ArgumentError, match="holds 3 adapters"):
        load_adapter(bundle_path)
    with pytest.raises(ArgumentError, match="nope"):
        load_adapter(bundle_path, "nope")


def test_save_adapter_to_adds_and_replaces_bundle_entries(adapter_dirs, tmp_path):
    config, tensors = load_adapter(adapter_dirs / "task0")
    path = tmp_path / "out.dl"
    save_adapter_to(f"{path}:a", config, tensors)
    assert load_adapter(path)[0] == config  # a one-adapter bundle needs no name
    config1, tensors1 = load_adapter(adapter_dirs / "task1")
    save_adapter_to(path, config1, tensors1, adapter_name="b")
    doubled = {k: v * 2 for k, v in tensors.items()}
    save_adapter_to(path, config, doubled, adapter_name="a")
    bundle = dl.Bundle(path)
    assert bundle.names() == ["a", "b"]
    assert all(torch.equal(load_adapter(path, "a")[1][k], doubled[k]) for k in doubled)
    assert all(torch.equal(load_adapter(path, "b")[1][k], tensors1[k]) for k in tensors1)
    save_adapter_to(tmp_path / "dir", config, tensors)
    assert load_adapter(tmp_path / "dir")[0] == config
    with pytest.raises(ArgumentError, match="adapter name"):
        save_adapter_to(tmp_path / "x.dl", config, tensors)
    with pytest.raises(ArgumentError, match="directory"):
        save_adapter_to(tmp_path / "dir", config, tensors, adapter_name="a")


# ---- bad input ---------------------------------------------------------------------------------


def test_truncated_files_are_format_errors(bundle_path, tmp_path):
    data = bundle_path.read_bytes()
    path = tmp_path / "cut.dl"
    for cut in [0, 7, 8, 63, 64, 100, len(data) // 2, len(data) - 33, len(data) - 32, len(data) - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="cut.dl"):
            dl.Bundle(path)


def test_non_bundle_files_are_refused(adapter_dirs, tmp_path):
    with pytest.raises(FormatError, match="not a denselora bundle"):
        dl.Bundle(adapter_dirs / "task0" / "adapter.safetensors")
    with pytest.raises(FormatError, match="not a denselora bundle"):
        load_adapter(adapter_dirs / "task0" / "adapter_config.json")
    with pytest.raises(IsADirectoryError):
        dl.Bundle(adapter_dirs)
    with pytest.raises(FileNotFoundError):
        dl.Bundle(tmp_path / "missing.dl")
    if hasattr(os, "mkfifo"):  # a pipe is refused, not waited on
        os.mkfifo(tmp_path / "pipe.dl")
        with pytest.raises(FormatError, match="not a regular file"):
            dl.Bundle(tmp_path / "pipe.dl")


def test_flipped_bytes_are_caught(bundle_path, tmp_path):
    data = bundle_path.read_bytes()
    offset, _ = _index(data)
    t = _records(data)[1]["tensors"][0]
    path = tmp_path / "flip.dl"
    # In a blob: open succeeds, fetch and verify name the tensor.
    damaged = bytearray(data)
    damaged[t["offset"] + 1] ^= 0x40
    path.write_bytes(bytes(damaged))
    with pytest.raises(ChecksumError, match=t["name"]):
        dl.Bundle(path).verify()
    # In a record: open succeeds, using that adapter fails.
    entry = _index(data)[1]["adapters"][2]
    damaged = bytearray(data)
    damaged[entry["offset"] + 5] ^= 0x01
    path.write_bytes(bytes(damaged))
    bundle = dl.Bundle(path)
    bundle.tensors("shared")
    with pytest.raises(ChecksumError, match="record of adapter"):
        bundle.config("task1")
    with pytest.raises(ChecksumError):
        bundle.verify()
    # In the catalog, the preamble and the footer: refused at open.
    for where in [offset + 10, 3, 9, 20, len(data) - 20, len(data) - 5]:
        damaged = bytearray(data)
        damaged[where] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(FormatError):
            dl.Bundle(path)


def _first(record):
    return record["tensors"][0]


def _second_offset(record):
    return record["tensors"][1]["offset"]


LIES = {  # (record edit or None, index edit or None, message)
    "out of range": (lambda r: _first(r).update(offset=1 << 40), None, "past the data section"),
    "unaligned": (lambda r: _first(r).update(offset=_first(r)["offset"] + 4), None, "aligned"),
    "overlapping": (lambda r: _first(r).update(offset=_second_offset(r) + 64), None, "overlaps"),
    "absurd shape": (lambda r: _first(r).update(shape=[2**62, 2**62]), None, "larger than the file"),
    "size mismatch": (lambda r: _first(r).update(length=_first(r)["length"] + 4), None, "does not match shape"),
    "unknown dtype": (lambda r: _first(r).update(dtype="I8"), None, "unknown dtype"),
    "duplicate tensor": (lambda r: r["tensors"].append(dict(_first(r))), None, "named twice"),
    "missing tensor": (lambda r: r["tensors"].pop(), None, "missing"),
    "duplicate adapter": (None, lambda c: c["adapters"][1].update(name=c["adapters"][0]["name"]), "twice"),
    "path in name": (None, lambda c: c["adapters"][0].update(name="../x"), "must not contain"),
    "record out of range": (None, lambda c: c["adapters"][0].update(offset=1 << 50), "outside the data section"),
    "records overlap": (None, lambda c: c["adapters"][0].update(offset=c["adapters"][1]["offset"]), "overlap"),
    "newer version": (None, lambda c: c.update(format_version=2), "format_version"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_lying_catalog_is_a_format_error(bundle_path, tmp_path, lie):
    record_edit, index_edit, message = LIES[lie]
    data = bundle_path.read_bytes()
    data = _with_record(data, 0, record_edit) if record_edit else _with_index(data, index_edit)
    path = tmp_path / "lie.dl"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=message) as info:
        _open_all(path)
    assert "lie.dl" in str(info.value)


def test_catalog_size_cap_is_checked_before_allocating(bundle_path, tmp_path):
    data = bundle_path.read_bytes()
    offset, length, digest, magic = FOOTER.unpack(data[-32:])
    path = tmp_path / "huge.dl"
    path.write_bytes(data[:-32] + FOOTER.pack(offset, 1 << 62, digest, magic))
    with pytest.raises(FormatError, match="exceeds the limit"):
        dl.Bundle(path)


def test_mutated_bundle_corpus_never_crashes(tmp_path):
    """A bounded, seeded corpus of damaged bundles: every one is refused at open, or opens and
    fails verification; none crashes, hangs or passes."""
    config = {"r": 2, "groups": {"layers.0.q": "q", "layers.1.q": "q"}}
    rng = np.random.default_rng(7)
    tensors = {
        "shared.q.encoder": rng.standard_normal((2, 6)).astype(np.float32),
        "shared.q.decoder": rng.standard_normal((5, 2)).astype(np.float32),
        "layers.0.q.m": rng.standard_normal((2, 2)).astype(np.float32),
        "layers.1.q.m": rng.standard_normal((2, 2)).astype(np.float32),
    }
    source = tmp_path / "seed.dl"
    pack(source, {"a": (config, tensors), "b": (config, {**tensors, "layers.1.q.m": tensors["layers.0.q.m"] * 3})}, dtype="f16")
    original = source.read_bytes()
    seeded = random.Random(1234)
    path = tmp_path / "mutant.dl"
    outcomes = {"refused": 0, "verify failed": 0}
    for i in range(400):
        data = bytearray(original)
        kind = i % 4
        if kind == 0:
            data[seeded.randrange(len(data))] ^= 1 << seeded.randrange(8)
        elif kind == 1:
            for _ in range(seeded.randint(2, 8)):
                data[seeded.randrange(len(data))] = seeded.randrange(256)
        elif kind == 2:
            del data[seeded.randrange(len(data)) :]
        else:
            at = seeded.randrange(len(data))
            data[at:at] = bytes(seeded.randrange(256) for _ in range(seeded.randint(1, 16)))
        if bytes(data) == original:
            continue
        path.write_bytes(bytes(data))
        try:
            bundle = dl.Bundle(path)
        except FormatError:
            outcomes["refused"] += 1
            continue
        with pytest.raises(FormatError):  # ChecksumError is a FormatError
            bundle.verify()
        outcomes["verify failed"] += 1
    assert outcomes["refused"] > 0 and outcomes["verify failed"] > 0, outcomes


# ---- writing is atomic -------------------------------------------------------------------------


def test_failed_pack_leaves_the_existing_bundle_untouched(adapter_dirs, bundle_path, tmp_path):
    path = tmp_path / "keep.dl"
    path.write_bytes(bundle_path.read_bytes())
    before = path.read_bytes()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter_dirs / "task0" / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        pack(path, {"new": adapter_dirs / "task0", "broken": broken}, keep_existing=True)
    assert path.read_bytes() == before

    def interrupt(name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(path, {"x": adapter_dirs / "task0"}, progress=interrupt)
    assert path.read_bytes() == before
    # No temp file left; the writers' lock file stays (removing it could let two writers lock two files).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "keep.dl", "keep.dl.lock"]


def test_a_process_killed_midway_leaves_the_bundle_untouched(adapter_dirs, bundle_path, tmp_path):
    path = tmp_path / "killed.dl"
    path.write_bytes(bundle_path.read_bytes())
    before = path.read_bytes()
    script = (
        "import os, sys\n"
        "from denselora.io.bundle import pack\n"
        "pack(sys.argv[1], {'a': sys.argv[2], 'b': sys.argv[2]}, progress=lambda name: os._exit(3))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, str(path), str(adapter_dirs / "task0")], env=env, timeout=120)
    assert done.returncode == 3
    assert path.read_bytes() == before
    dl.Bundle(path).verify()


# ---- many writers, many readers ----------------------------------------------------------------


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _copies(adapter_dirs: Path, root: Path, count: int) -> list[Path]:
    """``count`` distinct adapters (task0's config, task0 or task1's tensors scaled apart)."""
    from safetensors.numpy import save_file

    out = []
    for i in range(count):
        src = adapter_dirs / ("task0", "task1")[i % 2]
        target = root / f"adapter{i}"
        target.mkdir(parents=True)
        (target / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        tensors = {k: (v * (1.0 + i)).astype(v.dtype) for k, v in load_file(src / "adapter.safetensors").items()}
        save_file(tensors, target / "adapter.safetensors")
        out.append(target)
    return out


def test_concurrent_writer_processes_lose_no_adapter(adapter_dirs, bundle_path, tmp_path):
    """Writers in separate processes, half through the command line, half through the Python API,
    each adding its own adapter to one bundle at the same time: every adapter is there at the end."""
    path = tmp_path / "shared.dl"
    path.write_bytes(bundle_path.read_bytes())
    sources = _copies(adapter_dirs, tmp_path / "sources", 6)
    api = "import sys\nfrom denselora.io.bundle import pack\npack(sys.argv[1], {sys.argv[2]: sys.argv[3]}, keep_existing=True)\n"
    procs = []
    for i, source in enumerate(sources):
        if i % 2:
            procs.append(_spawn(["-c", api, str(path), source.name, str(source)]))
        else:
            procs.append(_spawn(["-c", "import sys; from denselora.cli import pack_main; sys.exit(pack_main())", str(source), "-o", str(path)]))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    bundle = dl.Bundle(path)
    assert sorted(bundle.names()) == sorted(["shared", "task0", "task1", *(s.name for s in sources)])
    bundle.verify()
    for source in sources:
        expected = load_file(source / "adapter.safetensors")
        got = bundle.tensors(source.name)
        assert got.keys() == expected.keys()
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl.flock is POSIX")
def test_a_writer_waits_for_the_lock_on_the_sidecar_file(adapter_dirs, bundle_path, tmp_path):
    import fcntl
    import time

    path = tmp_path / "locked.dl"
    path.write_bytes(bundle_path.read_bytes())
    (source,) = _copies(adapter_dirs, tmp_path / "sources", 1)
    with open(tmp_path / "locked.dl.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what another writer holds while it writes
        writer = _spawn(["-c", "import sys; from denselora.cli import pack_main; sys.exit(pack_main())", str(source), "-o", str(path)])
        time.sleep(3.0)
        assert writer.poll() is None, writer.communicate()  # still waiting
        assert dl.Bundle(path).names() == ["shared", "task0", "task1"]  # readers do not wait
        fcntl.flock(lock, fcntl.LOCK_UN)
    _, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert dl.Bundle(path).names() == ["shared", "task0", "task1", "adapter0"]


def test_a_reader_keeps_its_views_while_a_writer_replaces_the_file_and_reopen_sees_new_entries(
    adapter_dirs, bundle_path, tmp_path
):
    path = tmp_path / "served.dl"
    path.write_bytes(bundle_path.read_bytes())
    reader = dl.Bundle(path)
    views = reader.tensors("task0")
    copies = {k: v.copy() for k, v in views.items()}
    # Another process replaces the bundle: its adapters rewritten as others, plus a new one.
    script = (
        "import sys\nfrom denselora.io.bundle import pack\n"
        "pack(sys.argv[1], {'task0': sys.argv[2], 'new': sys.argv[2]}, keep_existing=True)\n"
    )
    p = _spawn(["-c", script, str(path), str(adapter_dirs / "task1")])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    for k, v in views.items():
        np.testing.assert_array_equal(v, copies[k])  # the mapped file is the old one, unchanged
    assert reader.names() == ["shared", "task0", "task1"]
    reader.verify()
    assert reader.reopen() is reader
    assert reader.names() == ["shared", "task0", "task1", "new"]
    expected = load_file(adapter_dirs / "task1" / "adapter.safetensors")
    for k, v in reader.tensors("task0").items():
        np.testing.assert_array_equal(v, expected[k])
    for k, v in views.items():  # views handed out before reopen still read the old file
        np.testing.assert_array_equal(v, copies[k])


# ---- command line ------------------------------------------------------------------------------


def test_cli_pack_inspect_verify(adapter_dirs, tmp_path, capsys):
    out = tmp_path / "cli.dl"
    assert pack_main([str(adapter_dirs), "-o", str(out)]) == 0
    assert dl.Bundle(out).names() == ["shared", "task0", "task1"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ["adapter", "rank", "groups", "task0", "shared", "deduplication saves"]:
        assert word in text
    assert main(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    # Adding to an existing bundle keeps it; --dtype converts the new entries.
    extra = tmp_path / "more"
    (extra / "task9").mkdir(parents=True)
    for f in ("adapter_config.json", "adapter.safetensors"):
        (extra / "task9" / f).write_bytes((adapter_dirs / "task1" / f).read_bytes())
    assert main(["pack", str(extra), "-o", str(out), "--dtype", "bf16"]) == 0
    bundle = dl.Bundle(out)
    assert bundle.names() == ["shared", "task0", "task1", "task9"]
    assert set(bundle.dtypes("task9").values()) == {"BF16"}
    assert set(bundle.dtypes("task0").values()) == {"F32"}
    # --overwrite starts afresh.
    assert main(["pack", str(extra), "-o", str(out), "--overwrite"]) == 0
    assert dl.Bundle(out).names() == ["task9"]


def test_cli_errors_are_one_line_and_non_zero(adapter_dirs, bundle_path, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pack", str(empty), "-o", str(tmp_path / "e.dl")]) == 2
    assert "no adapter directories" in capsys.readouterr().err
    assert not (tmp_path / "e.dl").exists()

    partial = tmp_path / "partial" / "x"
    partial.mkdir(parents=True)
    (partial / "adapter.safetensors").write_bytes((adapter_dirs / "task0" / "adapter.safetensors").read_bytes())
    assert main(["pack", str(tmp_path / "partial"), "-o", str(tmp_path / "p.dl")]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json" in err and err.count("\n") == 1

    damaged = bytearray(bundle_path.read_bytes())
    t = _records(bytes(damaged))[2]["tensors"][3]
    damaged[t["offset"]] ^= 0xFF
    bad = tmp_path / "bad.dl"
    bad.write_bytes(bytes(damaged))
    assert main(["verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "bad.dl" in err and t["name"] in err

    assert main(["pack", str(bundle_path), "-o", str(tmp_path / "f.dl")]) == 2
    assert "not a directory" in capsys.readouterr().err

    (tmp_path / "junk.dl").write_bytes(b"hello world, not a bundle at all" * 4)
    for command in (["verify"], ["inspect"], ["unpack", "-o", str(tmp_path / "u")]):
        assert main([command[0], str(tmp_path / "junk.dl"), *command[1:]]) == 2
        assert "not a denselora bundle" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.dl")]) == 2
    assert issubclass(FormatError, DenseLoRAError)


def test_console_script_denselora_pack(adapter_dirs, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "import sys; from denselora.cli import pack_main; sys.exit(pack_main())"
    out = tmp_path / "s.dl"
    done = subprocess.run(
        [sys.executable, "-c", code, str(adapter_dirs / "task0"), "-o", str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert dl.Bundle(out).names() == ["task0"]
