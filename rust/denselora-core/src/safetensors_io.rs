//! Plain safetensors files: an 8-byte little-endian header length, a JSON header, then the data.
//! Both directions go through the reference `safetensors` crate: it validates every offset on
//! reading and lays out (and aligns) the header on writing.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::View;
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

/// Where one tensor lies in a safetensors file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpan {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub length: usize,
}

impl View for TensorRef<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.into()
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The file bytes of `tensors` and `metadata`. Each tensor's byte length must match its shape.
pub fn serialize_safetensors(
    path: &Path,
    tensors: &[(&str, TensorRef<'_>)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut names: Vec<&str> = tensors.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|p| p[0] == p[1]) {
        return Err(Error::format(path, format!("tensor {:?} is given twice", pair[0])));
    }
    for (name, t) in tensors {
        if t.numel().checked_mul(t.dtype.size()) != Some(t.data.len()) {
            return Err(Error::format(
                path,
                format!("tensor {name:?}: {} bytes do not hold shape {:?} of {}", t.data.len(), t.shape, t.dtype),
            ));
        }
    }
    let info: Option<HashMap<String, String>> =
        (!metadata.is_empty()).then(|| metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (*n, *t)), info)
        .map_err(|e| Error::format(path, format!("cannot serialize: {e}")))
}

/// Write a safetensors file atomically (temporary file, fsync, rename).
pub fn save_safetensors(
    path: &Path,
    tensors: &[(&str, TensorRef<'_>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let bytes = serialize_safetensors(path, tensors, metadata)?;
    write_atomically(path, |w| std::io::Write::write_all(w, &bytes).map_err(|e| Error::io(path, e)))
}

/// The metadata and tensor spans of safetensors bytes read from `path` (named in errors), sorted
/// by name; no tensor data is copied.
pub fn parse_spans(bytes: &[u8], path: &Path) -> Result<(BTreeMap<String, String>, Vec<TensorSpan>)> {
    let bad = |e: safetensors::SafeTensorError| Error::format(path, format!("not a valid safetensors file: {e}"));
    // `read_metadata` validates every offset against the buffer; parsing the header once is
    // enough (`SafeTensors::deserialize` would parse it again).
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(bad)?;
    let start = 8 + header_len;
    let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    let mut spans = Vec::with_capacity(meta.tensors().len());
    for (name, info) in meta.tensors() {
        let dtype = DType::try_from(info.dtype).map_err(|m| Error::format(path, format!("tensor {name:?} has {m}")))?;
        let (begin, end) = info.data_offsets;
        spans.push(TensorSpan { name, dtype, shape: info.shape.clone(), offset: start + begin, length: end - begin });
    }
    spans.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((metadata, spans))
}

/// Parse safetensors bytes read from `path` (named in errors) into owned tensors.
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<SafetensorsContents> {
    let (metadata, spans) = parse_spans(bytes, path)?;
    let tensors = spans
        .into_iter()
        .map(|s| {
            let data = bytes[s.offset..s.offset + s.length].to_vec();
            (s.name, Tensor { dtype: s.dtype, shape: s.shape, data })
        })
        .collect();
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
