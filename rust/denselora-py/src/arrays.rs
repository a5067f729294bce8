//! Conversion between numpy arrays and core tensors. Inputs are borrowed (no copy); bfloat16,
//! which numpy lacks, travels as uint16 bit patterns with its dtype named beside it.

use std::collections::BTreeMap;

use denselora_core::{ArgumentKind, DType, Error, Tensor, TensorRef};
use numpy::ndarray::{ArrayView, IxDyn};
use numpy::npyffi::flags::NPY_ARRAY_WRITEABLE;
use numpy::{Element, PyArray, PyArray1, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::errors::BindingResult;

/// A borrowed view of a C-contiguous numpy array's bytes. The returned slice is valid while
/// `array` is alive and unmodified; callers hold the array for that long.
pub fn array_bytes<'py>(array: &Bound<'py, PyUntypedArray>, name: &str, dtype: DType) -> Result<&'py [u8], Error> {
    if !array.is_c_contiguous() {
        return Err(Error::argument(name, ArgumentKind::Layout, "array must be C-contiguous"));
    }
    let len = array.len() * dtype.size();
    // SAFETY: a C-contiguous array owns `len` readable bytes at `data`; numpy keeps them alive
    // as long as the array object, which outlives the borrow through `'py`.
    let ptr = unsafe { (*array.as_array_ptr()).fields.data } as *const u8;
    Ok(if len == 0 { &[] } else { unsafe { std::slice::from_raw_parts(ptr, len) } })
}

/// The storage dtype of a numpy array: float32, float16, or uint16 standing for bfloat16 (the one
/// bfloat16 policy: raw 16-bit patterns both ways, as `denselora.io.arrays` sends them).
pub fn array_dtype(array: &Bound<'_, PyUntypedArray>, name: &str) -> Result<DType, Error> {
    let py = array.py();
    let dtype = array.dtype();
    if dtype.is_equiv_to(&numpy::dtype::<f32>(py)) {
        Ok(DType::F32)
    } else if dtype.is_equiv_to(&numpy::dtype::<half::f16>(py)) {
        Ok(DType::F16)
    } else if dtype.is_equiv_to(&numpy::dtype::<u16>(py)) {
        Ok(DType::BF16)
    } else {
        Err(Error::argument(
            name,
            ArgumentKind::DType,
            format!("unsupported numpy dtype {dtype} (expected float32, float16, or uint16 bits of bfloat16)"),
        ))
    }
}

/// A core tensor as `(dtype name, numpy array)`; bfloat16 comes back as uint16 bits.
pub fn tensor_to_py<'py>(py: Python<'py>, tensor: Tensor) -> PyResult<Bound<'py, PyTuple>> {
    let shape = tensor.shape.clone();
    let array = match tensor.dtype {
        DType::F32 => {
            let v: Vec<f32> = tensor.to_f32();
            PyArray1::from_vec(py, v).reshape(shape)?.into_any()
        }
        DType::F16 => {
            let v: Vec<half::f16> =
                tensor.data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect();
            PyArray1::from_vec(py, v).reshape(shape)?.into_any()
        }
        DType::BF16 => {
            let v: Vec<u16> = tensor.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            PyArray1::from_vec(py, v).reshape(shape)?.into_any()
        }
    };
    PyTuple::new(py, [tensor.dtype.name().into_pyobject(py)?.into_any(), array])
}

/// A read-only numpy array viewing `data`, whose base object is `owner`.
///
/// # Safety
/// `data` must hold `product(shape)` elements of `T`, be aligned for `T`, and stay valid and
/// unchanged as long as `owner` lives.
unsafe fn view<'py, T: Element>(owner: &Bound<'py, PyAny>, data: &[u8], shape: &[usize]) -> Bound<'py, PyAny> {
    let array = ArrayView::<T, IxDyn>::from_shape_ptr(IxDyn(shape), data.as_ptr() as *const T);
    let out = PyArray::<T, IxDyn>::borrow_from_array(&array, owner.clone());
    (*out.as_array_ptr()).fields.flags &= !NPY_ARRAY_WRITEABLE;
    out.into_any()
}

/// A tensor's bytes owned by `owner` as `(dtype name, numpy array)`: a read-only view without a
/// copy, or a copy when the bytes are not aligned for the dtype (possible in a safetensors file
/// of mixed dtypes from another writer). bfloat16 comes back as uint16 bits.
///
/// # Safety
/// `data` must be `product(shape) * dtype.size()` bytes that stay valid and unchanged as long as
/// `owner` lives (numpy keeps `owner` as the array's base object).
pub unsafe fn owned_view<'py>(
    owner: &Bound<'py, PyAny>,
    data: &[u8],
    dtype: DType,
    shape: &[usize],
) -> PyResult<Bound<'py, PyTuple>> {
    let py = owner.py();
    if !(data.as_ptr() as usize).is_multiple_of(dtype.size()) {
        return tensor_to_py(py, Tensor { dtype, shape: shape.to_vec(), data: data.to_vec() });
    }
    let array = match dtype {
        DType::F32 => view::<f32>(owner, data, shape),
        DType::F16 => view::<half::f16>(owner, data, shape),
        DType::BF16 => view::<u16>(owner, data, shape),
    };
    PyTuple::new(py, [dtype.name().into_pyobject(py)?.into_any(), array])
}

/// Borrowed arrays of a `{name: ndarray}` dict, ready to be viewed as core tensors.
pub(crate) struct BorrowedTensors<'py> {
    entries: Vec<(String, DType, Vec<usize>, &'py [u8])>,
}

impl<'py> BorrowedTensors<'py> {
    pub(crate) fn from_dict(tensors: &Bound<'py, PyDict>) -> BindingResult<Self> {
        let mut entries = Vec::with_capacity(tensors.len());
        for (key, value) in tensors.iter() {
            let name: String =
                key.extract().map_err(|_| Error::argument("tensors", ArgumentKind::Value, "keys must be str"))?;
            let array = value
                .cast_into::<PyUntypedArray>()
                .map_err(|_| Error::argument(&name, ArgumentKind::DType, "value is not a numpy array"))?;
            let dtype = array_dtype(&array, &name)?;
            let bytes = array_bytes(&array, &name, dtype)?;
            entries.push((name, dtype, array.shape().to_vec(), bytes));
        }
        Ok(BorrowedTensors { entries })
    }

    pub(crate) fn views(&self) -> BTreeMap<String, TensorRef<'_>> {
        self.entries.iter().map(|(n, d, s, b)| (n.clone(), TensorRef { dtype: *d, shape: s, data: b })).collect()
    }
}
