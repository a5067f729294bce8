//! Tensors as the core sees them: an element type, a shape and little-endian bytes.

use crate::dtype::{self, DType};

/// A borrowed tensor, the unit handed to writers (numpy buffers, memory-mapped blobs).
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// An owned tensor, the unit returned by readers of small files.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    pub fn from_f32(dtype: DType, shape: Vec<usize>, values: &[f32]) -> Self {
        debug_assert_eq!(numel(&shape), values.len());
        Tensor { dtype, shape, data: dtype::from_f32(dtype, values) }
    }

    pub fn view(&self) -> TensorRef<'_> {
        TensorRef { dtype: self.dtype, shape: &self.shape, data: &self.data }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.view().to_f32()
    }
}

impl<'a> TensorRef<'a> {
    pub fn numel(&self) -> usize {
        numel(self.shape)
    }

    pub fn to_f32(&self) -> Vec<f32> {
        dtype::to_f32(self.dtype, self.data)
    }

    pub fn to_owned(&self) -> Tensor {
        Tensor { dtype: self.dtype, shape: self.shape.to_vec(), data: self.data.to_vec() }
    }
}
