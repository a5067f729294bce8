//! Adapter algebra: averaging several runs (plain or after latent alignment) and rank truncation.
//!
//! Everything is computed per group in f64 from the factors `E` (r_e x in), `D` (out x r_d) and
//! the per-layer `M_l` (r_d x r_e); the out x in update `D M_l E` is never formed. Results are
//! rounded once to the dtype each tensor had on input.
//!
//! The symmetries that make naive averaging of independent runs wrong, and that the alignment
//! respects: a permutation of the encoder-side latent dims (`E -> P E`, `M_l -> M_l P^T`, true for
//! every elementwise activation), any invertible `B` on the decoder side (`D -> D B^-1`,
//! `M_l -> B M_l`; nothing sits between `M_l` and `D`), and with the `identity` encoder activation
//! any invertible map on the encoder side too. Sign flips of latent dims are symmetries only for odd
//! activations (here: `identity`); GELU and SiLU are not odd, so a GELU/SiLU encoder row can be
//! matched only to a row pointing the same way.

pub mod align;
pub mod assignment;
pub mod average;
pub mod linalg;
pub mod refactor;
pub mod truncate;

use std::collections::BTreeMap;

use half::{bf16, f16};

use crate::adapter::{decoder_key, encoder_key, m_key, validate_layout, Adapter, ConfigMap, GroupLayout};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorRef};
use linalg::{to_matrix, Mat};

pub use average::{average, average_views, AverageOptions, AverageReport, DecoderAlignment, GroupAlignment, Mode};
pub use truncate::{truncate, truncate_view, GroupTruncation, RankTarget, TruncateReport};

/// An adapter whose tensors are borrowed (numpy buffers, another adapter's storage): what the
/// algebra reads.
#[derive(Debug, Clone)]
pub struct AdapterRef<'a> {
    pub config: &'a ConfigMap,
    pub tensors: BTreeMap<String, TensorRef<'a>>,
}

impl<'a> AdapterRef<'a> {
    pub fn of(adapter: &'a Adapter) -> Self {
        AdapterRef { config: &adapter.config, tensors: adapter.views() }
    }

    pub fn layout(&self, context: &str) -> Result<Vec<GroupLayout>> {
        validate_layout(self.config, &self.tensors, context)
    }

    fn get(&self, key: &str) -> TensorRef<'a> {
        self.tensors[key]
    }
}

/// The values of a result tensor, typed: bfloat16 as its bit patterns.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<u16>),
}

/// A result tensor: row-major values of its dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct OutTensor {
    pub shape: Vec<usize>,
    pub values: Values,
}

impl OutTensor {
    /// f64 values rounded once to `dtype` (through f32, as `dtype::from_f64`).
    pub fn from_f64(dtype: DType, shape: Vec<usize>, values: impl Iterator<Item = f64>) -> Self {
        let values = match dtype {
            DType::F32 => Values::F32(values.map(|v| v as f32).collect()),
            DType::F16 => Values::F16(values.map(|v| f16::from_f32(v as f32)).collect()),
            DType::BF16 => Values::BF16(values.map(|v| bf16::from_f32(v as f32).to_bits()).collect()),
        };
        OutTensor { shape, values }
    }

    /// A copy of `t`, bit for bit.
    pub fn copy_of(t: TensorRef<'_>) -> Self {
        let values = match t.dtype {
            DType::F32 => {
                Values::F32(t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            DType::F16 => Values::F16(t.data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect()),
            DType::BF16 => Values::BF16(t.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()),
        };
        OutTensor { shape: t.shape.to_vec(), values }
    }

    pub fn dtype(&self) -> DType {
        match self.values {
            Values::F32(_) => DType::F32,
            Values::F16(_) => DType::F16,
            Values::BF16(_) => DType::BF16,
        }
    }

    pub fn into_tensor(self) -> Tensor {
        let data = match &self.values {
            Values::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Values::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Values::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        Tensor { dtype: self.dtype(), shape: self.shape, data }
    }
}

/// The result of an operation: a config and typed tensors (handed to numpy without re-encoding).
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub config: ConfigMap,
    pub tensors: BTreeMap<String, OutTensor>,
}

impl Output {
    pub fn into_adapter(self) -> Adapter {
        Adapter { config: self.config, tensors: self.tensors.into_iter().map(|(k, t)| (k, t.into_tensor())).collect() }
    }
}

/// The factors of one group in f64: `E`, `D` and each layer's `M` in `layout.modules` order.
#[derive(Clone)]
pub(crate) struct GroupFactors {
    pub encoder: Mat,
    pub decoder: Mat,
    pub ms: Vec<Mat>,
}

pub(crate) fn group_factors(adapter: &AdapterRef<'_>, layout: &GroupLayout) -> GroupFactors {
    GroupFactors { encoder: to_matrix(adapter.get(&encoder_key(&layout.name))), ..decoder_side(adapter, layout) }
}

/// `D` and the `M_l` of one group in f64, with an empty (0 x 0) encoder: for what reads only the
/// decoder side (the report of linear averaging with a non-linear encoder).
pub(crate) fn decoder_side(adapter: &AdapterRef<'_>, layout: &GroupLayout) -> GroupFactors {
    let get = |key: String| to_matrix(adapter.get(&key));
    GroupFactors {
        encoder: Mat::zeros(0, 0),
        decoder: get(decoder_key(&layout.name)),
        ms: layout.modules.iter().map(|m| get(m_key(m))).collect(),
    }
}

/// Store a group's factors into `out` with the dtypes `like` has for the same tensors.
pub(crate) fn put_group(out: &mut Output, like: &AdapterRef<'_>, layout: &GroupLayout, f: &GroupFactors) {
    let mut put = |key: String, m: &Mat| {
        let dtype = like.get(&key).dtype;
        out.tensors.insert(key, linalg::to_out(m, dtype));
    };
    put(encoder_key(&layout.name), &f.encoder);
    put(decoder_key(&layout.name), &f.decoder);
    for (module, m) in layout.modules.iter().zip(&f.ms) {
        put(m_key(module), m);
    }
}

/// Whether every value of `t` is finite: a branch-free test of the exponent bits (all ones is NaN
/// or infinity) that the compiler vectorizes.
fn all_finite(t: TensorRef<'_>) -> bool {
    match t.dtype {
        DType::F32 => {
            const EXP: u32 = 0x7f80_0000;
            !t.data
                .chunks_exact(4)
                .fold(false, |bad, c| bad | (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & EXP == EXP))
        }
        DType::F16 | DType::BF16 => {
            let exp: u16 = if t.dtype == DType::F16 { 0x7c00 } else { 0x7f80 };
            !t.data.chunks_exact(2).fold(false, |bad, c| bad | (u16::from_le_bytes([c[0], c[1]]) & exp == exp))
        }
    }
}

/// NaN or infinity anywhere is an error naming the adapter and the tensor.
pub fn check_finite(adapter: &AdapterRef<'_>, context: &str) -> Result<()> {
    for (name, tensor) in &adapter.tensors {
        if all_finite(*tensor) {
            continue;
        }
        if let Some(pos) = crate::dtype::first_non_finite(tensor.dtype, tensor.data) {
            return Err(Error::non_finite(
                context,
                format!("tensor {name:?} holds a non-finite value at flat index {pos}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::collections::BTreeMap;

    use serde_json::{Map, Value};

    use super::*;
    use crate::adapter::FORMAT_VERSION;
    use crate::dtype::DType;

    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
        }
        /// Roughly standard normal (sum of uniforms).
        pub fn normal(&mut self) -> f64 {
            let mut s = 0.0;
            for _ in 0..12 {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                s += (self.0 >> 11) as f64 / (1u64 << 53) as f64;
            }
            s - 6.0
        }
        pub fn matrix(&mut self, rows: usize, cols: usize) -> Mat {
            Mat::from_fn(rows, cols, |_, _| self.normal())
        }
    }

    /// One group "q" (in 6 -> out 7, `layers` layers) of rank r, with the given activation.
    pub fn random_adapter(seed: u64, r: usize, layers: usize, activation: &str) -> Adapter {
        let mut rng = Rng::new(seed);
        let mut tensors = BTreeMap::new();
        let mut groups = Map::new();
        tensors.insert(encoder_key("q"), linalg::to_tensor(&rng.matrix(r, 6), DType::F32));
        tensors.insert(decoder_key("q"), linalg::to_tensor(&rng.matrix(7, r), DType::F32));
        for l in 0..layers {
            let module = format!("layers.{l}.q");
            tensors.insert(m_key(&module), linalg::to_tensor(&rng.matrix(r, r), DType::F32));
            groups.insert(module, Value::from("q"));
        }
        let mut config = Map::new();
        config.insert("r".into(), Value::from(r));
        config.insert("alpha".into(), Value::from(2 * r));
        config.insert("activation".into(), Value::from(activation));
        config.insert("groups".into(), Value::Object(groups));
        config.insert("format_version".into(), Value::from(FORMAT_VERSION));
        Adapter { config, tensors }
    }

    pub fn factors(adapter: &Adapter) -> GroupFactors {
        let layout = adapter.layout("test").unwrap().remove(0);
        group_factors(&AdapterRef::of(adapter), &layout)
    }

    pub fn set_factors(adapter: &mut Adapter, f: &GroupFactors) {
        let layout = adapter.layout("test").unwrap().remove(0);
        let like = adapter.clone();
        let mut out = Output { config: like.config.clone(), tensors: BTreeMap::new() };
        put_group(&mut out, &AdapterRef::of(&like), &layout, f);
        adapter.tensors.extend(out.into_adapter().tensors);
    }
}
