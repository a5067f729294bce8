//! Element types of stored tensors. Only floating types an adapter can hold are accepted, and
//! each has exactly two spellings: the stored (safetensors) name and the same in lower case.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name used by safetensors headers ("F32", "F16", "BF16").
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;

    /// The one dtype parser: `F32`, `F16`, `BF16` (as stored) or `f32`, `f16`, `bf16`; nothing
    /// looser (no other case, no aliases such as `float32` or `half`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::ALL
            .into_iter()
            .find(|d| d.name() == s || d.name().to_ascii_lowercase() == s)
            .ok_or_else(|| format!("unsupported dtype {s:?} (expected F32, F16 or BF16, or the same in lower case)"))
    }
}

impl TryFrom<safetensors::Dtype> for DType {
    type Error = String;

    fn try_from(dtype: safetensors::Dtype) -> Result<Self, Self::Error> {
        match dtype {
            safetensors::Dtype::F32 => Ok(DType::F32),
            safetensors::Dtype::F16 => Ok(DType::F16),
            safetensors::Dtype::BF16 => Ok(DType::BF16),
            other => Err(format!("dtype {other:?}; adapters hold only F32, F16 or BF16")),
        }
    }
}

impl From<DType> for safetensors::Dtype {
    fn from(dtype: DType) -> Self {
        match dtype {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
        }
    }
}

/// Decode little-endian bytes of `dtype` into f32 values.
pub fn to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

/// Decode the first `out.len()` values of little-endian bytes of `dtype` into `out`.
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => out
            .iter_mut()
            .zip(bytes.chunks_exact(4))
            .for_each(|(o, c)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        DType::F16 => {
            out.iter_mut().zip(bytes.chunks_exact(2)).for_each(|(o, c)| *o = f16::from_le_bytes([c[0], c[1]]).to_f32())
        }
        DType::BF16 => {
            out.iter_mut().zip(bytes.chunks_exact(2)).for_each(|(o, c)| *o = bf16::from_le_bytes([c[0], c[1]]).to_f32())
        }
    }
}

/// `acc[i] += w * x[i]` for the values `x` of little-endian bytes of `dtype`, without decoding
/// them into a buffer first (the weighted sums of linear averaging).
pub fn accumulate_f64(dtype: DType, bytes: &[u8], w: f64, acc: &mut [f64]) {
    match dtype {
        DType::F32 => acc
            .iter_mut()
            .zip(bytes.chunks_exact(4))
            .for_each(|(a, c)| *a += w * f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        DType::F16 => acc
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(a, c)| *a += w * f64::from(f16::from_le_bytes([c[0], c[1]]).to_f32())),
        DType::BF16 => acc
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(a, c)| *a += w * f64::from(bf16::from_le_bytes([c[0], c[1]]).to_f32())),
    }
}

/// The index of the first NaN or infinity among the values of little-endian bytes of `dtype`.
pub fn first_non_finite(dtype: DType, bytes: &[u8]) -> Option<usize> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        DType::F16 => bytes.chunks_exact(2).position(|c| !f16::from_le_bytes([c[0], c[1]]).is_finite()),
        DType::BF16 => bytes.chunks_exact(2).position(|c| !bf16::from_le_bytes([c[0], c[1]]).is_finite()),
    }
}

/// Encode f64 values as little-endian bytes of `dtype`, rounded through f32 as `from_f32` does.
pub fn from_f64(dtype: DType, values: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.extend_from_slice(&(*v as f32).to_le_bytes())),
        DType::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v as f32).to_le_bytes())),
        DType::BF16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v as f32).to_le_bytes())),
    }
    out
}

/// Encode f32 values as little-endian bytes of `dtype` (round to nearest even).
pub fn from_f32(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => values.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_parser_is_strict() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
            assert_eq!(d.name().to_ascii_lowercase().parse::<DType>().unwrap(), d);
            assert_eq!(DType::try_from(safetensors::Dtype::from(d)).unwrap(), d);
        }
        for bad in ["I64", "Bf16", "float32", "half", "fp16", "", " F32"] {
            assert!(bad.parse::<DType>().is_err(), "{bad:?}");
        }
        assert!(DType::try_from(safetensors::Dtype::F64).is_err());
    }

    #[test]
    fn conversions_round_trip_exactly_representable_values() {
        let values = [0.0f32, 1.0, -2.5, 0.125, 1024.0];
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(to_f32(d, &from_f32(d, &values)), values);
        }
    }
}
