//! Binding of the counter-based dropout generator: fills a writable 1-D numpy bool array with a
//! mask, or zeroes the dropped elements of a 1-D integer view of float data, in place (views of
//! torch tensors through `.numpy()`), with the GIL released for large arrays.

use denselora_core::{dropout, ArgumentKind, Error};
use numpy::{PyArray1, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::BindingResult;

fn u64_argument(value: &Bound<'_, PyAny>, name: &str) -> Result<u64, Error> {
    value
        .extract::<u64>()
        .map_err(|_| Error::argument(name, ArgumentKind::Value, format!("expected an int in [0, 2**64), got {value}")))
}

/// `(seed, threshold, offset)` of a call, checked.
fn stream_arguments(
    seed: &Bound<'_, PyAny>,
    threshold: &Bound<'_, PyAny>,
    offset: Option<&Bound<'_, PyAny>>,
) -> Result<(u64, u16, u64), Error> {
    let seed = u64_argument(seed, "seed")?;
    let offset = offset.map(|o| u64_argument(o, "offset")).transpose()?.unwrap_or(0);
    let threshold = threshold.extract::<u16>().ok().filter(|&t| t > 0).ok_or_else(|| {
        Error::argument("threshold", ArgumentKind::Value, format!("expected an int in [1, 65535], got {threshold}"))
    })?;
    Ok((seed, threshold, offset))
}

/// `value` as a 1-D numpy array (of any dtype), or the typed error naming `name`.
fn one_dimensional<'a, 'py>(value: &'a Bound<'py, PyAny>, name: &str) -> Result<&'a Bound<'py, PyUntypedArray>, Error> {
    let untyped = value
        .cast::<PyUntypedArray>()
        .map_err(|_| Error::argument(name, ArgumentKind::DType, "expected a numpy array"))?;
    if untyped.ndim() != 1 {
        return Err(Error::argument(
            name,
            ArgumentKind::Shape,
            format!("expected a 1-D array, got shape {:?}", untyped.shape()),
        ));
    }
    Ok(untyped)
}

/// The writable contiguous data of `array`, or the typed error naming `name`.
fn writable<'py, T: numpy::Element>(
    array: &Bound<'py, PyArray1<T>>,
    name: &str,
) -> Result<numpy::PyReadwriteArray1<'py, T>, Error> {
    let borrowed = array
        .try_readwrite()
        .map_err(|e| Error::argument(name, ArgumentKind::Layout, format!("cannot write into the array: {e}")))?;
    if !borrowed.is_contiguous() {
        return Err(Error::argument(name, ArgumentKind::Layout, "array must be contiguous"));
    }
    Ok(borrowed)
}

/// Writes into `out[i]` whether element `offset + i` of the dropout stream for `seed` is dropped:
/// its 16-bit value is below `threshold` (1..=65535), so P(drop) = threshold / 65536.
#[pyfunction]
#[pyo3(signature = (out, seed, threshold, offset=None))]
pub fn dropout_mask(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    seed: &Bound<'_, PyAny>,
    threshold: &Bound<'_, PyAny>,
    offset: Option<&Bound<'_, PyAny>>,
) -> BindingResult<()> {
    let (seed, threshold, offset) = stream_arguments(seed, threshold, offset)?;
    let untyped = one_dimensional(out, "out")?;
    if !untyped.dtype().is_equiv_to(&numpy::dtype::<bool>(py)) {
        return Err(Error::argument(
            "out",
            ArgumentKind::DType,
            format!("expected dtype bool, got {}", untyped.dtype()),
        )
        .into());
    }
    let array = out
        .cast::<PyArray1<bool>>()
        .map_err(|_| Error::argument("out", ArgumentKind::DType, "expected a numpy bool array"))?;
    let mut borrowed = writable(array, "out")?;
    let slice = borrowed.as_slice_mut().expect("checked contiguous");
    run_detached_if_large(py, slice.len(), || dropout::fill_dropout_mask(slice, seed, offset, threshold));
    Ok(())
}

/// Zeroes, in place, the elements of `data` (a writable 1-D numpy array of 16-, 32- or 64-bit
/// integers: float data viewed as integers of its width) that the dropout stream for `seed`
/// drops, starting at element `offset` of the stream: the mask of `dropout_mask`, applied in the
/// pass that draws it.
#[pyfunction]
#[pyo3(signature = (data, seed, threshold, offset=None))]
pub fn dropout_zero_(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    seed: &Bound<'_, PyAny>,
    threshold: &Bound<'_, PyAny>,
    offset: Option<&Bound<'_, PyAny>>,
) -> BindingResult<()> {
    let (seed, threshold, offset) = stream_arguments(seed, threshold, offset)?;
    let untyped = one_dimensional(data, "data")?;
    macro_rules! zero_as {
        ($($t:ty),*) => {$(
            if let Ok(array) = data.cast::<PyArray1<$t>>() {
                let mut borrowed = writable(array, "data")?;
                let slice = borrowed.as_slice_mut().expect("checked contiguous");
                run_detached_if_large(py, slice.len(), || dropout::zero_dropped(slice, seed, offset, threshold));
                return Ok(());
            }
        )*};
    }
    zero_as!(i16, u16, i32, u32, i64, u64);
    Err(Error::argument(
        "data",
        ArgumentKind::DType,
        format!("expected 16-, 32- or 64-bit integers, got {}", untyped.dtype()),
    )
    .into())
}

/// Releasing the GIL costs more than a small mask takes.
fn run_detached_if_large(py: Python<'_>, len: usize, f: impl FnOnce() + Send) {
    if len < 1 << 15 {
        f()
    } else {
        py.detach(f)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dropout_mask, m)?)?;
    m.add_function(wrap_pyfunction!(dropout_zero_, m)?)?;
    Ok(())
}
