//! `denselora._core`: the Python face of `denselora-core`. Functions here convert arguments,
//! release the GIL around real work, and map errors; the logic lives in the core crate.

mod algebra;
mod arrays;
mod bundle;
mod dropout;
mod errors;
mod exceptions;
mod kernel;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use denselora_core::{adapter, atomic, safetensors_io, ArgumentKind, DType, Error, TensorRef};
use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::arrays::{array_bytes, array_dtype, tensor_to_py};
use crate::errors::BindingResult;

/// Borrowed arrays of a `{name: ndarray}` dict, ready to be viewed as core tensors.
pub(crate) struct BorrowedTensors<'py> {
    entries: Vec<(String, DType, Vec<usize>, &'py [u8])>,
}

impl<'py> BorrowedTensors<'py> {
    pub(crate) fn from_dict(tensors: &Bound<'py, PyDict>, bf16_bits: bool) -> BindingResult<Self> {
        let mut entries = Vec::with_capacity(tensors.len());
        for (key, value) in tensors.iter() {
            let name: String =
                key.extract().map_err(|_| Error::argument("tensors", ArgumentKind::Value, "keys must be str"))?;
            let array = value
                .cast_into::<PyUntypedArray>()
                .map_err(|_| Error::argument(&name, ArgumentKind::DType, "value is not a numpy array"))?;
            let dtype = array_dtype(&array, &name, bf16_bits)?;
            let bytes = array_bytes(&array, &name, dtype)?;
            entries.push((name, dtype, array.shape().to_vec(), bytes));
        }
        Ok(BorrowedTensors { entries })
    }

    pub(crate) fn views(&self) -> BTreeMap<String, TensorRef<'_>> {
        self.entries.iter().map(|(n, d, s, b)| (n.clone(), TensorRef { dtype: *d, shape: s, data: b })).collect()
    }
}

/// Write an adapter directory from a config JSON text and `{name: array}` (float32 or float16,
/// C-contiguous; read in place, without a copy).
#[pyfunction]
fn save_adapter(py: Python<'_>, path: PathBuf, config_json: &str, tensors: &Bound<'_, PyDict>) -> BindingResult<()> {
    let mut config = adapter::parse_config_object(config_json, Path::new("config_json"))?;
    config.insert("format_version".into(), adapter::FORMAT_VERSION.into());
    let borrowed = BorrowedTensors::from_dict(tensors, false)?;
    py.detach(|| adapter::write_adapter_dir(&path, &config, &borrowed.views()))?;
    Ok(())
}

/// Read and validate an adapter directory: `(config_json, {name: (dtype, array)})`.
#[pyfunction]
fn load_adapter<'py>(py: Python<'py>, path: PathBuf) -> BindingResult<Bound<'py, PyTuple>> {
    let loaded = py.detach(|| adapter::read_adapter_dir(&path))?;
    let config = adapter::config_to_string(&loaded.config);
    let dict = PyDict::new(py);
    for (name, tensor) in loaded.tensors {
        dict.set_item(name, tensor_to_py(py, tensor)?)?;
    }
    let config = config.into_pyobject(py).map_err(PyErr::from)?.into_any();
    Ok(PyTuple::new(py, [config, dict.into_any()])?)
}

/// Write a plain safetensors file (atomically) from `{name: array}` and string metadata.
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata=None))]
fn save_safetensors(
    py: Python<'_>,
    path: PathBuf,
    tensors: &Bound<'_, PyDict>,
    metadata: Option<BTreeMap<String, String>>,
) -> BindingResult<()> {
    let borrowed = BorrowedTensors::from_dict(tensors, false)?;
    let metadata = metadata.unwrap_or_default();
    py.detach(|| {
        let views = borrowed.views();
        let named: Vec<(&str, TensorRef<'_>)> = views.iter().map(|(k, t)| (k.as_str(), *t)).collect();
        safetensors_io::save_safetensors(&path, &named, &metadata)
    })?;
    Ok(())
}

/// Replace a text file atomically (temp file, fsync, rename).
#[pyfunction]
fn write_text_atomic(py: Python<'_>, path: PathBuf, text: &str) -> BindingResult<()> {
    py.detach(|| {
        atomic::write_atomically(&path, |w| {
            std::io::Write::write_all(w, text.as_bytes()).map_err(|e| Error::io(&path, e))
        })
    })?;
    Ok(())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("ADAPTER_FORMAT_VERSION", adapter::FORMAT_VERSION)?;
    exceptions::register(m)?;
    m.add_function(wrap_pyfunction!(save_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(load_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(save_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(write_text_atomic, m)?)?;
    bundle::register(m)?;
    m.add_function(wrap_pyfunction!(algebra::average_adapters, m)?)?;
    m.add_function(wrap_pyfunction!(algebra::truncate_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(algebra::linear_assignment, m)?)?;
    m.add_function(wrap_pyfunction!(kernel::fused_branch, m)?)?;
    m.add_function(wrap_pyfunction!(kernel::kernel_isa, m)?)?;
    m.add_function(wrap_pyfunction!(kernel::kernel_available_isas, m)?)?;
    m.add_function(wrap_pyfunction!(kernel::kernel_set_isa, m)?)?;
    m.add_class::<kernel::PreparedBranch>()?;
    m.add_function(wrap_pyfunction!(dropout::dropout_mask, m)?)?;
    m.add_function(wrap_pyfunction!(dropout::dropout_zero_, m)?)?;
    Ok(())
}
