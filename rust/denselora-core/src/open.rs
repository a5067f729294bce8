//! The one way adapters are read: from a directory (`adapter_config.json` + memory-mapped
//! `adapter.safetensors`) or from a bundle entry alike. Opening validates the config and the layout
//! once; the result holds the config, each group's layout and the tensors as views of the mapped
//! bytes (no tensor data is copied).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use crate::adapter::{parse_config, validate_layout, Adapter, ConfigMap, GroupLayout, CONFIG_FILE, TENSORS_FILE};
use crate::bundle::Bundle;
use crate::error::{ArgumentKind, Error, Result};
use crate::safetensors_io::{parse_spans, TensorSpan};
use crate::tensor::TensorRef;

enum Storage {
    Map(Mmap),
    Bytes(Vec<u8>),
    Bundle(Arc<Bundle>),
}

/// An adapter opened for reading. Shareable between threads; tensor views borrow from it.
pub struct OpenAdapter {
    storage: Storage,
    /// The adapter directory, or `bundle:entry`; names the adapter in errors.
    source: String,
    pub config: ConfigMap,
    pub groups: Vec<GroupLayout>,
    /// Tensors sorted by name, each at an absolute offset of `bytes()`.
    pub tensors: Vec<TensorSpan>,
}

impl std::fmt::Debug for OpenAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAdapter").field("source", &self.source).field("tensors", &self.tensors.len()).finish()
    }
}

impl OpenAdapter {
    /// Open `path`: an adapter directory (`entry` must be `None`), or a bundle and its adapter
    /// `entry` (`None`: the bundle's only adapter).
    pub fn open(path: &Path, entry: Option<&str>) -> Result<Self> {
        if path.is_dir() {
            if let Some(entry) = entry {
                return Err(Error::argument(
                    "adapter_name",
                    ArgumentKind::Value,
                    format!(
                        "{} is an adapter directory; adapter_name={entry:?} applies only to bundles",
                        path.display()
                    ),
                ));
            }
            return Self::open_dir(path);
        }
        if !path.exists() {
            let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no adapter directory or bundle here");
            return Err(Error::io(path, missing));
        }
        let bundle = Arc::new(Bundle::open(path)?);
        let name = match entry {
            Some(name) => name.to_string(),
            None => only_entry(&bundle)?,
        };
        Self::open_entry(bundle, &name)
    }

    /// Open an adapter directory.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            let kind = if dir.exists() { std::io::ErrorKind::NotADirectory } else { std::io::ErrorKind::NotFound };
            return Err(Error::io(dir, std::io::Error::new(kind, "not an adapter directory")));
        }
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = parse_config(&text, &config_path)?;
        let tensors_path = dir.join(TENSORS_FILE);
        let storage = map_file(&tensors_path)?;
        let bytes = match &storage {
            Storage::Map(m) => &m[..],
            Storage::Bytes(v) => &v[..],
            Storage::Bundle(_) => unreachable!("a file"),
        };
        let (_, tensors) = parse_spans(bytes, &tensors_path)?;
        let source = dir.display().to_string();
        let groups = validate_layout(&config, &span_views(bytes, &tensors), &source)?;
        Ok(OpenAdapter { storage, source, config, groups, tensors })
    }

    /// Open adapter `name` of an open bundle: its record is validated (once per bundle handle) and
    /// its blobs' checksums are checked.
    pub fn open_entry(bundle: Arc<Bundle>, name: &str) -> Result<Self> {
        let entry = bundle.adapter(name)?;
        bundle.tensors(name, true)?;
        let tensors = entry
            .tensors
            .iter()
            .map(|t| TensorSpan {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                offset: t.offset,
                length: t.length,
            })
            .collect();
        let (config, groups) = (entry.config.clone(), entry.groups.clone());
        let source = format!("{}:{name}", bundle.path().display());
        Ok(OpenAdapter { storage: Storage::Bundle(bundle), source, config, groups, tensors })
    }

    /// The adapter directory, or `bundle:entry`.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The bytes that `tensors` offsets index (the mapped file).
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Map(m) => m,
            Storage::Bytes(v) => v,
            Storage::Bundle(b) => b.bytes(),
        }
    }

    /// The bytes of one tensor.
    pub fn data(&self, t: &TensorSpan) -> &[u8] {
        &self.bytes()[t.offset..t.offset + t.length]
    }

    /// Tensors by name, viewing the mapped bytes.
    pub fn views(&self) -> BTreeMap<String, TensorRef<'_>> {
        span_views(self.bytes(), &self.tensors)
    }

    /// An owned copy of the adapter.
    pub fn to_adapter(&self) -> Adapter {
        let tensors = self.views().into_iter().map(|(k, t)| (k, t.to_owned())).collect();
        Adapter { config: self.config.clone(), tensors }
    }
}

fn span_views<'a>(bytes: &'a [u8], spans: &'a [TensorSpan]) -> BTreeMap<String, TensorRef<'a>> {
    spans
        .iter()
        .map(|t| {
            let view = TensorRef { dtype: t.dtype, shape: &t.shape, data: &bytes[t.offset..t.offset + t.length] };
            (t.name.clone(), view)
        })
        .collect()
}

fn only_entry(bundle: &Bundle) -> Result<String> {
    let names: Vec<&str> = bundle.names().collect();
    if let [only] = names[..] {
        return Ok(only.to_string());
    }
    let path = bundle.path().display();
    let mut shown = names.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        shown.push_str(", ...");
    }
    Err(Error::argument(
        "adapter_name",
        ArgumentKind::Value,
        format!(
            "{path}: the bundle holds {} adapters ({shown}); name one with adapter_name=... or '{path}:NAME'",
            names.len()
        ),
    ))
}

/// Memory-map a file (an empty one, which some platforms cannot map, stands as no bytes).
fn map_file(path: &Path) -> Result<Storage> {
    // Checked before opening: opening a FIFO would block until a writer appears.
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(path, "not a regular file, so not a safetensors file"));
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if meta.len() == 0 {
        return Ok(Storage::Bytes(Vec::new()));
    }
    // SAFETY: the map is read-only. Writers in this library never modify an adapter file in place
    // (they write a new file and rename it), so the mapped inode does not change under us;
    // truncation by another program would raise SIGBUS, as with any memory-mapped reader.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Storage::Map(map))
}

/// Read and validate an adapter directory or bundle entry into memory.
pub fn read_adapter(path: &Path, entry: Option<&str>) -> Result<Adapter> {
    Ok(OpenAdapter::open(path, entry)?.to_adapter())
}

const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<OpenAdapter>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tests::{sample_adapter, sample_tenant};
    use crate::adapter::{m_key, write_adapter_dir};
    use crate::bundle::{pack, PackEntry, PackOptions, PackSource};
    use crate::dtype::DType;
    use crate::tensor::Tensor;

    fn pack_dirs(dest: &Path, dirs: &[(&str, &Path)]) {
        let entries: Vec<PackEntry<'_>> = dirs
            .iter()
            .map(|(name, dir)| PackEntry { name: name.to_string(), source: PackSource::Dir(dir.to_path_buf()) })
            .collect();
        pack(dest, &entries, &PackOptions::default(), &mut |_| Ok(())).unwrap();
    }

    #[test]
    fn a_directory_and_a_bundle_entry_open_alike() {
        let tmp = tempfile::tempdir().unwrap();
        let (full, tenant) = (tmp.path().join("full"), tmp.path().join("tenant"));
        sample_adapter().write(&full).unwrap();
        sample_tenant().write(&tenant).unwrap();
        let bundle = tmp.path().join("b.dl");
        pack_dirs(&bundle, &[("full", &full), ("tenant", &tenant)]);
        for (dir, name) in [(&full, "full"), (&tenant, "tenant")] {
            let a = OpenAdapter::open(dir, None).unwrap();
            let b = OpenAdapter::open(&bundle, Some(name)).unwrap();
            assert_eq!(a.config, b.config);
            assert_eq!(a.groups, b.groups);
            assert_eq!(a.to_adapter(), b.to_adapter());
            assert_eq!(b.source(), format!("{}:{name}", bundle.display()));
            assert_eq!(a.groups, sample_adapter().layout("x").unwrap());
        }
    }

    #[test]
    fn views_lie_inside_the_mapped_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        sample_adapter().write(tmp.path()).unwrap();
        let opened = OpenAdapter::open_dir(tmp.path()).unwrap();
        let range = opened.bytes().as_ptr_range();
        for (name, view) in opened.views() {
            assert!(range.contains(&view.data.as_ptr()), "{name}");
            assert_eq!(view.data.as_ptr() as usize % view.dtype.size(), 0, "{name} is aligned");
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors_naming_what_is_wrong() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a");
        sample_adapter().write(&dir).unwrap();
        // A core of the wrong shape: named with its module.
        let mut bad = sample_adapter();
        let up = m_key("model.layers.0.mlp.up_proj");
        bad.tensors.insert(up.clone(), Tensor::from_f32(DType::F32, vec![3, 4], &[0.0; 12]));
        let views: BTreeMap<String, TensorRef<'_>> = bad.tensors.iter().map(|(k, t)| (k.clone(), t.view())).collect();
        let named: Vec<(&str, TensorRef<'_>)> = views.iter().map(|(k, t)| (k.as_str(), *t)).collect();
        crate::safetensors_io::save_safetensors(&dir.join(TENSORS_FILE), &named, &BTreeMap::new()).unwrap();
        let err = OpenAdapter::open(&dir, None).unwrap_err();
        assert!(matches!(err, Error::Incompatible { .. }) && err.to_string().contains(&up), "{err}");
        // A truncated file: a format error naming the file.
        std::fs::write(dir.join(TENSORS_FILE), b"\x10\0\0\0\0\0\0\0{").unwrap();
        let err = OpenAdapter::open(&dir, None).unwrap_err();
        assert!(matches!(err, Error::Format { .. }) && err.to_string().contains(TENSORS_FILE), "{err}");
        // An entry name for a directory, no such entry, no entry for a bundle of several.
        let err = OpenAdapter::open(&dir, Some("x")).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { kind: ArgumentKind::Value, .. }), "{err}");
        let good = tmp.path().join("good");
        write_adapter_dir(&good, &sample_adapter().config, &sample_adapter().views()).unwrap();
        let bundle = tmp.path().join("b.dl");
        pack_dirs(&bundle, &[("one", &good), ("two", &good)]);
        let err = OpenAdapter::open(&bundle, Some("three")).unwrap_err();
        assert!(err.to_string().contains("three"), "{err}");
        let err = OpenAdapter::open(&bundle, None).unwrap_err();
        assert!(err.to_string().contains("holds 2 adapters (one, two)"), "{err}");
        let err = OpenAdapter::open(&tmp.path().join("missing"), None).unwrap_err();
        assert!(matches!(err, Error::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound), "{err}");
    }
}
