//! The denselora engine, free of Python: adapter files, bundles, adapter algebra and the fused
//! CPU kernel of the DenseLoRA branch. The PyO3 crate `denselora-py` only converts and delegates.

pub mod activation;
pub mod adapter;
pub mod algebra;
pub mod atomic;
pub mod bundle;
pub mod dropout;
pub mod dtype;
pub mod error;
pub mod kernel;
pub mod open;
pub mod safetensors_io;
pub mod tensor;

pub use activation::Activation;
pub use adapter::{read_adapter_dir, write_adapter_dir, Adapter, GroupLayout};
pub use dtype::DType;
pub use error::{ArgumentKind, Error, Result};
pub use open::OpenAdapter;
pub use tensor::{Tensor, TensorRef};
