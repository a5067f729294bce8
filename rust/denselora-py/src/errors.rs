//! Every core error becomes a Python exception here, in one place; the classes are declared in
//! `exceptions`.

use denselora_core::{ArgumentKind, Error};
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyNotADirectoryError, PyOSError, PyPermissionError,
};
use pyo3::prelude::*;

use crate::exceptions::{
    ARGUMENT_ERROR, CHECKSUM_ERROR, DTYPE_ERROR, FORMAT_ERROR, INCOMPATIBLE_ADAPTER_ERROR, LAYOUT_ERROR,
    NON_FINITE_ERROR, SHAPE_ERROR,
};

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

/// The one place where a core error becomes a Python exception: I/O errors become the built-in
/// `OSError` family, everything else the class of `exceptions` that names what went wrong.
fn core_to_py(err: Error) -> PyErr {
    let message = err.to_string();
    let class = match &err {
        Error::Io { source, .. } => {
            return match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
                std::io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(message),
                std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(message),
                std::io::ErrorKind::NotADirectory => PyNotADirectoryError::new_err(message),
                _ => PyOSError::new_err(message),
            }
        }
        Error::Format { .. } => &FORMAT_ERROR,
        Error::Checksum { .. } => &CHECKSUM_ERROR,
        Error::Incompatible { .. } => &INCOMPATIBLE_ADAPTER_ERROR,
        Error::NonFinite { .. } => &NON_FINITE_ERROR,
        Error::InvalidArgument { kind: ArgumentKind::Shape, .. } => &SHAPE_ERROR,
        Error::InvalidArgument { kind: ArgumentKind::DType, .. } => &DTYPE_ERROR,
        Error::InvalidArgument { kind: ArgumentKind::Layout, .. } => &LAYOUT_ERROR,
        Error::InvalidArgument { kind: ArgumentKind::Value, .. } => &ARGUMENT_ERROR,
    };
    Python::attach(|py| class.err(py, message))
}

pub type BindingResult<T> = Result<T, BindingError>;
