//! Opening a bundle: memory-map the file, read the footer and the catalog, and validate every
//! promise the catalog makes before any tensor is handed out. Opening reads only the preamble,
//! the footer and the catalog; tensor bytes are touched when a tensor is fetched or verified.
//!
//! Fetching an adapter's tensors checks their blobs' checksums the first time each blob is handed
//! out (xxh3 runs at memory speed, and the caller is about to read those bytes anyway); `verify`
//! checks every blob and every padding byte at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use memmap2::Mmap;
use serde_json::Value;

use super::format::*;
use crate::adapter::{
    validate_layout, ConfigMap, GroupLayout, FORMAT_VERSION as ADAPTER_FORMAT_VERSION,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::TensorRef;

/// A validated tensor record.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub length: usize,
    pub xxh3: u64,
    pub converted_from: Option<DType>,
    /// Index of the (possibly shared) blob in `Bundle::blobs`.
    pub blob: usize,
}

/// A validated adapter record; tensors are sorted by name.
#[derive(Debug, Clone)]
pub struct AdapterEntry {
    pub name: String,
    pub config: ConfigMap,
    pub tensors: Vec<TensorEntry>,
    pub groups: Vec<GroupLayout>,
}

impl AdapterEntry {
    /// Bytes this adapter's tensors occupy, counting shared blobs fully.
    pub fn logical_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.length as u64).sum()
    }
}

/// One distinct stored blob (several tensors may share it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    pub offset: usize,
    pub length: usize,
    pub xxh3: u64,
}

enum Storage {
    Map(Mmap),
    Bytes(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Map(m) => m,
            Storage::Bytes(v) => v,
        }
    }
}

const UNCHECKED: u8 = 0;
const GOOD: u8 = 1;
const BAD: u8 = 2;

/// An open bundle. Cheap to share between threads; tensor views borrow from it.
pub struct Bundle {
    path: PathBuf,
    storage: Storage,
    adapters: Vec<AdapterEntry>,
    index: HashMap<String, usize>,
    blobs: Vec<Blob>,
    /// Per blob: unchecked, verified good, or found bad.
    blob_state: Vec<AtomicU8>,
    catalog_offset: usize,
}

/// Sizes for `inspect`: how much deduplication saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleStats {
    pub adapters: usize,
    pub tensors: usize,
    pub blobs: usize,
    /// Sum of every tensor's length, as if nothing were shared.
    pub logical_bytes: u64,
    /// Sum of distinct blobs' lengths.
    pub stored_bytes: u64,
    pub file_bytes: u64,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("path", &self.path)
            .field("adapters", &self.adapters.len())
            .finish()
    }
}

impl Bundle {
    /// Open and validate the bundle at `path` (memory-mapped; no tensor data is read).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::IsADirectory,
                    "a directory, not a bundle file",
                ),
            ));
        }
        // Mapping an empty file fails on some platforms; such a file is no bundle anyway.
        if meta.len() < PREAMBLE_LEN + FOOTER_LEN {
            let mut head = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(&file, PREAMBLE_LEN + FOOTER_LEN),
                &mut head,
            )
            .map_err(|e| Error::io(path, e))?;
            return Self::from_storage(path, Storage::Bytes(head));
        }
        // SAFETY: the map is read-only. Writers in this library never modify a bundle in place
        // (they write a new file and rename it), so the mapped inode does not change under us;
        // truncation by another program would raise SIGBUS, as with any memory-mapped reader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_storage(path, Storage::Map(map))
    }

    /// Validate a bundle held in memory (`path` only names it in errors).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::from_storage(path, Storage::Bytes(bytes))
    }

    fn from_storage(path: &Path, storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        let fail = |m: String| Error::format(path, m);
        if bytes.len() < MAGIC.len() || bytes[..8] != MAGIC {
            return Err(fail(
                "not a denselora bundle (the file does not start with the bundle magic bytes)"
                    .into(),
            ));
        }
        if bytes.len() < (PREAMBLE_LEN + FOOTER_LEN) as usize {
            return Err(fail(format!(
                "truncated bundle: {} bytes, less than preamble and footer",
                bytes.len()
            )));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(fail(format!(
                "bundle format version {version} is not supported (this library reads version {FORMAT_VERSION})"
            )));
        }
        if bytes[12..PREAMBLE_LEN as usize].iter().any(|&b| b != 0) {
            return Err(fail("damaged preamble: reserved bytes are not zero".into()));
        }
        let file_len = bytes.len() as u64;
        let footer_at = (file_len - FOOTER_LEN) as usize;
        let footer = Footer::from_bytes(bytes[footer_at..].try_into().expect("footer length"))
            .ok_or_else(|| {
                fail("truncated or damaged bundle: the footer magic bytes are missing".into())
            })?;
        if footer.catalog_len > MAX_CATALOG_LEN {
            return Err(fail(format!(
                "catalog length {} exceeds the limit of {MAX_CATALOG_LEN} bytes",
                footer.catalog_len
            )));
        }
        let catalog_end = footer.catalog_offset.checked_add(footer.catalog_len);
        if footer.catalog_offset < PREAMBLE_LEN || catalog_end != Some(footer_at as u64) {
            return Err(fail(format!(
                "damaged footer: catalog at {}..+{} does not end where the footer starts ({footer_at})",
                footer.catalog_offset, footer.catalog_len
            )));
        }
        let catalog_offset = footer.catalog_offset as usize;
        let catalog_bytes = &bytes[catalog_offset..footer_at];
        if checksum(catalog_bytes) != footer.catalog_xxh3 {
            return Err(Error::Checksum {
                path: path.to_path_buf(),
                what: "the catalog".into(),
            });
        }
        let catalog: Catalog = serde_json::from_slice(catalog_bytes)
            .map_err(|e| fail(format!("invalid catalog JSON: {e}")))?;
        let (adapters, blobs) = validate_catalog(path, catalog, catalog_offset, bytes)?;
        let index = adapters
            .iter()
            .enumerate()
            .map(|(i, a)| (a.name.clone(), i))
            .collect();
        let blob_state = (0..blobs.len()).map(|_| AtomicU8::new(UNCHECKED)).collect();
        Ok(Bundle {
            path: path.to_path_buf(),
            storage,
            adapters,
            index,
            blobs,
            blob_state,
            catalog_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adapter names in stored order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.adapters.iter().map(|a| a.name.as_str())
    }

    pub fn adapters(&self) -> &[AdapterEntry] {
        &self.adapters
    }

    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn adapter(&self, name: &str) -> Result<&AdapterEntry> {
        self.index
            .get(name)
            .map(|&i| &self.adapters[i])
            .ok_or_else(|| {
                let mut known: Vec<&str> = self.names().take(5).collect();
                if self.adapters.len() > 5 {
                    known.push("...");
                }
                Error::argument(
                    "adapter_name",
                    crate::error::ArgumentKind::Value,
                    format!(
                        "{}: no adapter {name:?} in this bundle (it holds {})",
                        self.path.display(),
                        known.join(", ")
                    ),
                )
            })
    }

    /// The bytes of a tensor, without checking them.
    pub fn raw_bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.storage.bytes()[t.offset..t.offset + t.length]
    }

    /// A pointer to the start of the file's bytes (for the binding's zero-copy views).
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    fn check_blob(&self, blob: usize, who: impl FnOnce() -> String) -> Result<()> {
        match self.blob_state[blob].load(Ordering::Acquire) {
            GOOD => Ok(()),
            BAD => Err(Error::Checksum {
                path: self.path.clone(),
                what: who(),
            }),
            _ => {
                let b = self.blobs[blob];
                let ok = checksum(&self.storage.bytes()[b.offset..b.offset + b.length]) == b.xxh3;
                self.blob_state[blob].store(if ok { GOOD } else { BAD }, Ordering::Release);
                if ok {
                    Ok(())
                } else {
                    Err(Error::Checksum {
                        path: self.path.clone(),
                        what: who(),
                    })
                }
            }
        }
    }

    /// An adapter's tensors as views of the file. With `verify`, each blob's checksum is checked
    /// the first time it is handed out by this `Bundle`.
    pub fn tensors(&self, name: &str, verify: bool) -> Result<Vec<(&TensorEntry, TensorRef<'_>)>> {
        let adapter = self.adapter(name)?;
        let mut out = Vec::with_capacity(adapter.tensors.len());
        for t in &adapter.tensors {
            if verify {
                self.check_blob(t.blob, || {
                    format!("adapter {:?}, tensor {:?}", adapter.name, t.name)
                })?;
            }
            out.push((
                t,
                TensorRef {
                    dtype: t.dtype,
                    shape: &t.shape,
                    data: self.raw_bytes(t),
                },
            ));
        }
        Ok(out)
    }

    /// An adapter's tensors by name (checked), for writers and algebra.
    pub fn tensor_map(&self, name: &str) -> Result<BTreeMap<String, TensorRef<'_>>> {
        Ok(self
            .tensors(name, true)?
            .into_iter()
            .map(|(t, r)| (t.name.clone(), r))
            .collect())
    }

    /// Check every blob's checksum and that every byte between blobs is zero padding. The error
    /// names every damaged tensor (up to a few dozen).
    pub fn verify(&self) -> Result<()> {
        self.verify_with(&mut |_, _| Ok(()))
    }

    /// `verify`, calling `progress(bytes_done, bytes_total)` as blobs are checked.
    pub fn verify_with(&self, progress: &mut dyn FnMut(u64, u64) -> Result<()>) -> Result<()> {
        let bytes = self.storage.bytes();
        let total: u64 = self.blobs.iter().map(|b| b.length as u64).sum();
        let mut done = 0u64;
        let mut bad_blobs = HashSet::new();
        let mut last_report = 0u64;
        for (i, b) in self.blobs.iter().enumerate() {
            let ok = checksum(&bytes[b.offset..b.offset + b.length]) == b.xxh3;
            self.blob_state[i].store(if ok { GOOD } else { BAD }, Ordering::Release);
            if !ok {
                bad_blobs.insert(i);
            }
            done += b.length as u64;
            if done - last_report >= 1 << 24 || i + 1 == self.blobs.len() {
                progress(done, total)?;
                last_report = done;
            }
        }
        if !bad_blobs.is_empty() {
            let mut what: Vec<String> = Vec::new();
            for a in &self.adapters {
                for t in a.tensors.iter().filter(|t| bad_blobs.contains(&t.blob)) {
                    what.push(format!("{}/{}", a.name, t.name));
                }
            }
            let count = what.len();
            what.truncate(32);
            let more = if count > 32 {
                format!(" and {} more", count - 32)
            } else {
                String::new()
            };
            return Err(Error::Checksum {
                path: self.path.clone(),
                what: format!("{count} tensor(s): {}{more}", what.join(", ")),
            });
        }
        // Padding: everything between the preamble, the blobs and the catalog must be zero.
        let mut pos = PREAMBLE_LEN as usize;
        for b in self
            .blobs
            .iter()
            .map(|b| (b.offset, b.offset + b.length))
            .chain([(self.catalog_offset, self.catalog_offset)])
        {
            if let Some(at) = bytes[pos..b.0].iter().position(|&x| x != 0) {
                return Err(Error::Checksum {
                    path: self.path.clone(),
                    what: format!("padding (non-zero byte at offset {})", pos + at),
                });
            }
            pos = b.1;
        }
        Ok(())
    }

    pub fn stats(&self) -> BundleStats {
        let logical_bytes = self.adapters.iter().map(AdapterEntry::logical_bytes).sum();
        BundleStats {
            adapters: self.adapters.len(),
            tensors: self.adapters.iter().map(|a| a.tensors.len()).sum(),
            blobs: self.blobs.len(),
            logical_bytes,
            stored_bytes: self.blobs.iter().map(|b| b.length as u64).sum(),
            file_bytes: self.storage.bytes().len() as u64,
        }
    }
}

fn parse_dtype(text: &str) -> Option<DType> {
    // The catalog spells dtypes exactly as written ("F32", "F16", "BF16"); nothing looser.
    match text {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        _ => None,
    }
}

/// Check every catalog promise against the file; returns the adapters and the distinct blobs.
fn validate_catalog(
    path: &Path,
    catalog: Catalog,
    catalog_offset: usize,
    bytes: &[u8],
) -> Result<(Vec<AdapterEntry>, Vec<Blob>)> {
    let fail = |m: String| Error::format(path, m);
    if catalog.format != FORMAT_NAME {
        return Err(fail(format!(
            "catalog format is {:?}, expected {FORMAT_NAME:?}",
            catalog.format
        )));
    }
    if catalog.format_version != FORMAT_VERSION {
        return Err(fail(format!(
            "catalog format_version {} disagrees with the preamble's {FORMAT_VERSION}",
            catalog.format_version
        )));
    }
    let mut names = HashSet::new();
    // offset -> (length, hash, blob index)
    let mut by_offset: BTreeMap<usize, (usize, u64, String)> = BTreeMap::new();
    let mut pending: Vec<AdapterEntry> = Vec::with_capacity(catalog.adapters.len());
    for adapter in catalog.adapters {
        let name = adapter.name;
        check_adapter_name(&name).map_err(|m| fail(format!("catalog: {m}")))?;
        if !names.insert(name.clone()) {
            return Err(fail(format!("catalog names adapter {name:?} twice")));
        }
        let ctx = |m: String| fail(format!("adapter {name:?}: {m}"));
        match adapter.config.get("format_version").and_then(Value::as_u64) {
            Some(v) if v <= ADAPTER_FORMAT_VERSION => {}
            Some(v) => {
                return Err(ctx(format!(
                    "adapter format_version {v} is newer than this library reads"
                )))
            }
            None => return Err(ctx("config has no integer \"format_version\"".into())),
        }
        let mut tensor_names = HashSet::new();
        let mut tensors = Vec::with_capacity(adapter.tensors.len());
        for t in adapter.tensors {
            let tctx = |m: String| fail(format!("adapter {name:?}, tensor {:?}: {m}", t.name));
            if t.name.is_empty() || t.name.len() > MAX_NAME_LEN {
                return Err(tctx("tensor name is empty or too long".into()));
            }
            if !tensor_names.insert(t.name.clone()) {
                return Err(tctx("named twice".into()));
            }
            let dtype = parse_dtype(&t.dtype)
                .ok_or_else(|| tctx(format!("unknown dtype {:?}", t.dtype)))?;
            let converted_from = match &t.converted_from {
                None => None,
                Some(d) => Some(
                    parse_dtype(d)
                        .ok_or_else(|| tctx(format!("unknown converted_from dtype {d:?}")))?,
                ),
            };
            if t.shape.is_empty() || t.shape.len() > MAX_NDIM {
                return Err(tctx(format!(
                    "shape {:?} must have 1 to {MAX_NDIM} dimensions",
                    t.shape
                )));
            }
            let mut numel: u64 = 1;
            let mut shape = Vec::with_capacity(t.shape.len());
            for &d in &t.shape {
                if d == 0 {
                    return Err(tctx(format!("shape {:?} has a zero dimension", t.shape)));
                }
                numel = numel
                    .checked_mul(d)
                    .filter(|&n| n <= bytes.len() as u64)
                    .ok_or_else(|| tctx(format!("shape {:?} is larger than the file", t.shape)))?;
                shape.push(usize::try_from(d).map_err(|_| tctx("dimension overflows".into()))?);
            }
            let expected = numel * dtype.size() as u64;
            if t.length != expected {
                return Err(tctx(format!(
                    "length {} does not match shape {:?} of {dtype} ({expected} bytes)",
                    t.length, t.shape
                )));
            }
            if t.offset % ALIGN != 0 || t.offset < PREAMBLE_LEN {
                return Err(tctx(format!(
                    "offset {} is not a 64-byte aligned position after the preamble",
                    t.offset
                )));
            }
            let end = t
                .offset
                .checked_add(t.length)
                .filter(|&e| e <= catalog_offset as u64)
                .ok_or_else(|| {
                    tctx(format!(
                        "bytes {}..+{} run past the data section (ends at {catalog_offset})",
                        t.offset, t.length
                    ))
                })?;
            let _ = end;
            let hash = parse_hash(&t.xxh3)
                .ok_or_else(|| tctx(format!("checksum {:?} is not 16 hex digits", t.xxh3)))?;
            let (offset, length) = (t.offset as usize, t.length as usize);
            match by_offset.get(&offset) {
                Some((len, h, owner)) if (*len, *h) != (length, hash) => {
                    return Err(tctx(format!("overlaps tensor {owner} at offset {offset} with a different length or checksum")));
                }
                Some(_) => {}
                None => {
                    by_offset.insert(offset, (length, hash, format!("{name}/{}", t.name)));
                }
            }
            tensors.push(TensorEntry {
                name: t.name,
                dtype,
                shape,
                offset,
                length,
                xxh3: hash,
                converted_from,
                blob: 0,
            });
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        pending.push(AdapterEntry {
            name,
            config: adapter.config,
            tensors,
            groups: Vec::new(),
        });
    }
    // Distinct blobs must not overlap.
    let mut blobs = Vec::with_capacity(by_offset.len());
    let mut blob_of = HashMap::with_capacity(by_offset.len());
    let mut prev: Option<(usize, usize, &String)> = None;
    for (&offset, (length, hash, owner)) in &by_offset {
        if let Some((p_off, p_end, p_owner)) = prev {
            if offset < p_end {
                return Err(fail(format!(
                    "tensor {owner} at {offset} overlaps tensor {p_owner} at {p_off}..{p_end}"
                )));
            }
        }
        prev = Some((offset, offset + length, owner));
        blob_of.insert(offset, blobs.len());
        blobs.push(Blob {
            offset,
            length: *length,
            xxh3: *hash,
        });
    }
    for adapter in &mut pending {
        for t in &mut adapter.tensors {
            t.blob = blob_of[&t.offset];
        }
        let views: BTreeMap<String, TensorRef<'_>> = adapter
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TensorRef {
                        dtype: t.dtype,
                        shape: &t.shape,
                        data: &bytes[t.offset..t.offset + t.length],
                    },
                )
            })
            .collect();
        adapter.groups = validate_layout(
            &adapter.config,
            &views,
            &format!("adapter {:?}", adapter.name),
        )
        .map_err(|e| match e {
            Error::Incompatible { context, message } => {
                Error::format(path, format!("{context}: {message}"))
            }
            other => other,
        })?;
    }
    Ok((pending, blobs))
}
