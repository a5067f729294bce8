//! Adapter directories from Python: written from `{name: ndarray}` (read in place, no copy) and
//! read back as `(config_json, {name: (dtype, ndarray)})`.

use std::path::{Path, PathBuf};

use denselora_core::adapter;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::arrays::{tensor_to_py, BorrowedTensors};
use crate::errors::BindingResult;

/// Write an adapter directory from a config JSON text and `{name: array}` (float32 or float16,
/// C-contiguous; read in place, without a copy).
#[pyfunction]
pub fn save_adapter(
    py: Python<'_>,
    path: PathBuf,
    config_json: &str,
    tensors: &Bound<'_, PyDict>,
) -> BindingResult<()> {
    let config = adapter::stamped(&adapter::parse_config_object(config_json, Path::new("config_json"))?);
    let borrowed = BorrowedTensors::from_dict(tensors)?;
    py.detach(|| adapter::write_adapter_dir(&path, &config, &borrowed.views()))?;
    Ok(())
}

/// Read and validate an adapter directory: `(config_json, {name: (dtype, array)})`.
#[pyfunction]
pub fn load_adapter<'py>(py: Python<'py>, path: PathBuf) -> BindingResult<Bound<'py, PyTuple>> {
    let loaded = py.detach(|| adapter::read_adapter_dir(&path))?;
    let config = adapter::config_to_string(&loaded.config);
    let dict = PyDict::new(py);
    for (name, tensor) in loaded.tensors {
        dict.set_item(name, tensor_to_py(py, tensor)?)?;
    }
    let config = config.into_pyobject(py).map_err(PyErr::from)?.into_any();
    Ok(PyTuple::new(py, [config, dict.into_any()])?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ADAPTER_FORMAT_VERSION", adapter::FORMAT_VERSION)?;
    m.add("TENANT_FORMAT_VERSION", adapter::TENANT_FORMAT_VERSION)?;
    m.add_function(wrap_pyfunction!(save_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(load_adapter, m)?)?;
    Ok(())
}
