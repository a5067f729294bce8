use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::Value;

use super::format::*;
use super::*;
use crate::adapter::tests::{sample_adapter, sample_tenant};
use crate::adapter::{decoder_key, encoder_key, Adapter};
use crate::dtype::{self, DType};
use crate::error::Error;
use crate::tensor::Tensor;

fn scaled(adapter: &Adapter, factor: f32) -> Adapter {
    let mut out = adapter.clone();
    for t in out.tensors.values_mut() {
        let v: Vec<f32> = t.to_f32().iter().map(|x| x * factor).collect();
        *t = Tensor::from_f32(t.dtype, t.shape.clone(), &v);
    }
    out
}

fn memory_entry<'a>(name: &str, adapter: &'a Adapter) -> PackEntry<'a> {
    PackEntry {
        name: name.into(),
        source: PackSource::Memory { config: adapter.config.clone(), tensors: adapter.views() },
    }
}

fn no_progress() -> impl FnMut(&str) -> crate::Result<()> {
    |_| Ok(())
}

/// A bundle of three adapters: `a`, `b` (a's shared tensors, other M) and `a-copy` (== a).
fn sample_bundle(dir: &Path) -> (PathBuf, Vec<(String, Adapter)>) {
    let a = sample_adapter();
    let mut b = scaled(&a, 2.0);
    for key in [encoder_key("q_proj"), decoder_key("q_proj"), encoder_key("up_proj"), decoder_key("up_proj")] {
        b.tensors.insert(key.clone(), a.tensors[&key].clone());
    }
    let adapters = vec![("a".to_string(), a.clone()), ("b".to_string(), b), ("a-copy".to_string(), a)];
    let path = dir.join("sample.dl");
    let entries: Vec<PackEntry<'_>> = adapters.iter().map(|(n, a)| memory_entry(n, a)).collect();
    pack(&path, &entries, &PackOptions::default(), &mut no_progress()).unwrap();
    (path, adapters)
}

fn assert_same(bundle: &Bundle, name: &str, adapter: &Adapter) {
    let tensors = bundle.tensor_map(name).unwrap();
    assert_eq!(tensors.len(), adapter.tensors.len());
    for (k, t) in &adapter.tensors {
        let got = tensors[k];
        assert_eq!(got.dtype, t.dtype, "{name}/{k}");
        assert_eq!(got.shape, &t.shape[..], "{name}/{k}");
        assert_eq!(got.data, &t.data[..], "{name}/{k}");
    }
    assert_eq!(bundle.adapter(name).unwrap().config, adapter.config);
}

#[test]
fn round_trip_is_bit_exact_and_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let (path, adapters) = sample_bundle(dir.path());
    let bundle = Bundle::open(&path).unwrap();
    assert_eq!(bundle.names().collect::<Vec<_>>(), ["a", "b", "a-copy"]);
    for (name, adapter) in &adapters {
        assert_same(&bundle, name, adapter);
    }
    for a in bundle.adapters().unwrap() {
        for t in &a.tensors {
            assert_eq!(t.offset % 64, 0);
            assert_eq!(bundle.raw_bytes(t).as_ptr() as usize % 64, 0, "mapped view aligned");
        }
    }
    bundle.verify().unwrap();
}

#[test]
fn identical_tensors_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, adapters) = sample_bundle(dir.path());
    let bundle = Bundle::open(&path).unwrap();
    let stats = bundle.stats().unwrap();
    let a_bytes: u64 = adapters[0].1.tensors.values().map(|t| t.data.len() as u64).sum();
    let m_bytes: u64 =
        adapters[1].1.tensors.iter().filter(|(k, _)| k.ends_with(".m")).map(|(_, t)| t.data.len() as u64).sum();
    assert_eq!(stats.logical_bytes, 3 * a_bytes);
    // a once, plus b's own M matrices; a-copy and b's shared factors cost nothing.
    assert_eq!(stats.stored_bytes, a_bytes + m_bytes);
}

#[test]
fn same_bytes_with_other_shape_are_not_merged() {
    // The q decoder (8 x 4) gets the very bytes of the q encoder (4 x 8): not a duplicate.
    let dir = tempfile::tempdir().unwrap();
    let mut a = sample_adapter();
    let enc = a.tensors[&encoder_key("q_proj")].clone();
    a.tensors.insert(decoder_key("q_proj"), Tensor { shape: vec![8, 4], ..enc.clone() });
    let path = dir.path().join("x.dl");
    write_atomically_bundle(&path, |w| {
        w.add_adapter("a", &a.config, &a.views(), None)?;
        assert!(w.add_adapter("a", &a.config, &a.views(), None).is_err(), "duplicate name refused");
        w.add_adapter("b", &a.config, &a.views(), None)?;
        Ok(())
    });
    let bundle = Bundle::open(&path).unwrap();
    for name in ["a", "b"] {
        let tensors = bundle.tensor_map(name).unwrap();
        assert_eq!(tensors[&decoder_key("q_proj")].shape, &[8, 4]);
        assert_eq!(tensors[&encoder_key("q_proj")].shape, &[4, 8]);
        assert_eq!(tensors[&decoder_key("q_proj")].data, tensors[&encoder_key("q_proj")].data);
    }
    let stats = bundle.stats().unwrap();
    // b is stored entirely by reference to a; within a, the two shapes stay two blobs.
    let a_bytes: u64 = a.tensors.values().map(|t| t.data.len() as u64).sum();
    assert_eq!(stats.stored_bytes, a_bytes);
    assert_eq!(stats.blobs, a.tensors.len());
}

#[test]
fn dtype_conversion_is_recorded_and_rounds_like_half() {
    let dir = tempfile::tempdir().unwrap();
    let a = sample_adapter();
    for target in [DType::F16, DType::BF16] {
        let path = dir.path().join(format!("{target}.dl"));
        let options = PackOptions { dtype: Some(target), keep_existing: false };
        pack(&path, &[memory_entry("a", &a)], &options, &mut no_progress()).unwrap();
        let bundle = Bundle::open(&path).unwrap();
        for (t, view) in bundle.tensors("a", true).unwrap() {
            assert_eq!(t.dtype, target);
            assert_eq!(t.converted_from, Some(DType::F32));
            let expected = dtype::from_f32(target, &a.tensors[&t.name].to_f32());
            assert_eq!(view.data, &expected[..]);
        }
        // Packing again from this bundle keeps the record of the original dtype.
        let again = dir.path().join(format!("{target}-again.dl"));
        let base = Bundle::open(&path).unwrap();
        write_atomically_bundle(&again, |w| w.copy_from(&base, "a", Some(DType::F32)));
        let back = Bundle::open(&again).unwrap();
        for (t, _) in back.tensors("a", true).unwrap() {
            assert_eq!((t.dtype, t.converted_from), (DType::F32, None), "back to the original dtype");
        }
    }
}

fn write_atomically_bundle(path: &Path, f: impl FnOnce(&mut BundleWriter<'_>) -> crate::Result<()>) {
    crate::atomic::write_atomically(path, |w| {
        let mut writer = BundleWriter::new(w, path)?;
        f(&mut writer)?;
        writer.finish().map(|_| ())
    })
    .unwrap();
}

#[test]
fn keep_existing_adds_and_replaces_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (path, adapters) = sample_bundle(dir.path());
    let new_b = scaled(&adapters[1].1, -1.0);
    let c = scaled(&adapters[0].1, 3.0);
    let options = PackOptions { dtype: None, keep_existing: true };
    pack(&path, &[memory_entry("c", &c), memory_entry("b", &new_b)], &options, &mut no_progress()).unwrap();
    let bundle = Bundle::open(&path).unwrap();
    assert_eq!(bundle.names().collect::<Vec<_>>(), ["a", "b", "a-copy", "c"]);
    assert_same(&bundle, "a", &adapters[0].1);
    assert_same(&bundle, "b", &new_b);
    assert_same(&bundle, "c", &c);
    bundle.verify().unwrap();
}

#[test]
fn concurrent_writers_keep_every_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (path, adapters) = sample_bundle(dir.path());
    let a = &adapters[0].1;
    let writers = 6;
    std::thread::scope(|s| {
        for i in 0..writers {
            let path = &path;
            s.spawn(move || {
                let adapter = scaled(a, 3.0 + i as f32);
                let options = PackOptions { dtype: None, keep_existing: true };
                pack(path, &[memory_entry(&format!("w{i}"), &adapter)], &options, &mut no_progress()).unwrap();
            });
        }
    });
    let bundle = Bundle::open(&path).unwrap();
    assert_eq!(bundle.len(), adapters.len() + writers);
    for i in 0..writers {
        assert_same(&bundle, &format!("w{i}"), &scaled(a, 3.0 + i as f32));
    }
    bundle.verify().unwrap();
    assert!(lock_path(&path).exists());
    assert_eq!(lock_path(&path).file_name().unwrap(), "sample.dl.lock");
}

#[test]
fn readers_keep_their_file_while_a_writer_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, adapters) = sample_bundle(dir.path());
    let reader = Bundle::open(&path).unwrap();
    let before = reader.tensor_map("a").unwrap();
    let extra = scaled(&adapters[0].1, 5.0);
    let options = PackOptions { dtype: None, keep_existing: false };
    // Replace the file with one holding other bytes at the same offsets.
    pack(&path, &[memory_entry("a", &extra)], &options, &mut no_progress()).unwrap();
    for (k, t) in &adapters[0].1.tensors {
        assert_eq!(before[k].data, &t.data[..], "the reader's view of {k} is unchanged");
    }
    reader.verify().unwrap();
    assert_eq!(reader.len(), 3);
    let fresh = reader.reopen().unwrap();
    assert_eq!(fresh.names().collect::<Vec<_>>(), ["a"]);
    assert_same(&fresh, "a", &extra);
}

#[test]
fn failed_pack_leaves_destination_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = sample_bundle(dir.path());
    let before = std::fs::read(&path).unwrap();
    let entries = [PackEntry { name: "x".into(), source: PackSource::Dir(dir.path().join("missing")) }];
    let err = pack(&path, &entries, &PackOptions::default(), &mut no_progress()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let mut calls = 0;
    let a = sample_adapter();
    let err = pack(&path, &[memory_entry("a", &a), memory_entry("b", &a)], &PackOptions::default(), &mut |_| {
        calls += 1;
        if calls == 2 {
            Err(Error::format("progress", "interrupted"))
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert!(err.to_string().contains("interrupted"));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let mut left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["sample.dl", "sample.dl.lock"], "no temporary file left behind (the writers' lock stays)");
}

#[test]
fn unpack_reproduces_adapter_directories() {
    let dir = tempfile::tempdir().unwrap();
    let (path, adapters) = sample_bundle(dir.path());
    let bundle = Bundle::open(&path).unwrap();
    let out = dir.path().join("out");
    unpack(&bundle, &out, &[], &mut no_progress()).unwrap();
    for (name, adapter) in &adapters {
        assert_eq!(&crate::adapter::read_adapter_dir(&out.join(name)).unwrap(), adapter);
    }
    assert!(unpack(&bundle, &out, &["nope".to_string()], &mut no_progress()).is_err());
}

#[test]
fn a_family_bundle_holds_a_basis_and_its_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let basis = sample_adapter();
    let t1 = sample_tenant();
    let t2 = scaled(&t1, 3.0);
    let path = dir.path().join("family.dl");
    let entries = [memory_entry("basis", &basis), memory_entry("t1", &t1), memory_entry("t2", &t2)];
    pack(&path, &entries, &PackOptions::default(), &mut no_progress()).unwrap();
    let bundle = Bundle::open(&path).unwrap();
    bundle.verify().unwrap();
    for (name, adapter) in [("basis", &basis), ("t1", &t1), ("t2", &t2)] {
        assert_same(&bundle, name, adapter);
    }
    assert_eq!(bundle.adapter("t1").unwrap().groups, basis.layout("x").unwrap());
    assert_eq!(bundle.adapter("t1").unwrap().config["format_version"], Value::from(2));
    assert_eq!(bundle.adapter("basis").unwrap().config["format_version"], Value::from(1));
    let out = dir.path().join("out");
    unpack(&bundle, &out, &[], &mut no_progress()).unwrap();
    assert_eq!(crate::adapter::read_adapter_dir(&out.join("t2")).unwrap(), t2);

    // A tenant entry whose cores do not fit its basis groups is refused by the writer and, when a
    // record lies, by the reader, naming the entry and the tensor.
    let mut bad = sample_tenant();
    bad.config[crate::adapter::BASIS_KEY]["groups"]["q_proj"] = serde_json::json!([8, 8, 4, 5]);
    let err =
        pack(&dir.path().join("bad.dl"), &[memory_entry("bad", &bad)], &PackOptions::default(), &mut no_progress())
            .unwrap_err();
    assert!(err.to_string().contains("adapter \"bad\"") && err.to_string().contains("q_proj.m"), "{err}");
    let bytes = std::fs::read(&path).unwrap();
    let lying =
        with_record(&bytes, 1, |r| r["config"]["basis"]["groups"]["up_proj"] = serde_json::json!([8, 12, 4, 2]));
    let err = open_bytes(lying).unwrap().adapter("t1").unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(err.to_string().contains("adapter \"t1\"") && err.to_string().contains("up_proj.m"), "{err}");
}

#[test]
fn bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = sample_adapter();
    for name in ["", "a/b", "..", "x:y", "tab\there"] {
        let err =
            pack(&dir.path().join("n.dl"), &[memory_entry(name, &a)], &PackOptions::default(), &mut no_progress())
                .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{name:?}: {err}");
    }
    assert!(!dir.path().join("n.dl").exists());
}

// ---- corruption ------------------------------------------------------------------------------

fn sample_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = sample_bundle(dir.path());
    std::fs::read(path).unwrap()
}

/// A bundle with padding between blobs (F16 tensors of 96 bytes).
fn padded_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half.dl");
    let a = sample_adapter();
    let options = PackOptions { dtype: Some(DType::F16), keep_existing: false };
    pack(&path, &[memory_entry("a", &a)], &options, &mut no_progress()).unwrap();
    std::fs::read(path).unwrap()
}

fn footer_of(bytes: &[u8]) -> Footer {
    Footer::from_bytes(bytes[bytes.len() - 32..].try_into().unwrap()).unwrap()
}

/// Rewrite the catalog (index) with `edit` and fix up the footer, so that only the lie remains.
fn with_index(bytes: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let footer = footer_of(bytes);
    let start = footer.catalog_offset as usize;
    let mut catalog: Value = serde_json::from_slice(&bytes[start..bytes.len() - 32]).unwrap();
    edit(&mut catalog);
    reframe(&bytes[..start], &serde_json::to_vec(&catalog).unwrap())
}

fn reframe(data: &[u8], catalog: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    out.extend_from_slice(catalog);
    let f = Footer {
        catalog_offset: data.len() as u64,
        catalog_len: catalog.len() as u64,
        catalog_xxh3: checksum(catalog),
    };
    out.extend_from_slice(&f.to_bytes());
    out
}

/// Rewrite adapter `i`'s record with `edit`: the new record is appended to the data section and
/// the index points to it with a correct checksum, so that only the lie remains.
fn with_record(bytes: &[u8], i: usize, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let footer = footer_of(bytes);
    let start = footer.catalog_offset as usize;
    let mut catalog: Value = serde_json::from_slice(&bytes[start..bytes.len() - 32]).unwrap();
    let entry = &mut catalog["adapters"][i];
    let (off, len) = (entry["offset"].as_u64().unwrap() as usize, entry["length"].as_u64().unwrap() as usize);
    let mut record: Value = serde_json::from_slice(&bytes[off..off + len]).unwrap();
    edit(&mut record);
    let text = serde_json::to_vec(&record).unwrap();
    entry["offset"] = Value::from(start as u64);
    entry["length"] = Value::from(text.len() as u64);
    entry["xxh3"] = Value::from(hash_hex(checksum(&text)));
    let mut data = bytes[..start].to_vec();
    data.extend_from_slice(&text);
    reframe(&data, &serde_json::to_vec(&catalog).unwrap())
}

fn open_bytes(bytes: Vec<u8>) -> crate::Result<Bundle> {
    Bundle::from_bytes(Path::new("t.dl"), bytes)
}

/// Open and validate every adapter record.
fn open_all(bytes: Vec<u8>) -> crate::Result<Bundle> {
    let bundle = open_bytes(bytes)?;
    bundle.adapters()?;
    Ok(bundle)
}

fn format_error(bytes: Vec<u8>, needle: &str) {
    match open_all(bytes) {
        Err(Error::Format { message, .. }) => {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}")
        }
        Err(other) => panic!("expected a format error with {needle:?}, got {other}"),
        Ok(_) => panic!("expected a format error with {needle:?}, the bundle opened"),
    }
}

fn first_tensor(c: &mut Value) -> &mut Value {
    &mut c["tensors"][0]
}

#[test]
fn every_truncation_is_refused() {
    let bytes = sample_bytes();
    for cut in 0..bytes.len() {
        let err = open_bytes(bytes[..cut].to_vec()).unwrap_err();
        assert!(matches!(err, Error::Format { .. } | Error::Checksum { .. }), "cut {cut}: {err}");
    }
}

#[test]
fn foreign_files_and_versions_are_refused() {
    format_error(b"PK\x03\x04 a zip file, not a bundle".to_vec(), "not a denselora bundle");
    format_error(Vec::new(), "not a denselora bundle");
    let mut bytes = sample_bytes();
    bytes[8] = 2;
    format_error(bytes, "version 2");
}

#[test]
fn lying_catalogs_are_refused() {
    let bytes = sample_bytes();
    let len = bytes.len() as u64;
    format_error(
        with_record(&bytes, 0, |c| first_tensor(c)["offset"] = Value::from((len * 2 / 64 + 1) * 64)),
        "past the data section",
    );
    format_error(
        with_record(&bytes, 0, |c| first_tensor(c)["offset"] = Value::from(u64::MAX - 63)),
        "past the data section",
    );
    format_error(with_record(&bytes, 0, |c| first_tensor(c)["offset"] = Value::from(65)), "aligned");
    format_error(with_record(&bytes, 0, |c| first_tensor(c)["offset"] = Value::from(0)), "aligned");
    format_error(
        with_record(&bytes, 0, |c| {
            let second = c["tensors"][1]["offset"].as_u64().unwrap();
            first_tensor(c)["offset"] = Value::from(second + 64);
        }),
        "overlaps",
    );
    format_error(
        with_record(&bytes, 0, |c| first_tensor(c)["shape"] = serde_json::json!([u64::MAX, u64::MAX])),
        "larger than the file",
    );
    format_error(
        with_record(&bytes, 0, |c| first_tensor(c)["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40])),
        "larger than the file",
    );
    format_error(with_record(&bytes, 0, |c| first_tensor(c)["shape"] = serde_json::json!([0, 4])), "zero dimension");
    format_error(
        with_record(&bytes, 0, |c| first_tensor(c)["shape"] = serde_json::json!([1, 1, 1, 1, 1, 1, 1, 1, 1])),
        "dimensions",
    );
    format_error(with_record(&bytes, 0, |c| first_tensor(c)["length"] = Value::from(4)), "does not match shape");
    format_error(with_record(&bytes, 0, |c| first_tensor(c)["dtype"] = Value::from("I64")), "unknown dtype");
    format_error(with_record(&bytes, 0, |c| first_tensor(c)["xxh3"] = Value::from("xyz")), "16 hex digits");
    format_error(
        with_index(&bytes, |c| {
            let first = c["adapters"][0].clone();
            c["adapters"][1]["name"] = first["name"].clone();
        }),
        "twice",
    );
    format_error(
        with_record(&bytes, 0, |c| {
            let t = first_tensor(c).clone();
            c["tensors"].as_array_mut().unwrap().push(t);
        }),
        "named twice",
    );
    format_error(with_index(&bytes, |c| c["adapters"][0]["name"] = Value::from("../evil")), "'/'");
    format_error(with_index(&bytes, |c| c["format_version"] = Value::from(7)), "format_version");
    format_error(with_index(&bytes, |c| c["format"] = Value::from("other")), "catalog format");
    format_error(
        with_record(&bytes, 0, |c| {
            c["tensors"].as_array_mut().unwrap().pop();
        }),
        "missing",
    );
    format_error(with_index(&bytes, |c| c["adapters"] = Value::from(3)), "invalid catalog JSON");
}

#[test]
fn catalog_size_cap_is_checked_before_reading() {
    let mut bytes = sample_bytes();
    let n = bytes.len();
    let mut f = footer_of(&bytes);
    f.catalog_len = 1 << 40;
    bytes[n - 32..].copy_from_slice(&f.to_bytes());
    format_error(bytes, "exceeds the limit");
}

#[test]
fn flipped_blob_bytes_fail_verify_and_fetch_but_not_open() {
    let bytes = sample_bytes();
    let bundle = open_bytes(bytes.clone()).unwrap();
    let t = &bundle.adapters().unwrap()[0].tensors[0];
    let (offset, tname) = (t.offset, t.name.clone());
    let mut bad = bytes.clone();
    bad[offset + 3] ^= 0x10;
    let bundle = open_bytes(bad).unwrap();
    let err = bundle.verify().unwrap_err();
    assert!(matches!(err, Error::Checksum { .. }), "{err}");
    assert!(err.to_string().contains(&tname), "{err}");
    assert!(matches!(bundle.tensors("a", true), Err(Error::Checksum { .. })));
    assert!(bundle.tensors("a", false).is_ok(), "an unchecked fetch is the caller's choice");
    // A padding byte.
    let bytes = padded_bytes();
    let bundle = open_bytes(bytes.clone()).unwrap();
    let mut bad = bytes.clone();
    // A byte right after a blob whose next neighbour is another blob (not the record).
    let adapters = bundle.adapters().unwrap();
    let starts: HashSet<usize> = adapters.iter().flat_map(|a| a.tensors.iter().map(|t| t.offset)).collect();
    let pad = adapters
        .iter()
        .flat_map(|a| a.tensors.iter())
        .map(|t| t.offset + t.length)
        .find(|&end| end % 64 != 0 && starts.contains(&(end / 64 * 64 + 64)))
        .expect("the F16 sample has padding between blobs");
    bad[pad] = 1;
    let err = open_bytes(bad).unwrap().verify().unwrap_err();
    assert!(err.to_string().contains("padding"), "{err}");
}

#[test]
fn every_single_byte_flip_is_caught() {
    for bytes in [sample_bytes(), padded_bytes()] {
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            match open_bytes(bad) {
                Err(Error::Format { .. } | Error::Checksum { .. }) => {}
                Err(other) => panic!("byte {i}: unexpected error kind {other}"),
                Ok(bundle) => assert!(bundle.verify().is_err(), "byte {i}: flip went unnoticed"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// Random damage (byte writes, truncation, appended junk) never panics and is always noticed.
    #[test]
    fn mutated_bundles_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                                   cut in prop::option::of(any::<prop::sample::Index>()),
                                   junk in prop::collection::vec(any::<u8>(), 0..4)) {
        let original = sample_bytes_cached();
        let mut bytes = original.clone();
        for (at, value) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        bytes.extend_from_slice(&junk);
        let changed = bytes != *original;
        match open_bytes(bytes) {
            Err(Error::Format { .. } | Error::Checksum { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error kind {}", other),
            Ok(bundle) => {
                let verified = bundle.verify();
                prop_assert!(!changed || verified.is_err(), "damage went unnoticed");
                for name in bundle.names() {
                    let _ = bundle.tensors(name, true);
                }
            }
        }
    }

    /// Arbitrary tensors round-trip bit for bit through pack and open, with dedup of repeats.
    #[test]
    fn random_adapters_round_trip(values in prop::collection::vec(any::<f32>(), 32), repeat in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut a = sample_adapter();
        let key = encoder_key("q_proj");
        a.tensors.insert(key.clone(), Tensor::from_f32(DType::F32, vec![4, 8], &values));
        let b = if repeat { a.clone() } else { scaled(&a, 0.5) };
        let path = dir.path().join("p.dl");
        pack(&path, &[memory_entry("a", &a), memory_entry("b", &b)], &PackOptions::default(), &mut no_progress()).unwrap();
        let bundle = Bundle::open(&path).unwrap();
        bundle.verify().unwrap();
        prop_assert_eq!(bundle.tensor_map("a").unwrap()[&key].data, &a.tensors[&key].data[..]);
        let stats = bundle.stats().unwrap();
        if repeat {
            prop_assert_eq!(stats.stored_bytes * 2, stats.logical_bytes);
        }
    }
}

fn sample_bytes_cached() -> &'static Vec<u8> {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(sample_bytes)
}

#[test]
fn open_does_not_need_tensor_bytes_to_be_valid() {
    // Zeroing every blob keeps the file openable (opening never reads tensor data) while verify fails.
    let bytes = sample_bytes();
    let bundle = open_bytes(bytes.clone()).unwrap();
    let mut zeroed = bytes.clone();
    for a in bundle.adapters().unwrap() {
        for t in &a.tensors {
            zeroed[t.offset..t.offset + t.length].fill(0);
        }
    }
    let damaged = open_bytes(zeroed).unwrap();
    assert_eq!(damaged.len(), 3);
    assert!(damaged.verify().is_err());
    let _ = BTreeMap::<String, String>::new();
}
