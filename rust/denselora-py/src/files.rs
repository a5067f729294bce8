//! Plain files written atomically (temporary file, fsync, rename): safetensors files from
//! `{name: ndarray}` and text files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use denselora_core::{atomic, safetensors_io, Error, TensorRef};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::BorrowedTensors;
use crate::errors::BindingResult;

/// Write a plain safetensors file (atomically) from `{name: array}` and string metadata.
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata=None))]
pub fn save_safetensors(
    py: Python<'_>,
    path: PathBuf,
    tensors: &Bound<'_, PyDict>,
    metadata: Option<BTreeMap<String, String>>,
) -> BindingResult<()> {
    let borrowed = BorrowedTensors::from_dict(tensors)?;
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
pub fn write_text_atomic(py: Python<'_>, path: PathBuf, text: &str) -> BindingResult<()> {
    py.detach(|| {
        atomic::write_atomically(&path, |w| {
            std::io::Write::write_all(w, text.as_bytes()).map_err(|e| Error::io(&path, e))
        })
    })?;
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(save_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(write_text_atomic, m)?)?;
    Ok(())
}
