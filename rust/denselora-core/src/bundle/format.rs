//! The `.dl` bundle layout (docs/format.md is the normative description):
//!
//! ```text
//! [preamble, 64 bytes]  magic "DLBUNDLE", u32 LE format version, 52 zero bytes
//! [data]                per adapter: its tensor blobs (each at a multiple of 64, zero padding
//!                       between) followed by its record (JSON: config and tensor table)
//! [catalog]             UTF-8 JSON index: every adapter's name and where its record lies
//! [footer, 32 bytes]    u64 LE catalog offset, u64 LE catalog length, u64 LE xxh3-64 of the
//!                       catalog, magic "DLBNDEND"
//! ```
//!
//! The catalog sits at the end so that a writer can stream adapters without knowing their number
//! in advance; the fixed-size footer tells a reader where it is. The catalog holds only names and
//! record locations, so opening a bundle of thousands of adapters parses a few bytes per adapter;
//! each adapter's record is checked and parsed the first time that adapter is used.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// First eight bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"DLBUNDLE";
/// Last eight bytes of every complete bundle.
pub const FOOTER_MAGIC: [u8; 8] = *b"DLBNDEND";
/// Version of the layout written by this library (preamble and catalog carry it).
pub const FORMAT_VERSION: u32 = 1;
/// The catalog's `format` field.
pub const FORMAT_NAME: &str = "denselora-bundle";
/// Blob alignment in bytes: memory-mapped views are aligned for any SIMD width in use.
pub const ALIGN: u64 = 64;
/// Size of the preamble; the first blob starts here.
pub const PREAMBLE_LEN: u64 = 64;
/// Size of the footer.
pub const FOOTER_LEN: u64 = 32;
/// The largest catalog a reader accepts, checked before anything is allocated for it.
pub const MAX_CATALOG_LEN: u64 = 256 << 20;
/// The largest adapter record a reader accepts.
pub const MAX_RECORD_LEN: u64 = 256 << 20;
/// The most dimensions a stored tensor may have.
pub const MAX_NDIM: usize = 8;
/// The longest adapter or tensor name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// The preamble bytes for `version`.
pub fn preamble(version: u32) -> [u8; PREAMBLE_LEN as usize] {
    let mut out = [0u8; PREAMBLE_LEN as usize];
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&version.to_le_bytes());
    out
}

/// The fixed trailer that locates and checksums the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub catalog_offset: u64,
    pub catalog_len: u64,
    pub catalog_xxh3: u64,
}

impl Footer {
    pub fn to_bytes(self) -> [u8; FOOTER_LEN as usize] {
        let mut out = [0u8; FOOTER_LEN as usize];
        out[0..8].copy_from_slice(&self.catalog_offset.to_le_bytes());
        out[8..16].copy_from_slice(&self.catalog_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.catalog_xxh3.to_le_bytes());
        out[24..32].copy_from_slice(&FOOTER_MAGIC);
        out
    }

    /// Decode the footer fields; `None` when the magic is missing (a truncated or foreign file).
    pub fn from_bytes(bytes: &[u8; FOOTER_LEN as usize]) -> Option<Self> {
        if bytes[24..32] != FOOTER_MAGIC {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        Some(Footer { catalog_offset: word(0), catalog_len: word(8), catalog_xxh3: word(16) })
    }
}

/// The catalog (index) as stored: JSON, parsed with serde (no code runs on load).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Catalog {
    pub format: String,
    pub format_version: u32,
    pub adapters: Vec<IndexEntry>,
}

/// Where one adapter's record lies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexEntry {
    pub name: String,
    /// Absolute byte offset of the adapter's record.
    pub offset: u64,
    pub length: u64,
    /// xxh3-64 of the record bytes, 16 lower-case hex digits.
    pub xxh3: String,
}

/// One adapter's record: its config and its tensor table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterRecord {
    /// The adapter's config object, as in `adapter_config.json`.
    pub config: Map<String, Value>,
    pub tensors: Vec<CatalogTensor>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CatalogTensor {
    pub name: String,
    /// Stored element type: "F32", "F16" or "BF16".
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Absolute byte offset of the blob in the file (a multiple of 64).
    pub offset: u64,
    /// Blob length in bytes: product(shape) * element size.
    pub length: u64,
    /// xxh3-64 of the blob, 16 lower-case hex digits.
    pub xxh3: String,
    /// The element type the tensor had before a pack-time conversion; absent when unconverted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converted_from: Option<String>,
}

pub fn hash_hex(hash: u64) -> String {
    format!("{hash:016x}")
}

/// Parse exactly 16 hex digits.
pub fn parse_hash(text: &str) -> Option<u64> {
    if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Whether `name` can name an adapter: it becomes a directory name on unpack and follows `:` in
/// `bundle.dl:name`, so it must be a single, printable path component without `:`.
pub fn check_adapter_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("adapter name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("adapter name is longer than {MAX_NAME_LEN} bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("adapter name {name:?} is not a usable directory name"));
    }
    if let Some(c) = name.chars().find(|c| matches!(c, '/' | '\\' | ':') || c.is_control()) {
        return Err(format!(
            "adapter name {name:?} contains {c:?} (names must not contain '/', '\\', ':' or control characters)"
        ));
    }
    Ok(())
}

/// One stored blob as the catalog describes it, with the name of a tensor that uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobUse<O> {
    pub offset: usize,
    pub length: usize,
    pub xxh3: u64,
    pub owner: O,
}

/// Distinct blobs by offset, after checking that tensors either share a blob exactly (same
/// offset, length and checksum: deduplication) or do not overlap at all. Each blob keeps its
/// first owner; errors name the two tensors involved.
pub fn distinct_blobs<O: fmt::Display>(
    uses: impl IntoIterator<Item = BlobUse<O>>,
) -> Result<BTreeMap<usize, BlobUse<O>>, String> {
    let mut blobs: BTreeMap<usize, BlobUse<O>> = BTreeMap::new();
    for b in uses {
        match blobs.get(&b.offset) {
            Some(first) if (first.length, first.xxh3) != (b.length, b.xxh3) => {
                return Err(format!(
                    "tensor {} overlaps tensor {} at offset {} with a different length or checksum",
                    b.owner, first.owner, b.offset
                ));
            }
            Some(_) => {}
            None => {
                blobs.insert(b.offset, b);
            }
        }
    }
    let mut prev: Option<&BlobUse<O>> = None;
    for b in blobs.values() {
        if let Some(p) = prev.filter(|p| b.offset < p.offset + p.length) {
            return Err(format!(
                "tensor {} at {} overlaps tensor {} (ends at {})",
                b.owner,
                b.offset,
                p.owner,
                p.offset + p.length
            ));
        }
        prev = Some(b);
    }
    Ok(blobs)
}

/// Round `pos` up to the next multiple of `ALIGN` (None on overflow).
pub fn align_up(pos: u64) -> Option<u64> {
    pos.checked_add(ALIGN - 1).map(|p| p / ALIGN * ALIGN)
}
