//! Binding of the counter-based dropout mask generator: fills a writable 1-D numpy bool array in
//! place (a torch bool tensor's `.numpy()` view), with the GIL released for large masks.

use denselora_core::{dropout, ArgumentKind, Error};
use numpy::{PyArray1, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::BindingResult;

fn u64_argument(value: &Bound<'_, PyAny>, name: &str) -> Result<u64, Error> {
    value
        .extract::<u64>()
        .map_err(|_| Error::argument(name, ArgumentKind::Value, format!("expected an int in [0, 2**64), got {value}")))
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
    let seed = u64_argument(seed, "seed")?;
    let offset = offset.map(|o| u64_argument(o, "offset")).transpose()?.unwrap_or(0);
    let threshold = threshold_argument(threshold)?;
    let untyped = out
        .cast::<PyUntypedArray>()
        .map_err(|_| Error::argument("out", ArgumentKind::DType, "expected a numpy bool array"))?;
    if untyped.ndim() != 1 {
        return Err(Error::argument("out", ArgumentKind::Shape, format!("expected a 1-D array, got shape {:?}", untyped.shape())).into());
    }
    if !untyped.dtype().is_equiv_to(&numpy::dtype::<bool>(py)) {
        return Err(Error::argument("out", ArgumentKind::DType, format!("expected dtype bool, got {}", untyped.dtype())).into());
    }
    let array = out
        .cast::<PyArray1<bool>>()
        .map_err(|_| Error::argument("out", ArgumentKind::DType, "expected a numpy bool array"))?;
    let mut borrowed = array
        .try_readwrite()
        .map_err(|e| Error::argument("out", ArgumentKind::Layout, format!("cannot write into the array: {e}")))?;
    let slice = borrowed
        .as_slice_mut()
        .map_err(|_| Error::argument("out", ArgumentKind::Layout, "array must be contiguous"))?;
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
    let seed = u64_argument(seed, "seed")?;
    let offset = offset.map(|o| u64_argument(o, "offset")).transpose()?.unwrap_or(0);
    let threshold = threshold_argument(threshold)?;
    let untyped = data
        .cast::<PyUntypedArray>()
        .map_err(|_| Error::argument("data", ArgumentKind::DType, "expected a numpy array"))?;
    if untyped.ndim() != 1 {
        return Err(Error::argument("data", ArgumentKind::Shape, format!("expected a 1-D array, got shape {:?}", untyped.shape())).into());
    }
    macro_rules! zero_as {
        ($($t:ty),*) => {$(
            if let Ok(array) = data.cast::<PyArray1<$t>>() {
                let mut borrowed = array
                    .try_readwrite()
                    .map_err(|e| Error::argument("data", ArgumentKind::Layout, format!("cannot write into the array: {e}")))?;
                let slice = borrowed
                    .as_slice_mut()
                    .map_err(|_| Error::argument("data", ArgumentKind::Layout, "array must be contiguous"))?;
                run_detached_if_large(py, slice.len(), || dropout::zero_dropped(slice, seed, offset, threshold));
                return Ok(());
            }
        )*};
    }
    zero_as!(i16, u16, i32, u32, i64, u64);
    Err(Error::argument("data", ArgumentKind::DType, format!("expected 16-, 32- or 64-bit integers, got {}", untyped.dtype())).into())
}

fn threshold_argument(threshold: &Bound<'_, PyAny>) -> Result<u16, Error> {
    threshold
        .extract::<u16>()
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| Error::argument("threshold", ArgumentKind::Value, format!("expected an int in [1, 65535], got {threshold}")))
}

/// Releasing the GIL costs more than a small mask takes.
fn run_detached_if_large(py: Python<'_>, len: usize, f: impl FnOnce() + Send) {
    if len < 1 << 15 {
        f()
    } else {
        py.detach(f)
    }
}
