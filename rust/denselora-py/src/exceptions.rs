//! The Python exception hierarchy of denselora, declared here so that the binding raises its own
//! classes without importing the Python package. `denselora.errors` re-exports them; their
//! `__module__` is `denselora.errors`, where users import them from and where pickle finds them.
//!
//! Most classes also derive from a built-in (`ValueError`, `TypeError`) so that generic handlers
//! keep working. `create_exception!` takes a single base, so every class is made the way a class
//! statement makes it, `type(name, bases, namespace)`, once per interpreter.

use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// One exception class: its name, docstring and bases, created on first use.
pub struct ExceptionClass {
    name: &'static str,
    doc: &'static str,
    bases: for<'py> fn(Python<'py>) -> PyResult<Vec<Bound<'py, PyType>>>,
    class: PyOnceLock<Py<PyType>>,
}

impl ExceptionClass {
    const fn new(
        name: &'static str,
        doc: &'static str,
        bases: for<'py> fn(Python<'py>) -> PyResult<Vec<Bound<'py, PyType>>>,
    ) -> Self {
        ExceptionClass { name, doc, bases, class: PyOnceLock::new() }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The class object (created on first use).
    pub fn get<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyType>> {
        let class = self.class.get_or_try_init(py, || -> PyResult<Py<PyType>> {
            let bases = PyTuple::new(py, (self.bases)(py)?)?;
            let namespace = PyDict::new(py);
            namespace.set_item("__module__", "denselora.errors")?;
            namespace.set_item("__doc__", self.doc)?;
            let class = py.get_type::<PyType>().call1((self.name, bases, namespace))?;
            Ok(class.cast_into::<PyType>()?.unbind())
        })?;
        Ok(class.bind(py).clone())
    }

    /// An exception of this class carrying `message`.
    pub fn err(&self, py: Python<'_>, message: String) -> PyErr {
        match self.get(py) {
            Ok(class) => PyErr::from_type(class, message),
            Err(e) => e,
        }
    }
}

pub static DENSELORA_ERROR: ExceptionClass =
    ExceptionClass::new("DenseLoRAError", "Base class of every denselora error.", |py| {
        Ok(vec![py.get_type::<PyException>()])
    });

pub static CONFIG_ERROR: ExceptionClass = ExceptionClass::new(
    "ConfigError",
    "A configuration value that cannot work (rank, activation, target modules, ...).",
    |py| Ok(vec![DENSELORA_ERROR.get(py)?, py.get_type::<PyValueError>()]),
);

pub static FORMAT_ERROR: ExceptionClass = ExceptionClass::new(
    "FormatError",
    "A file that is not what it claims to be: truncated, malformed, or with a header that lies.",
    |py| Ok(vec![DENSELORA_ERROR.get(py)?, py.get_type::<PyValueError>()]),
);

pub static CHECKSUM_ERROR: ExceptionClass =
    ExceptionClass::new("ChecksumError", "Stored bytes that do not match their recorded checksum.", |py| {
        Ok(vec![FORMAT_ERROR.get(py)?])
    });

pub static INCOMPATIBLE_ADAPTER_ERROR: ExceptionClass = ExceptionClass::new(
    "IncompatibleAdapterError",
    "Adapter contents that do not fit a model, a config or another adapter.",
    |py| Ok(vec![DENSELORA_ERROR.get(py)?, py.get_type::<PyValueError>()]),
);

pub static BASIS_MISMATCH_ERROR: ExceptionClass = ExceptionClass::new(
    "BasisMismatchError",
    "A tenant (cores only) given a basis other than the one it was trained on: names the tenant, the \
     fingerprint it needs and the fingerprint it was given.",
    |py| Ok(vec![INCOMPATIBLE_ADAPTER_ERROR.get(py)?]),
);

pub static NOT_MERGEABLE_ERROR: ExceptionClass = ExceptionClass::new(
    "NotMergeableError",
    "An operation that needs a linear (``identity``) branch was asked of a non-linear one.",
    |py| Ok(vec![DENSELORA_ERROR.get(py)?, py.get_type::<PyValueError>()]),
);

pub static ARGUMENT_ERROR: ExceptionClass =
    ExceptionClass::new("ArgumentError", "A caller-supplied value that is out of range or otherwise unusable.", |py| {
        Ok(vec![DENSELORA_ERROR.get(py)?, py.get_type::<PyValueError>()])
    });

pub static SHAPE_ERROR: ExceptionClass =
    ExceptionClass::new("ShapeError", "Arrays whose shapes do not fit together.", |py| {
        Ok(vec![ARGUMENT_ERROR.get(py)?])
    });

pub static DTYPE_ERROR: ExceptionClass =
    ExceptionClass::new("DTypeError", "An array of an element type the operation does not take.", |py| {
        Ok(vec![DENSELORA_ERROR.get(py)?, py.get_type::<PyTypeError>()])
    });

pub static LAYOUT_ERROR: ExceptionClass = ExceptionClass::new(
    "LayoutError",
    "An array whose memory layout cannot be viewed without a copy (e.g. not contiguous).",
    |py| Ok(vec![ARGUMENT_ERROR.get(py)?]),
);

pub static NON_FINITE_ERROR: ExceptionClass =
    ExceptionClass::new("NonFiniteError", "NaN or infinity where only finite numbers make sense.", |py| {
        Ok(vec![DENSELORA_ERROR.get(py)?, py.get_type::<PyValueError>()])
    });

/// Every class, bases before subclasses.
pub static ALL: [&ExceptionClass; 12] = [
    &DENSELORA_ERROR,
    &CONFIG_ERROR,
    &FORMAT_ERROR,
    &CHECKSUM_ERROR,
    &INCOMPATIBLE_ADAPTER_ERROR,
    &BASIS_MISMATCH_ERROR,
    &NOT_MERGEABLE_ERROR,
    &ARGUMENT_ERROR,
    &SHAPE_ERROR,
    &DTYPE_ERROR,
    &LAYOUT_ERROR,
    &NON_FINITE_ERROR,
];

/// Add every class to the module under its name.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for class in ALL {
        m.add(class.name(), class.get(m.py())?)?;
    }
    Ok(())
}
