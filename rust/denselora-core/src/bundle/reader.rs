//! Opening a bundle: memory-map the file, read the footer and the catalog (the index of adapter
//! records), and validate every promise they make before anything is handed out. Opening reads
//! only the preamble, the footer and the catalog; each adapter's record is checksummed, parsed and
//! validated the first time that adapter is used, and its tensor bytes are touched only when its
//! tensors are fetched or verified.
//!
//! Fetching an adapter's tensors checks their blobs' checksums the first time each blob is handed
//! out (xxh3 runs at memory speed, and the caller is about to read those bytes anyway); `verify`
//! checks every record, every blob and every padding byte at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use memmap2::Mmap;

use super::format::*;
use crate::adapter::{check_format_version, validate_layout, ConfigMap, GroupLayout};
use crate::dtype::DType;
use crate::error::{ArgumentKind, Error, Result};
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

/// Where one adapter's record lies (validated at open).
#[derive(Debug, Clone)]
struct RecordLocation {
    name: String,
    offset: usize,
    length: usize,
    xxh3: u64,
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

/// An open bundle. Shareable between threads; tensor views borrow from it.
pub struct Bundle {
    path: PathBuf,
    storage: Storage,
    records: Vec<RecordLocation>,
    index: HashMap<String, usize>,
    /// Record byte ranges sorted by offset, for checking that no blob overlaps a record.
    record_ranges: Vec<(usize, usize)>,
    loaded: Vec<OnceLock<AdapterEntry>>,
    /// Blob offset -> checksum matched; filled as blobs are checked.
    checked: Mutex<HashMap<usize, bool>>,
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
        f.debug_struct("Bundle").field("path", &self.path).field("adapters", &self.records.len()).finish()
    }
}

impl Bundle {
    /// Open and validate the bundle at `path` (memory-mapped; no tensor data is read).
    pub fn open(path: &Path) -> Result<Self> {
        // Checked before opening: opening a FIFO would block until a writer appears.
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_dir() && !meta.is_file() {
            return Err(Error::format(path, "not a regular file, so not a bundle"));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::IsADirectory, "a directory, not a bundle file"),
            ));
        }
        // Mapping an empty file fails on some platforms; such a file is no bundle anyway.
        if meta.len() < PREAMBLE_LEN + FOOTER_LEN {
            let mut head = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(&file, PREAMBLE_LEN + FOOTER_LEN), &mut head)
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
            return Err(fail("not a denselora bundle (the file does not start with the bundle magic bytes)".into()));
        }
        if bytes.len() < (PREAMBLE_LEN + FOOTER_LEN) as usize {
            return Err(fail(format!("truncated bundle: {} bytes, less than preamble and footer", bytes.len())));
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
            .ok_or_else(|| fail("truncated or damaged bundle: the footer magic bytes are missing".into()))?;
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
            return Err(Error::Checksum { path: path.to_path_buf(), what: "the catalog".into() });
        }
        let catalog: Catalog =
            serde_json::from_slice(catalog_bytes).map_err(|e| fail(format!("invalid catalog JSON: {e}")))?;
        if catalog.format != FORMAT_NAME {
            return Err(fail(format!("catalog format is {:?}, expected {FORMAT_NAME:?}", catalog.format)));
        }
        if catalog.format_version != FORMAT_VERSION {
            return Err(fail(format!(
                "catalog format_version {} disagrees with the preamble's {FORMAT_VERSION}",
                catalog.format_version
            )));
        }
        let mut records = Vec::with_capacity(catalog.adapters.len());
        let mut index = HashMap::with_capacity(catalog.adapters.len());
        for entry in catalog.adapters {
            let name = entry.name;
            check_adapter_name(&name).map_err(|m| fail(format!("catalog: {m}")))?;
            if index.contains_key(&name) {
                return Err(fail(format!("catalog names adapter {name:?} twice")));
            }
            let end = entry.offset.checked_add(entry.length);
            if entry.offset < PREAMBLE_LEN
                || entry.length == 0
                || entry.length > MAX_RECORD_LEN
                || end.is_none_or(|e| e > catalog_offset as u64)
            {
                return Err(fail(format!(
                    "adapter {name:?}: record at {}..+{} lies outside the data section (64..{catalog_offset}) or exceeds {MAX_RECORD_LEN} bytes",
                    entry.offset, entry.length
                )));
            }
            let xxh3 = parse_hash(&entry.xxh3).ok_or_else(|| {
                fail(format!("adapter {name:?}: record checksum {:?} is not 16 hex digits", entry.xxh3))
            })?;
            index.insert(name.clone(), records.len());
            records.push(RecordLocation { name, offset: entry.offset as usize, length: entry.length as usize, xxh3 });
        }
        let mut record_ranges: Vec<(usize, usize, usize)> =
            records.iter().enumerate().map(|(i, r)| (r.offset, r.offset + r.length, i)).collect();
        record_ranges.sort_unstable();
        for pair in record_ranges.windows(2) {
            if pair[1].0 < pair[0].1 {
                return Err(fail(format!(
                    "the records of adapters {:?} and {:?} overlap",
                    records[pair[0].2].name, records[pair[1].2].name
                )));
            }
        }
        let loaded = (0..records.len()).map(|_| OnceLock::new()).collect();
        Ok(Bundle {
            path: path.to_path_buf(),
            storage,
            records,
            index,
            record_ranges: record_ranges.into_iter().map(|(s, e, _)| (s, e)).collect(),
            loaded,
            checked: Mutex::new(HashMap::new()),
            catalog_offset,
        })
    }

    /// Open the file now at this bundle's path: the entries a writer added since this handle was
    /// opened appear; this handle and the views it handed out keep the file they mapped.
    pub fn reopen(&self) -> Result<Bundle> {
        Bundle::open(&self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adapter names in stored order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.records.iter().map(|r| r.name.as_str())
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The validated record of adapter `name` (checked and parsed on first use).
    pub fn adapter(&self, name: &str) -> Result<&AdapterEntry> {
        let &i = self.index.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = self.names().take(5).collect();
            if self.records.len() > 5 {
                known.push("...");
            }
            Error::argument(
                "adapter_name",
                ArgumentKind::Value,
                format!("{}: no adapter {name:?} in this bundle (it holds {})", self.path.display(), known.join(", ")),
            )
        })?;
        self.adapter_at(i)
    }

    fn adapter_at(&self, i: usize) -> Result<&AdapterEntry> {
        if let Some(entry) = self.loaded[i].get() {
            return Ok(entry);
        }
        let entry = self.load_record(&self.records[i])?;
        // Another thread may have won the race with an identical entry; either is fine.
        let _ = self.loaded[i].set(entry);
        Ok(self.loaded[i].get().expect("just set"))
    }

    /// Every adapter, validated (parses all records).
    pub fn adapters(&self) -> Result<Vec<&AdapterEntry>> {
        (0..self.records.len()).map(|i| self.adapter_at(i)).collect()
    }

    fn overlaps_record(&self, start: usize, end: usize) -> bool {
        // The last record starting before `end` is the only one that can overlap [start, end).
        let k = self.record_ranges.partition_point(|&(s, _)| s < end);
        k > 0 && self.record_ranges[k - 1].1 > start
    }

    fn load_record(&self, loc: &RecordLocation) -> Result<AdapterEntry> {
        let path = &self.path;
        let name = &loc.name;
        let bytes = self.storage.bytes();
        let record_bytes = &bytes[loc.offset..loc.offset + loc.length];
        if checksum(record_bytes) != loc.xxh3 {
            return Err(Error::Checksum { path: path.clone(), what: format!("the record of adapter {name:?}") });
        }
        let fail = |m: String| Error::format(path, format!("adapter {name:?}: {m}"));
        let record: AdapterRecord =
            serde_json::from_slice(record_bytes).map_err(|e| fail(format!("invalid record JSON: {e}")))?;
        check_format_version(&record.config).map_err(|m| fail(format!("adapter {m}")))?;
        let mut tensor_names = HashSet::new();
        let mut tensors = Vec::with_capacity(record.tensors.len());
        for t in &record.tensors {
            let tail = validate_tensor(t, self.catalog_offset, bytes.len() as u64)
                .map_err(|m| fail(format!("tensor {:?}: {m}", t.name)))?;
            if !tensor_names.insert(t.name.as_str()) {
                return Err(fail(format!("tensor {:?} is named twice", t.name)));
            }
            if self.overlaps_record(tail.offset, tail.offset + tail.length) {
                return Err(fail(format!("tensor {:?}: its bytes overlap an adapter record", t.name)));
            }
            tensors.push(tail);
        }
        distinct_blobs(tensors.iter().map(|t| BlobUse {
            offset: t.offset,
            length: t.length,
            xxh3: t.xxh3,
            owner: format!("{:?}", t.name),
        }))
        .map_err(fail)?;
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let views: BTreeMap<String, TensorRef<'_>> = tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TensorRef { dtype: t.dtype, shape: &t.shape, data: &bytes[t.offset..t.offset + t.length] },
                )
            })
            .collect();
        let groups = validate_layout(&record.config, &views, &format!("adapter {name:?}")).map_err(|e| match e {
            Error::Incompatible { context, message } => Error::format(path, format!("{context}: {message}")),
            other => other,
        })?;
        Ok(AdapterEntry { name: name.clone(), config: record.config, tensors, groups })
    }

    /// The bytes of a tensor, without checking them.
    pub fn raw_bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.storage.bytes()[t.offset..t.offset + t.length]
    }

    /// The whole file's bytes (the binding builds zero-copy views from them).
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    fn blob_ok(&self, t: &TensorEntry) -> bool {
        if let Some(&ok) = self.checked.lock().expect("checksum cache").get(&t.offset) {
            return ok;
        }
        let ok = checksum(self.raw_bytes(t)) == t.xxh3;
        self.checked.lock().expect("checksum cache").insert(t.offset, ok);
        ok
    }

    /// An adapter's tensors as views of the file. With `verify`, each blob's checksum is checked
    /// the first time this `Bundle` hands it out.
    pub fn tensors(&self, name: &str, verify: bool) -> Result<Vec<(&TensorEntry, TensorRef<'_>)>> {
        let adapter = self.adapter(name)?;
        let mut out = Vec::with_capacity(adapter.tensors.len());
        for t in &adapter.tensors {
            if verify && !self.blob_ok(t) {
                return Err(Error::Checksum {
                    path: self.path.clone(),
                    what: format!("adapter {:?}, tensor {:?}", adapter.name, t.name),
                });
            }
            out.push((t, TensorRef { dtype: t.dtype, shape: &t.shape, data: self.raw_bytes(t) }));
        }
        Ok(out)
    }

    /// An adapter's tensors by name (checked), for writers and algebra.
    pub fn tensor_map(&self, name: &str) -> Result<BTreeMap<String, TensorRef<'_>>> {
        Ok(self.tensors(name, true)?.into_iter().map(|(t, r)| (t.name.clone(), r)).collect())
    }

    /// Distinct blobs of all adapters (owners named "adapter/tensor"), after checking that blobs
    /// of different adapters either coincide or do not overlap.
    fn all_blobs(&self) -> Result<BTreeMap<usize, BlobUse<String>>> {
        let adapters = self.adapters()?;
        let uses = adapters.iter().flat_map(|a| {
            a.tensors.iter().map(|t| BlobUse {
                offset: t.offset,
                length: t.length,
                xxh3: t.xxh3,
                owner: format!("{}/{}", a.name, t.name),
            })
        });
        distinct_blobs(uses).map_err(|m| Error::format(&self.path, m))
    }

    /// Check every record, every blob's checksum, and that every byte outside them is zero
    /// padding. The error names every damaged tensor (up to a few dozen).
    pub fn verify(&self) -> Result<()> {
        self.verify_with(&mut |_, _| Ok(()))
    }

    /// `verify`, calling `progress(bytes_done, bytes_total)` as blobs are checked.
    pub fn verify_with(&self, progress: &mut dyn FnMut(u64, u64) -> Result<()>) -> Result<()> {
        let bytes = self.storage.bytes();
        let blobs = self.all_blobs()?;
        let total: u64 = blobs.values().map(|b| b.length as u64).sum();
        let mut done = 0u64;
        let mut last_report = 0u64;
        let mut bad: HashSet<usize> = HashSet::new();
        for (i, (&offset, &BlobUse { length, xxh3, .. })) in blobs.iter().enumerate() {
            let ok = checksum(&bytes[offset..offset + length]) == xxh3;
            self.checked.lock().expect("checksum cache").insert(offset, ok);
            if !ok {
                bad.insert(offset);
            }
            done += length as u64;
            if done - last_report >= 1 << 24 || i + 1 == blobs.len() {
                progress(done, total)?;
                last_report = done;
            }
        }
        if !bad.is_empty() {
            let mut what: Vec<String> = Vec::new();
            for a in self.adapters()? {
                for t in a.tensors.iter().filter(|t| bad.contains(&t.offset)) {
                    what.push(format!("{}/{}", a.name, t.name));
                }
            }
            let count = what.len();
            what.truncate(32);
            let more = if count > 32 { format!(" and {} more", count - 32) } else { String::new() };
            return Err(Error::Checksum {
                path: self.path.clone(),
                what: format!("{count} tensor(s): {}{more}", what.join(", ")),
            });
        }
        // Padding: everything outside the preamble, blobs, records and catalog must be zero.
        let mut used: Vec<(usize, usize)> = blobs.values().map(|b| (b.offset, b.offset + b.length)).collect();
        used.extend(self.record_ranges.iter().copied());
        used.push((self.catalog_offset, self.catalog_offset));
        used.sort_unstable();
        let mut pos = PREAMBLE_LEN as usize;
        for (start, end) in used {
            if start > pos {
                if let Some(at) = bytes[pos..start].iter().position(|&x| x != 0) {
                    return Err(Error::Checksum {
                        path: self.path.clone(),
                        what: format!("padding (non-zero byte at offset {})", pos + at),
                    });
                }
            }
            pos = pos.max(end);
        }
        Ok(())
    }

    /// Sizes (parses every record).
    pub fn stats(&self) -> Result<BundleStats> {
        let adapters = self.adapters()?;
        let blobs = self.all_blobs()?;
        Ok(BundleStats {
            adapters: adapters.len(),
            tensors: adapters.iter().map(|a| a.tensors.len()).sum(),
            blobs: blobs.len(),
            logical_bytes: adapters.iter().map(|a| a.logical_bytes()).sum(),
            stored_bytes: blobs.values().map(|b| b.length as u64).sum(),
            file_bytes: self.storage.bytes().len() as u64,
        })
    }
}

fn parse_dtype(text: &str) -> Option<DType> {
    // The catalog spells dtypes exactly as the writer does ("F32", "F16", "BF16").
    text.parse::<DType>().ok().filter(|d| d.name() == text)
}

/// Check one tensor record against the data section `[64, data_end)` of a file of `file_len` bytes.
fn validate_tensor(t: &CatalogTensor, data_end: usize, file_len: u64) -> std::result::Result<TensorEntry, String> {
    if t.name.is_empty() || t.name.len() > MAX_NAME_LEN {
        return Err("tensor name is empty or too long".into());
    }
    let dtype = parse_dtype(&t.dtype).ok_or_else(|| format!("unknown dtype {:?}", t.dtype))?;
    let converted_from = match &t.converted_from {
        None => None,
        Some(d) => Some(parse_dtype(d).ok_or_else(|| format!("unknown converted_from dtype {d:?}"))?),
    };
    if t.shape.is_empty() || t.shape.len() > MAX_NDIM {
        return Err(format!("shape {:?} must have 1 to {MAX_NDIM} dimensions", t.shape));
    }
    let mut numel: u64 = 1;
    let mut shape = Vec::with_capacity(t.shape.len());
    for &d in &t.shape {
        if d == 0 {
            return Err(format!("shape {:?} has a zero dimension", t.shape));
        }
        numel = numel
            .checked_mul(d)
            .filter(|&n| n <= file_len)
            .ok_or_else(|| format!("shape {:?} is larger than the file", t.shape))?;
        shape.push(usize::try_from(d).map_err(|_| "dimension overflows".to_string())?);
    }
    let expected = numel * dtype.size() as u64;
    if t.length != expected {
        return Err(format!("length {} does not match shape {:?} of {dtype} ({expected} bytes)", t.length, t.shape));
    }
    if !t.offset.is_multiple_of(ALIGN) || t.offset < PREAMBLE_LEN {
        return Err(format!("offset {} is not a 64-byte aligned position after the preamble", t.offset));
    }
    if t.offset.checked_add(t.length).is_none_or(|e| e > data_end as u64) {
        return Err(format!("bytes {}..+{} run past the data section (ends at {data_end})", t.offset, t.length));
    }
    let xxh3 = parse_hash(&t.xxh3).ok_or_else(|| format!("checksum {:?} is not 16 hex digits", t.xxh3))?;
    Ok(TensorEntry {
        name: t.name.clone(),
        dtype,
        shape,
        offset: t.offset as usize,
        length: t.length as usize,
        xxh3,
        converted_from,
    })
}
