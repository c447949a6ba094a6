//! Reading and writing safetensors files (every write atomic, through the runtime's one writer).

use super::Fail;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A parameter tensor: name, shape, data.
pub(crate) type NamedTensor<T> = (String, Vec<usize>, Vec<T>);
/// A tensor's shape and data.
pub(crate) type Shaped = (Vec<usize>, Vec<f64>);

/// Tensors of a safetensors file, converted to f64, by name.
pub(crate) struct TensorFile {
    pub(crate) tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    pub(crate) dtype: Dtype,
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
    let mut dtype = Dtype::F32;
    for (name, view) in st.tensors() {
        let data = to_f64(&view).ok_or_else(|| {
            Fail(format!(
                "error: tensor `{name}` in `{}` has dtype {:?}; optc reads F32 and F64 here",
                path.display(),
                view.dtype()
            ))
        })?;
        dtype = view.dtype();
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    Ok(TensorFile { tensors, dtype })
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

/// A safetensors file of `(name, shape, little-endian bytes)` tensors of one dtype, with metadata.
pub(crate) fn tensors_bytes(
    dtype: Dtype,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, bytes)| Ok((n.clone(), TensorView::new(dtype, shape.clone(), bytes)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    safetensors::serialize(views, Some(meta))
}

/// Writes a file atomically ([`optc::runtime::checkpoint::write_file_atomic`]: a temporary file
/// beside it, fsync, rename; removed on any error).
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Fail> {
    optc::runtime::checkpoint::write_file_atomic(path, bytes)
        .map_err(|e| Fail(format!("error: cannot write `{}`: {e}", path.display())))
}
