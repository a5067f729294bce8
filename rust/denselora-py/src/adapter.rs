//! Adapters from Python: written from `{name: ndarray}` (read in place, no copy), opened from a
//! directory or a bundle entry as `(config_json, groups, {name: (dtype, ndarray)})` with arrays
//! viewing the mapped file, and the layout of in-memory tensors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use denselora_core::{adapter, GroupLayout, OpenAdapter};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::arrays::{owned_view, BorrowedTensors};
use crate::errors::BindingResult;

/// `(group, in_features, out_features, encoder_rank, decoder_rank, modules)` of one group.
type GroupTuple = (String, usize, usize, usize, usize, Vec<String>);

fn group_tuples(groups: &[GroupLayout]) -> Vec<GroupTuple> {
    groups
        .iter()
        .map(|g| (g.name.clone(), g.in_features, g.out_features, g.encoder_rank, g.decoder_rank, g.modules.clone()))
        .collect()
}

/// Keeps an opened adapter's mapped bytes alive: the base object of every array it hands out.
#[pyclass(frozen, module = "denselora._core")]
pub struct MappedAdapter {
    _adapter: Arc<OpenAdapter>,
}

/// Write an adapter directory from a config JSON text and `{name: array}` (float32 or float16,
/// C-contiguous; read in place, without a copy).
#[pyfunction]
pub fn save_adapter(
    py: Python<'_>,
    path: PathBuf,
    config_json: &str,
    tensors: &Bound<'_, PyDict>,
) -> BindingResult<()> {
    let config = adapter::parse_config_object(config_json, Path::new("config_json"))?;
    let borrowed = BorrowedTensors::from_dict(tensors)?;
    py.detach(|| adapter::write_adapter_dir(&path, &config, &borrowed.views()))?;
    Ok(())
}

/// Open and validate an adapter directory, or adapter `entry` of a bundle (`None`: its only
/// adapter): `(config_json, groups, {name: (dtype, read-only array viewing the mapped file)})`.
#[pyfunction]
#[pyo3(signature = (path, entry = None))]
pub fn open_adapter<'py>(py: Python<'py>, path: PathBuf, entry: Option<String>) -> BindingResult<Bound<'py, PyTuple>> {
    let opened = Arc::new(py.detach(|| OpenAdapter::open(&path, entry.as_deref()))?);
    let owner = Bound::new(py, MappedAdapter { _adapter: Arc::clone(&opened) })?.into_any();
    let tensors = PyDict::new(py);
    for t in &opened.tensors {
        // SAFETY: the spans were validated against the mapped bytes (`length == product(shape) *
        // size`), which live as long as `owner`, the arrays' base object.
        let pair = unsafe { owned_view(&owner, opened.data(t), t.dtype, &t.shape)? };
        tensors.set_item(&t.name, pair)?;
    }
    let config = adapter::config_to_string(&opened.config).into_pyobject(py).map_err(PyErr::from)?.into_any();
    let groups = group_tuples(&opened.groups).into_pyobject(py)?.into_any();
    Ok(PyTuple::new(py, [config, groups, tensors.into_any()])?)
}

/// The groups of an adapter held in memory (config JSON text and `{name: array}`), after checking
/// that its tensors are exactly what the config promises. `source` names it in errors.
#[pyfunction]
#[pyo3(signature = (config_json, tensors, source = "adapter"))]
pub fn adapter_layout(config_json: &str, tensors: &Bound<'_, PyDict>, source: &str) -> BindingResult<Vec<GroupTuple>> {
    let config = adapter::parse_config_object(config_json, Path::new(source))?;
    let borrowed = BorrowedTensors::from_dict(tensors)?;
    Ok(group_tuples(&adapter::validate_layout(&config, &borrowed.views(), source)?))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ADAPTER_FORMAT_VERSION", adapter::FORMAT_VERSION)?;
    m.add("TENANT_FORMAT_VERSION", adapter::TENANT_FORMAT_VERSION)?;
    m.add_function(wrap_pyfunction!(save_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(open_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(adapter_layout, m)?)?;
    m.add_class::<MappedAdapter>()?;
    Ok(())
}
