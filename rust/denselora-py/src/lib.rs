//! `denselora._core`: the Python face of `denselora-core`. Functions here convert arguments,
//! release the GIL around real work, and map errors; the logic lives in the core crate. This file
//! only registers what the modules define.

mod adapter;
mod algebra;
mod arrays;
mod bundle;
mod dropout;
mod errors;
mod exceptions;
mod files;
mod kernel;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    exceptions::register(m)?;
    adapter::register(m)?;
    files::register(m)?;
    bundle::register(m)?;
    algebra::register(m)?;
    kernel::register(m)?;
    dropout::register(m)?;
    Ok(())
}
