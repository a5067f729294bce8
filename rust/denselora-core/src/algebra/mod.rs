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

use crate::adapter::{decoder_key, encoder_key, m_key, Adapter, GroupLayout};
use crate::error::{Error, Result};
use linalg::{to_matrix, Mat};

pub use average::{average, AverageOptions, AverageReport, DecoderAlignment, GroupAlignment, Mode};
pub use truncate::{truncate, GroupTruncation, RankTarget, TruncateReport};

/// The factors of one group in f64: `E`, `D` and each layer's `M` in `layout.modules` order.
#[derive(Clone)]
pub(crate) struct GroupFactors {
    pub encoder: Mat,
    pub decoder: Mat,
    pub ms: Vec<Mat>,
}

pub(crate) fn group_factors(adapter: &Adapter, layout: &GroupLayout) -> GroupFactors {
    GroupFactors {
        encoder: to_matrix(adapter.tensors[&encoder_key(&layout.name)].view()),
        ..decoder_side(adapter, layout)
    }
}

/// `D` and the `M_l` of one group in f64, with an empty (0 x 0) encoder: for what reads only the
/// decoder side (the report of linear averaging with a non-linear encoder).
pub(crate) fn decoder_side(adapter: &Adapter, layout: &GroupLayout) -> GroupFactors {
    let get = |key: String| to_matrix(adapter.tensors[&key].view());
    GroupFactors {
        encoder: Mat::zeros(0, 0),
        decoder: get(decoder_key(&layout.name)),
        ms: layout.modules.iter().map(|m| get(m_key(m))).collect(),
    }
}

/// Store a group's factors into `out` with the dtypes `like` has for the same tensors.
pub(crate) fn put_group(out: &mut Adapter, like: &Adapter, layout: &GroupLayout, f: &GroupFactors) {
    let mut put = |key: String, m: &Mat| {
        let dtype = like.tensors[&key].dtype;
        out.tensors.insert(key, linalg::to_tensor(m, dtype));
    };
    put(encoder_key(&layout.name), &f.encoder);
    put(decoder_key(&layout.name), &f.decoder);
    for (module, m) in layout.modules.iter().zip(&f.ms) {
        put(m_key(module), m);
    }
}

/// NaN or infinity anywhere is an error naming the adapter and the tensor.
pub fn check_finite(adapter: &Adapter, context: &str) -> Result<()> {
    for (name, tensor) in &adapter.tensors {
        if let Some(pos) = crate::dtype::first_non_finite(tensor.dtype, &tensor.data) {
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
        group_factors(adapter, &layout)
    }

    pub fn set_factors(adapter: &mut Adapter, f: &GroupFactors) {
        let layout = adapter.layout("test").unwrap().remove(0);
        let like = adapter.clone();
        put_group(adapter, &like, &layout, f);
    }
}
