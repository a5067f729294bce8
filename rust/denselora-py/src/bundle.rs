//! `.dl` bundles from Python: an open bundle whose tensors come back as read-only numpy arrays
//! viewing the memory map (no copy), and the streaming, atomic packer.

use std::path::PathBuf;
use std::sync::Arc;

use denselora_core::bundle::{self, Bundle, PackEntry, PackOptions, PackSource, PackStats};
use denselora_core::{adapter, ArgumentKind, DType, Error};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::arrays::{owned_view, BorrowedTensors};
use crate::errors::BindingResult;

/// `(name, dtype, shape, offset, length, converted_from)` of one tensor.
type TensorInfo = (String, &'static str, Vec<usize>, usize, usize, Option<&'static str>);
/// `(group, in_features, out_features, encoder_rank, decoder_rank, modules)` of one group.
type GroupInfo = (String, usize, usize, usize, usize, usize);

/// Keeps the memory map alive: the base object of every array handed out.
#[pyclass(frozen, module = "denselora._core")]
pub struct MappedBundle {
    _bundle: Arc<Bundle>,
}

/// An open bundle (the file is memory-mapped; opening validates the catalog, reads no tensor data).
#[pyclass(frozen, name = "Bundle", module = "denselora._core")]
pub struct PyBundle {
    bundle: Arc<Bundle>,
}

fn stats_dict<'py>(py: Python<'py>, s: &PackStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("adapters", s.adapters)?;
    d.set_item("tensors", s.tensors)?;
    d.set_item("deduplicated", s.deduplicated)?;
    d.set_item("logical_bytes", s.logical_bytes)?;
    d.set_item("stored_bytes", s.stored_bytes)?;
    d.set_item("file_bytes", s.file_bytes)?;
    Ok(d)
}

/// Run `work` without the GIL; `progress` (a Python callable) is called back with the GIL. An
/// exception it raises (e.g. KeyboardInterrupt) aborts the work and is re-raised as is.
fn with_progress<T: Send>(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    work: impl FnOnce(&mut dyn FnMut(&dyn Fn(Python<'_>) -> PyResult<Py<PyTuple>>) -> Result<(), Error>) -> Result<T, Error>
        + Send,
) -> BindingResult<T> {
    let mut raised: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut call = |args: &dyn Fn(Python<'_>) -> PyResult<Py<PyTuple>>| -> Result<(), Error> {
            let Some(cb) = &progress else { return Ok(()) };
            Python::attach(|py| {
                let outcome = args(py).and_then(|a| cb.bind(py).call1(a.bind(py).clone()).map(|_| ()));
                outcome.map_err(|e| {
                    raised = Some(e);
                    Error::argument("progress", ArgumentKind::Value, "the progress callback raised")
                })
            })
        };
        work(&mut call)
    });
    match (result, raised) {
        (_, Some(err)) => Err(err.into()),
        (Ok(v), None) => Ok(v),
        (Err(e), None) => Err(e.into()),
    }
}

#[pymethods]
impl PyBundle {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> BindingResult<Self> {
        let bundle = py.detach(|| Bundle::open(&path))?;
        Ok(PyBundle { bundle: Arc::new(bundle) })
    }

    /// A new handle on the file now at this path (writers replace the file; this handle and its
    /// arrays keep the one they mapped).
    fn reopen(&self, py: Python<'_>) -> BindingResult<Self> {
        let bundle = &self.bundle;
        let fresh = py.detach(|| bundle.reopen())?;
        Ok(PyBundle { bundle: Arc::new(fresh) })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.bundle.path().to_path_buf()
    }

    fn names(&self) -> Vec<String> {
        self.bundle.names().map(String::from).collect()
    }

    fn __len__(&self) -> usize {
        self.bundle.len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.bundle.contains(name)
    }

    /// The adapter's config as JSON text.
    fn config_json(&self, name: &str) -> BindingResult<String> {
        Ok(adapter::config_to_string(&self.bundle.adapter(name)?.config))
    }

    /// `{tensor name: (dtype, read-only ndarray viewing the map)}`; bfloat16 comes as uint16 bits.
    /// With `verify`, blob checksums are checked the first time each blob is handed out.
    #[pyo3(signature = (name, verify = true))]
    fn tensors<'py>(&self, py: Python<'py>, name: &str, verify: bool) -> BindingResult<Bound<'py, PyDict>> {
        let bundle = &self.bundle;
        let entries = py.detach(|| {
            bundle.tensors(name, verify).map(|ts| ts.into_iter().map(|(t, _)| t.clone()).collect::<Vec<_>>())
        })?;
        let owner = Bound::new(py, MappedBundle { _bundle: Arc::clone(bundle) })?.into_any();
        let dict = PyDict::new(py);
        for t in &entries {
            // SAFETY: the catalog was validated (`length == product(shape) * size` bytes inside the
            // map); the map lives as long as `owner`, the arrays' base object.
            let pair = unsafe { owned_view(&owner, bundle.raw_bytes(t), t.dtype, &t.shape)? };
            dict.set_item(&t.name, pair)?;
        }
        Ok(dict)
    }

    /// Per tensor: `(name, dtype, shape, offset, length, converted_from or None)`.
    fn tensor_info(&self, name: &str) -> BindingResult<Vec<TensorInfo>> {
        let entry = self.bundle.adapter(name)?;
        Ok(entry
            .tensors
            .iter()
            .map(|t| {
                (t.name.clone(), t.dtype.name(), t.shape.clone(), t.offset, t.length, t.converted_from.map(DType::name))
            })
            .collect())
    }

    /// Per group: `(group, in_features, out_features, encoder_rank, decoder_rank, modules)`.
    fn groups(&self, name: &str) -> BindingResult<Vec<GroupInfo>> {
        let entry = self.bundle.adapter(name)?;
        Ok(entry
            .groups
            .iter()
            .map(|g| (g.name.clone(), g.in_features, g.out_features, g.encoder_rank, g.decoder_rank, g.modules.len()))
            .collect())
    }

    /// Sizes: adapters, tensors, blobs, logical_bytes, stored_bytes, file_bytes.
    fn stats<'py>(&self, py: Python<'py>) -> BindingResult<Bound<'py, PyDict>> {
        let bundle = &self.bundle;
        let s = py.detach(|| bundle.stats())?;
        let d = PyDict::new(py);
        d.set_item("adapters", s.adapters)?;
        d.set_item("tensors", s.tensors)?;
        d.set_item("blobs", s.blobs)?;
        d.set_item("logical_bytes", s.logical_bytes)?;
        d.set_item("stored_bytes", s.stored_bytes)?;
        d.set_item("file_bytes", s.file_bytes)?;
        Ok(d)
    }

    /// Check every blob checksum and the zero padding; `progress(done_bytes, total_bytes)`.
    #[pyo3(signature = (progress = None))]
    fn verify(&self, py: Python<'_>, progress: Option<Py<PyAny>>) -> BindingResult<()> {
        let bundle = Arc::clone(&self.bundle);
        with_progress(py, progress, move |call| {
            bundle.verify_with(&mut |done, total| call(&|py| Ok(PyTuple::new(py, [done, total])?.unbind())))
        })
    }

    /// Write adapters as directories `out/<name>` (all when `names` is empty); returns the paths.
    #[pyo3(signature = (out, names = Vec::new(), progress = None))]
    fn unpack(
        &self,
        py: Python<'_>,
        out: PathBuf,
        names: Vec<String>,
        progress: Option<Py<PyAny>>,
    ) -> BindingResult<Vec<PathBuf>> {
        let bundle = Arc::clone(&self.bundle);
        with_progress(py, progress, move |call| {
            bundle::unpack(&bundle, &out, &names, &mut |name| call(&|py| Ok(PyTuple::new(py, [name])?.unbind())))
        })
    }

    fn __repr__(&self) -> String {
        format!("<denselora._core.Bundle {} ({} adapters)>", self.bundle.path().display(), self.bundle.len())
    }
}

enum OwnedSource<'py> {
    Dir(PathBuf),
    Memory(adapter::ConfigMap, BorrowedTensors<'py>),
}

/// Pack adapters into the bundle `dest`, atomically. `entries` is a list of `(name, source)`,
/// where `source` is an adapter directory path or `(config_json, {tensor name: ndarray})`.
/// With `keep_existing`, adapters already in `dest` are kept (same names replaced in place).
/// `progress(name)` is called after each adapter. Returns the pack's sizes.
#[pyfunction]
#[pyo3(signature = (dest, entries, dtype = None, keep_existing = false, progress = None))]
pub fn pack_bundle<'py>(
    py: Python<'py>,
    dest: PathBuf,
    entries: &Bound<'py, PyList>,
    dtype: Option<&str>,
    keep_existing: bool,
    progress: Option<Py<PyAny>>,
) -> BindingResult<Bound<'py, PyDict>> {
    let dtype =
        dtype.map(|d| d.parse::<DType>().map_err(|m| Error::argument("dtype", ArgumentKind::DType, m))).transpose()?;
    let mut owned: Vec<(String, OwnedSource<'py>)> = Vec::with_capacity(entries.len());
    for item in entries.iter() {
        let (name, source): (String, Bound<'py, PyAny>) =
            item.extract().map_err(|_| PyTypeError::new_err("each entry must be a (name, source) tuple"))?;
        if let Ok(path) = source.extract::<PathBuf>() {
            owned.push((name, OwnedSource::Dir(path)));
            continue;
        }
        let (config_json, tensors): (String, Bound<'py, PyDict>) = source.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "entry {name:?}: source must be an adapter directory or a (config_json, {{name: ndarray}}) tuple"
            ))
        })?;
        let context = PathBuf::from(format!("config of adapter {name:?}"));
        let config = adapter::parse_config_object(&config_json, &context)?;
        owned.push((name, OwnedSource::Memory(config, BorrowedTensors::from_dict(&tensors)?)));
    }
    let options = PackOptions { dtype, keep_existing };
    let stats = with_progress(py, progress, move |call| {
        let entries: Vec<PackEntry<'_>> = owned
            .iter()
            .map(|(name, source)| PackEntry {
                name: name.clone(),
                source: match source {
                    OwnedSource::Dir(p) => PackSource::Dir(p.clone()),
                    OwnedSource::Memory(config, tensors) => {
                        PackSource::Memory { config: config.clone(), tensors: tensors.views() }
                    }
                },
            })
            .collect();
        bundle::pack(&dest, &entries, &options, &mut |name| call(&|py| Ok(PyTuple::new(py, [name])?.unbind())))
    })?;
    Ok(stats_dict(py, &stats)?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBundle>()?;
    m.add_class::<MappedBundle>()?;
    m.add_function(wrap_pyfunction!(pack_bundle, m)?)?;
    m.add("BUNDLE_FORMAT_VERSION", bundle::format::FORMAT_VERSION)?;
    Ok(())
}
