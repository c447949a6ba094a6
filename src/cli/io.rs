//! Reading and writing safetensors files (written through the runtime's atomic writers).

use super::Fail;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;

/// A parameter tensor: name, shape, data.
pub(crate) type NamedTensor<T> = (String, Vec<usize>, Vec<T>);
/// A tensor's shape and data.
pub(crate) type Shaped = (Vec<usize>, Vec<f64>);

/// Tensors of a safetensors file, converted to f64, by name.
pub(crate) struct TensorFile {
    pub(crate) tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    /// Each tensor's dtype (F32 or F64).
    pub(crate) dtypes: BTreeMap<String, Dtype>,
}

impl TensorFile {
    /// F64 when any tensor is F64, else F32: the precision that holds every tensor exactly.
    pub(crate) fn widest(&self) -> Dtype {
        if self.dtypes.values().any(|&d| d == Dtype::F64) {
            Dtype::F64
        } else {
            Dtype::F32
        }
    }
}

pub(crate) fn read_tensors(path: &Path) -> Result<TensorFile, Fail> {
    let bytes = std::fs::read(path)
        .map_err(|e| Fail(format!("error: cannot read `{}`: {e}", path.display())))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        Fail(format!(
            "error: `{}` is not a valid safetensors file: {e}",
            path.display()
        ))
    })?;
    let mut tensors = BTreeMap::new();
    let mut dtypes = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = to_f64(&view).ok_or_else(|| {
            Fail(format!(
                "error: tensor `{name}` in `{}` has dtype {:?}; optc reads F32 and F64 here",
                path.display(),
                view.dtype()
            ))
        })?;
        dtypes.insert(name.clone(), view.dtype());
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    Ok(TensorFile { tensors, dtypes })
}

fn to_f64(v: &TensorView<'_>) -> Option<Vec<f64>> {
    let d = v.data();
    match v.dtype() {
        Dtype::F32 => Some(
            d.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
        ),
        Dtype::F64 => Some(
            d.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ),
        _ => None,
    }
}

/// A safetensors file of `(name, dtype, shape, little-endian bytes)` tensors, with metadata,
/// byte for byte the same for the same tensors: the header is one JSON object with sorted keys
/// (tensors and metadata), the data laid out by dtype size (8-byte dtypes first, so every tensor
/// is aligned to its dtype) and then by name.
pub(crate) fn tensors_bytes(
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    meta: &BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    let mut order: Vec<&(String, Dtype, Vec<usize>, Vec<u8>)> = tensors.iter().collect();
    order.sort_by(|a, b| {
        b.1.bitsize()
            .cmp(&a.1.bitsize())
            .then_with(|| a.0.cmp(&b.0))
    });
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in &order {
        let elems: usize = shape.iter().product();
        if elems * dtype.bitsize() / 8 != bytes.len() {
            return Err(format!(
                "tensor `{name}`: {} bytes for shape {shape:?}",
                bytes.len()
            ));
        }
        if name == "__metadata__" || header.contains_key(name.as_str()) {
            return Err(format!("tensor name `{name}` used twice or reserved"));
        }
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": format!("{dtype:?}"),
                "shape": shape,
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
    }
    if !meta.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(meta));
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + offset);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    for (_, _, _, bytes) in &order {
        out.extend_from_slice(bytes);
    }
    Ok(out)
}
