//! The `.dl` adapter bundle: many adapters in one memory-mapped, aligned, checksummed file, each
//! distinct tensor stored once. `format` fixes the bytes, `reader` validates and serves them,
//! `writer` streams them atomically.

pub mod format;
pub mod reader;
pub mod writer;

#[cfg(test)]
mod tests;

pub use reader::{AdapterEntry, Bundle, BundleStats, TensorEntry};
pub use writer::{lock_path, pack, unpack, BundleWriter, PackEntry, PackOptions, PackSource, PackStats};
