//! Writing bundles: blobs are streamed to a temporary file as each adapter arrives (memory holds
//! one adapter and the catalog, never the whole bundle), identical tensors are stored once, and
//! the catalog and footer close the file before it is renamed over the destination.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::format::*;
use super::reader::Bundle;
use rayon::prelude::*;

use crate::adapter::{stamped, validate_layout, write_adapter_dir, ConfigMap};
use crate::atomic::write_atomically;
use crate::dtype::{self, DType};
use crate::error::{ArgumentKind, Error, Result};
use crate::open::OpenAdapter;
use crate::tensor::TensorRef;

/// What a pack wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackStats {
    pub adapters: usize,
    pub tensors: usize,
    /// Tensors that matched an already stored blob and cost no space.
    pub deduplicated: usize,
    /// Sum of every tensor's stored length, as if nothing were shared.
    pub logical_bytes: u64,
    /// Bytes of distinct blobs actually written.
    pub stored_bytes: u64,
    pub file_bytes: u64,
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_read(file, buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// A stored blob, as a candidate for deduplication. Kept compact (one flat table, shapes in a
/// shared arena): the table is the only state that grows with the number of distinct tensors.
struct StoredBlob {
    offset: u64,
    len: u64,
    /// Start of the shape in `BundleWriter::shapes`.
    shape_at: u32,
    /// Next blob with the same hash (`u32::MAX`: none).
    next: u32,
    ndim: u8,
    dtype: DType,
}

/// Hashes the `u64` keys of `seen` as they are: they are already xxh3 values.
#[derive(Default)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Streams a bundle into an open file (normally the temporary file of `write_atomically`).
pub struct BundleWriter<'w> {
    out: &'w mut BufWriter<File>,
    path: PathBuf,
    pos: u64,
    /// xxh3 -> first stored blob with that hash; same dtype, shape and bytes settle a match.
    seen: HashMap<u64, u32, std::hash::BuildHasherDefault<PassThrough>>,
    stored: Vec<StoredBlob>,
    shapes: Vec<usize>,
    adapters: Vec<IndexEntry>,
    names: HashSet<String>,
    stats: PackStats,
}

impl<'w> BundleWriter<'w> {
    /// Start a bundle: writes the preamble. `path` names the destination in errors.
    pub fn new(out: &'w mut BufWriter<File>, path: &Path) -> Result<Self> {
        out.write_all(&preamble(FORMAT_VERSION)).map_err(|e| Error::io(path, e))?;
        Ok(BundleWriter {
            out,
            path: path.to_path_buf(),
            pos: PREAMBLE_LEN,
            seen: HashMap::default(),
            stored: Vec::new(),
            shapes: Vec::new(),
            adapters: Vec::new(),
            names: HashSet::new(),
            stats: PackStats::default(),
        })
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::io(&self.path, e)
    }

    fn stored_equals(&mut self, offset: u64, data: &[u8]) -> Result<bool> {
        self.out.flush().map_err(|e| self.io(e))?;
        let mut back = vec![0u8; data.len()];
        read_exact_at(self.out.get_ref(), &mut back, offset).map_err(|e| self.io(e))?;
        Ok(back == data)
    }

    /// Store `data` (or find it already stored); returns its offset.
    fn put_blob(&mut self, dtype: DType, shape: &[usize], data: &[u8], hash: u64) -> Result<u64> {
        let first = self.seen.get(&hash).copied();
        let mut at = first.unwrap_or(u32::MAX);
        while at != u32::MAX {
            let b = &self.stored[at as usize];
            let (offset, next) = (b.offset, b.next);
            let b_shape = &self.shapes[b.shape_at as usize..b.shape_at as usize + b.ndim as usize];
            if b.dtype == dtype && b.len == data.len() as u64 && b_shape == shape && self.stored_equals(offset, data)? {
                self.stats.deduplicated += 1;
                return Ok(offset);
            }
            at = next;
        }
        let start = align_up(self.pos).ok_or_else(|| Error::format(&self.path, "bundle too large"))?;
        let pad = (start - self.pos) as usize;
        self.out.write_all(&[0u8; ALIGN as usize][..pad]).map_err(|e| self.io(e))?;
        self.out.write_all(data).map_err(|e| self.io(e))?;
        self.pos = start + data.len() as u64;
        self.stats.stored_bytes += data.len() as u64;
        let index = u32::try_from(self.stored.len()).ok();
        let shape_at = u32::try_from(self.shapes.len()).ok();
        let (Some(index), Some(shape_at)) = (index, shape_at) else {
            return Err(Error::format(&self.path, "too many distinct tensors for one bundle"));
        };
        self.shapes.extend_from_slice(shape);
        self.stored.push(StoredBlob {
            offset: start,
            len: data.len() as u64,
            shape_at,
            next: first.unwrap_or(u32::MAX),
            ndim: shape.len() as u8,
            dtype,
        });
        self.seen.insert(hash, index);
        Ok(start)
    }

    /// Add one adapter. Its layout is validated first; with `convert_to`, tensors of another
    /// dtype are converted (round to nearest even) and the conversion is recorded.
    pub fn add_adapter(
        &mut self,
        name: &str,
        config: &ConfigMap,
        tensors: &BTreeMap<String, TensorRef<'_>>,
        convert_to: Option<DType>,
    ) -> Result<()> {
        self.add_adapter_recorded(name, config, tensors, convert_to, &BTreeMap::new())
    }

    /// `add_adapter` for tensors that were already converted once (`converted_from` by tensor
    /// name): the record of the original dtype is kept.
    pub fn add_adapter_recorded(
        &mut self,
        name: &str,
        config: &ConfigMap,
        tensors: &BTreeMap<String, TensorRef<'_>>,
        convert_to: Option<DType>,
        converted_from: &BTreeMap<String, DType>,
    ) -> Result<()> {
        check_adapter_name(name).map_err(|m| Error::argument("adapter_name", ArgumentKind::Value, m))?;
        if !self.names.insert(name.to_string()) {
            return Err(Error::argument(
                "adapter_name",
                ArgumentKind::Value,
                format!("adapter {name:?} is added to {} twice", self.path.display()),
            ));
        }
        let config = stamped(config);
        validate_layout(&config, tensors, &format!("adapter {name:?}"))?;
        let mut records = Vec::with_capacity(tensors.len());
        for (tname, t) in tensors {
            if t.numel().checked_mul(t.dtype.size()) != Some(t.data.len()) {
                return Err(Error::argument(
                    format!("adapter {name:?}, tensor {tname:?}"),
                    ArgumentKind::Shape,
                    format!("{} bytes do not hold shape {:?} of {}", t.data.len(), t.shape, t.dtype),
                ));
            }
            let (data, stored, from): (Cow<'_, [u8]>, DType, Option<DType>) = match convert_to {
                Some(target) if target != t.dtype => (
                    Cow::Owned(dtype::from_f32(target, &t.to_f32())),
                    target,
                    Some(converted_from.get(tname).copied().unwrap_or(t.dtype)),
                ),
                _ => (Cow::Borrowed(t.data), t.dtype, converted_from.get(tname).copied()),
            };
            let hash = checksum(&data);
            let offset = self.put_blob(stored, t.shape, &data, hash)?;
            self.stats.tensors += 1;
            self.stats.logical_bytes += data.len() as u64;
            records.push(CatalogTensor {
                name: tname.clone(),
                dtype: stored.name().to_string(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
                offset,
                length: data.len() as u64,
                xxh3: hash_hex(hash),
                converted_from: from.filter(|f| *f != stored).map(|f| f.name().to_string()),
            });
        }
        // The record follows the adapter's blobs; the catalog at the end points to it.
        let record = AdapterRecord { config, tensors: records };
        let text = serde_json::to_vec(&record).map_err(|e| Error::format(&self.path, format!("record: {e}")))?;
        if text.len() as u64 > MAX_RECORD_LEN {
            return Err(Error::argument(
                format!("adapter {name:?}"),
                ArgumentKind::Value,
                format!("its record would be {} bytes, over the limit of {MAX_RECORD_LEN}", text.len()),
            ));
        }
        self.out.write_all(&text).map_err(|e| self.io(e))?;
        self.adapters.push(IndexEntry {
            name: name.to_string(),
            offset: self.pos,
            length: text.len() as u64,
            xxh3: hash_hex(checksum(&text)),
        });
        self.pos += text.len() as u64;
        self.stats.adapters += 1;
        Ok(())
    }

    /// Copy one adapter of an open bundle (checksums are checked on the way).
    pub fn copy_from(&mut self, bundle: &Bundle, name: &str, convert_to: Option<DType>) -> Result<()> {
        let entry = bundle.adapter(name)?;
        let tensors = bundle.tensor_map(name)?;
        let record: BTreeMap<String, DType> =
            entry.tensors.iter().filter_map(|t| t.converted_from.map(|d| (t.name.clone(), d))).collect();
        self.add_adapter_recorded(name, &entry.config, &tensors, convert_to, &record)
    }

    /// Write the catalog and the footer. The caller (normally `write_atomically`) then syncs and
    /// renames the file.
    pub fn finish(self) -> Result<PackStats> {
        let catalog = Catalog { format: FORMAT_NAME.into(), format_version: FORMAT_VERSION, adapters: self.adapters };
        let text = serde_json::to_vec(&catalog).map_err(|e| Error::format(&self.path, format!("catalog: {e}")))?;
        if text.len() as u64 > MAX_CATALOG_LEN {
            return Err(Error::format(
                &self.path,
                format!("the catalog would be {} bytes, over the limit of {MAX_CATALOG_LEN}", text.len()),
            ));
        }
        let footer = Footer { catalog_offset: self.pos, catalog_len: text.len() as u64, catalog_xxh3: checksum(&text) };
        let path = self.path;
        self.out.write_all(&text).map_err(|e| Error::io(&path, e))?;
        self.out.write_all(&footer.to_bytes()).map_err(|e| Error::io(&path, e))?;
        let mut stats = self.stats;
        stats.file_bytes = self.pos + text.len() as u64 + FOOTER_LEN;
        Ok(stats)
    }
}

/// Where an adapter to pack comes from.
pub enum PackSource<'a> {
    /// An adapter directory (`adapter_config.json` + `adapter.safetensors`).
    Dir(PathBuf),
    /// An adapter in memory (e.g. numpy buffers borrowed by the Python binding).
    Memory { config: ConfigMap, tensors: BTreeMap<String, TensorRef<'a>> },
}

pub struct PackEntry<'a> {
    pub name: String,
    pub source: PackSource<'a>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PackOptions {
    /// Convert the packed adapters' tensors to this dtype. Adapters kept from an existing
    /// bundle are copied as stored: adding an adapter never re-rounds the others.
    pub dtype: Option<DType>,
    /// When the destination is an existing bundle, keep its adapters (entries of the same name
    /// are replaced in place, new ones appended). Otherwise the destination is replaced.
    pub keep_existing: bool,
}

/// Adapter directories read ahead of the writer, in parallel: enough to keep the cores busy,
/// few enough that memory stays bounded by a handful of adapters.
const READ_AHEAD: usize = 8;

/// One adapter to write, in bundle order.
enum Item<'e, 'a> {
    /// An adapter kept from the existing bundle.
    Keep(&'e str),
    Add(&'e PackEntry<'a>),
}

fn add_loaded(
    writer: &mut BundleWriter<'_>,
    entry: &PackEntry<'_>,
    loaded: Option<Result<OpenAdapter>>,
    dtype: Option<DType>,
) -> Result<()> {
    match (&entry.source, loaded) {
        (PackSource::Memory { config, tensors }, _) => writer.add_adapter(&entry.name, config, tensors, dtype),
        (PackSource::Dir(dir), loaded) => {
            let adapter = match loaded {
                Some(result) => result?,
                None => OpenAdapter::open_dir(dir)?,
            };
            writer.add_adapter(&entry.name, &adapter.config, &adapter.views(), dtype)
        }
    }
}

/// Write the bundle `dest` from `entries` (and, with `keep_existing`, the adapters already in
/// `dest`), atomically: on any failure `dest` keeps its previous contents. `progress` is called
/// with each adapter's name once it is written; an error from it aborts the pack.
pub fn pack(
    dest: &Path,
    entries: &[PackEntry<'_>],
    options: &PackOptions,
    progress: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<PackStats> {
    let mut names = HashSet::new();
    for e in entries {
        check_adapter_name(&e.name).map_err(|m| Error::argument("adapter_name", ArgumentKind::Value, m))?;
        if !names.insert(e.name.as_str()) {
            return Err(Error::argument(
                "adapter_name",
                ArgumentKind::Value,
                format!("adapter {:?} is given twice", e.name),
            ));
        }
    }
    // Writers of one bundle take turns: reading what is there, writing the new file and renaming it
    // over happen under one exclusive lock, so no writer builds on a bundle another is replacing
    // (which would silently drop that writer's adapters). Readers never lock: they map a file that
    // the rename never changes.
    let _lock = lock_writers(dest)?;
    let base = if options.keep_existing && dest.exists() { Some(Bundle::open(dest)?) } else { None };
    if entries.is_empty() && base.is_none() {
        return Err(Error::argument(
            "adapters",
            ArgumentKind::Value,
            format!("{}: no adapters to pack", dest.display()),
        ));
    }
    let mut stats = PackStats::default();
    write_atomically(dest, |w| {
        let mut writer = BundleWriter::new(w, dest)?;
        let by_name: HashMap<&str, &PackEntry<'_>> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
        let mut items: Vec<Item<'_, '_>> = Vec::with_capacity(entries.len());
        let mut replaced = HashSet::new();
        if let Some(base) = &base {
            for name in base.names() {
                match by_name.get(name) {
                    Some(entry) => {
                        items.push(Item::Add(entry));
                        replaced.insert(name);
                    }
                    None => items.push(Item::Keep(name)),
                }
            }
        }
        items.extend(entries.iter().filter(|e| !replaced.contains(e.name.as_str())).map(Item::Add));
        for chunk in items.chunks(READ_AHEAD) {
            let mut loaded: Vec<Option<Result<OpenAdapter>>> = chunk
                .par_iter()
                .map(|item| match item {
                    Item::Add(PackEntry { source: PackSource::Dir(dir), .. }) => Some(OpenAdapter::open_dir(dir)),
                    _ => None,
                })
                .collect();
            for (item, loaded) in chunk.iter().zip(loaded.drain(..)) {
                match item {
                    Item::Keep(name) => {
                        let base = base.as_ref().expect("kept adapters come from a base bundle");
                        writer.copy_from(base, name, None)?;
                        progress(name)?;
                    }
                    Item::Add(entry) => {
                        add_loaded(&mut writer, entry, loaded, options.dtype)?;
                        progress(&entry.name)?;
                    }
                }
            }
        }
        stats = writer.finish()?;
        Ok(())
    })?;
    Ok(stats)
}

/// The sidecar lock file of a bundle: `<bundle>.lock` beside it (created on first use and left in
/// place; removing it could let two writers lock two different files).
pub fn lock_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    dest.with_file_name(name)
}

/// Block until this process holds the exclusive lock of `dest`'s writers; released when the
/// returned file is dropped (or the process ends, however it ends).
fn lock_writers(dest: &Path) -> Result<File> {
    let path = lock_path(dest);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    file.lock().map_err(|e| Error::io(&path, e))?;
    Ok(file)
}

/// Write adapters of `bundle` as adapter directories `out/<name>`, tensors byte-identical to the
/// stored ones. `names` empty means every adapter.
pub fn unpack(
    bundle: &Bundle,
    out: &Path,
    names: &[String],
    progress: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    let chosen: Vec<String> =
        if names.is_empty() { bundle.names().map(String::from).collect() } else { names.to_vec() };
    for name in &chosen {
        bundle.adapter(name)?;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut written = Vec::with_capacity(chosen.len());
    for name in &chosen {
        let entry = bundle.adapter(name)?;
        let tensors = bundle.tensor_map(name)?;
        let dir = out.join(name);
        write_adapter_dir(&dir, &entry.config, &tensors)?;
        written.push(dir);
        progress(name)?;
    }
    Ok(written)
}
