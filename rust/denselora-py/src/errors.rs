//! Every core error becomes a Python exception here, in one place. The exception classes live in
//! `denselora.errors` (Python), so that they can also subclass `ValueError`/`TypeError`.

use denselora_core::{ArgumentKind, Error};
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyNotADirectoryError, PyOSError, PyPermissionError,
    PyRuntimeError,
};
use pyo3::prelude::*;
use pyo3::types::PyType;

/// What a binding function can fail with: a core error, or a Python error raised while
/// converting arguments. `?` works on both inside `#[pyfunction]`s.
pub enum BindingError {
    Core(Error),
    Python(PyErr),
}

impl From<Error> for BindingError {
    fn from(e: Error) -> Self {
        BindingError::Core(e)
    }
}

impl From<PyErr> for BindingError {
    fn from(e: PyErr) -> Self {
        BindingError::Python(e)
    }
}

impl From<BindingError> for PyErr {
    fn from(e: BindingError) -> PyErr {
        match e {
            BindingError::Core(err) => core_to_py(err),
            BindingError::Python(err) => err,
        }
    }
}

fn denselora_exception(py: Python<'_>, class: &str, message: String) -> PyErr {
    let class = py
        .import("denselora.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.cast_into::<PyType>().map_err(Into::into));
    match class {
        Ok(class) => PyErr::from_type(class, message),
        Err(e) => PyRuntimeError::new_err(format!("{message} (denselora.errors unavailable: {e})")),
    }
}

fn core_to_py(err: Error) -> PyErr {
    let message = err.to_string();
    match &err {
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
            std::io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(message),
            std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(message),
            std::io::ErrorKind::NotADirectory => PyNotADirectoryError::new_err(message),
            _ => PyOSError::new_err(message),
        },
        _ => Python::attach(|py| {
            let class = match &err {
                Error::Format { .. } => "FormatError",
                Error::Checksum { .. } => "ChecksumError",
                Error::Incompatible { .. } => "IncompatibleAdapterError",
                Error::NonFinite { .. } => "NonFiniteError",
                Error::InvalidArgument { kind, .. } => match kind {
                    ArgumentKind::Shape => "ShapeError",
                    ArgumentKind::DType => "DTypeError",
                    ArgumentKind::Layout => "LayoutError",
                    ArgumentKind::Value => "ArgumentError",
                },
                Error::Io { .. } => unreachable!("handled above"),
            };
            denselora_exception(py, class, message)
        }),
    }
}

pub type BindingResult<T> = Result<T, BindingError>;
