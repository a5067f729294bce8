//! Plain safetensors files: an 8-byte little-endian header length, a JSON header, then the data.
//! Reading goes through the reference `safetensors` crate, which validates every offset.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use safetensors::SafeTensors;

use crate::atomic::write_atomically;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorRef};

/// Everything a safetensors file holds: its free-form metadata and its tensors.
#[derive(Debug, Default)]
pub struct SafetensorsContents {
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, Tensor>,
}

/// The header JSON, padded with spaces so that the data section starts 8-byte aligned.
fn header_bytes(tensors: &[(&str, TensorRef<'_>)], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map"));
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        let end = offset + t.data.len();
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&header).expect("JSON of strings and numbers");
    while !(bytes.len() + 8).is_multiple_of(8) {
        bytes.push(b' ');
    }
    bytes
}

/// Serialize tensors (written in name order) to `w`. Each tensor's byte length must match its shape.
pub fn write_safetensors<W: Write>(
    w: &mut W,
    path: &Path,
    tensors: &[(&str, TensorRef<'_>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut sorted: Vec<(&str, TensorRef<'_>)> = tensors.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for pair in sorted.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(Error::format(path, format!("tensor {:?} is given twice", pair[0].0)));
        }
    }
    for (name, t) in &sorted {
        if t.numel() * t.dtype.size() != t.data.len() {
            return Err(Error::format(
                path,
                format!("tensor {name:?}: {} bytes do not hold shape {:?} of {}", t.data.len(), t.shape, t.dtype),
            ));
        }
    }
    let header = header_bytes(&sorted, metadata);
    let io = |e| Error::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for (_, t) in &sorted {
        w.write_all(t.data).map_err(io)?;
    }
    Ok(())
}

/// Write a safetensors file atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(&str, TensorRef<'_>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_atomically(path, |w| write_safetensors(w, path, tensors, metadata))
}

/// Parse safetensors bytes read from `path` (named in errors).
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<SafetensorsContents> {
    let bad = |e: safetensors::SafeTensorError| Error::format(path, format!("not a valid safetensors file: {e}"));
    // `read_metadata` validates every offset against the buffer; parsing the header once is
    // enough (`SafeTensors::deserialize` would parse it again).
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(bad)?;
    let data = &bytes[8 + header_len..];
    let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    let mut tensors = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let dtype = DType::try_from(info.dtype).map_err(|m| Error::format(path, format!("tensor {name:?} has {m}")))?;
        let (start, end) = info.data_offsets;
        let tensor = Tensor { dtype, shape: info.shape.clone(), data: data[start..end].to_vec() };
        tensors.insert(name, tensor);
    }
    Ok(SafetensorsContents { metadata, tensors })
}

/// Read a whole safetensors file.
pub fn load_safetensors(path: &Path) -> Result<SafetensorsContents> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(&bytes, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_preserves_bytes_shapes_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::from_f32(DType::F32, vec![2, 3], &[1., 2., 3., 4., 5., 6.]);
        let b = Tensor::from_f32(DType::BF16, vec![1], &[0.5]);
        let meta = BTreeMap::from([("format".to_string(), "denselora".to_string())]);
        save_safetensors(&path, &[("b", b.view()), ("a", a.view())], &meta).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0, "data section must be 8-byte aligned");
        let back = load_safetensors(&path).unwrap();
        assert_eq!(back.metadata, meta);
        assert_eq!(back.tensors["a"], a);
        assert_eq!(back.tensors["b"], b);
    }

    #[test]
    fn truncated_file_is_a_format_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::from_f32(DType::F32, vec![4], &[1., 2., 3., 4.]);
        save_safetensors(&path, &[("a", a.view())], &BTreeMap::new()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 4, 8, bytes.len() - 1] {
            let err = parse_safetensors(&bytes[..cut], &path).unwrap_err();
            assert!(matches!(err, Error::Format { .. }), "cut {cut}: {err}");
            assert!(err.to_string().contains("t.safetensors"));
        }
    }

    #[test]
    fn mismatched_byte_length_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let bad = TensorRef { dtype: DType::F32, shape: &[3], data: &[0u8; 8] };
        assert!(save_safetensors(&path, &[("x", bad)], &BTreeMap::new()).is_err());
        assert!(!path.exists());
    }
}
