//! `glimpse convert`: writes an fp16 copy of a checkpoint folder (one `model.safetensors`) so
//! later loads map every tensor in place. Non-float tensors and side files are copied unchanged.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use half::f16;
use safetensors::tensor::{Dtype as StDtype, View};

use crate::error::{Error, Result};
use crate::weights::{Checkpoint, Dtype};

struct Converted<'a> {
    ckpt: &'a Checkpoint,
    name: String,
    shape: Vec<usize>,
    dtype: StDtype,
    /// Stored dtype is a float glimpse widens/narrows to fp16.
    to_f16: bool,
}

impl View for &Converted<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let (_, bytes) = self.ckpt.raw_bytes(&self.name).expect("tensor listed by the checkpoint");
        if !self.to_f16 {
            return Cow::Borrowed(bytes);
        }
        let shape = self.shape.clone();
        let w = self.ckpt.f16(&self.name, &shape).expect("shape taken from the checkpoint");
        Cow::Owned(w.as_slice().iter().flat_map(|v: &f16| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        let n: usize = self.shape.iter().product();
        if self.to_f16 {
            n * 2
        } else {
            self.ckpt.info(&self.name).map_or(0, |i| i.byte_len())
        }
    }
}

fn st_dtype(name: &str) -> Option<StDtype> {
    Some(match name {
        "BOOL" => StDtype::BOOL,
        "U8" => StDtype::U8,
        "I8" => StDtype::I8,
        "I16" => StDtype::I16,
        "U16" => StDtype::U16,
        "I32" => StDtype::I32,
        "U32" => StDtype::U32,
        "I64" => StDtype::I64,
        "U64" => StDtype::U64,
        "F64" => StDtype::F64,
        _ => return None,
    })
}

/// Converts the model folder `input` into `output` (created; must not hold a checkpoint yet).
/// Returns (tensors written, bytes of tensor data).
pub fn convert_dir(input: &Path, output: &Path) -> Result<(usize, usize)> {
    let ckpt = Checkpoint::open_dir(input)?;
    if output.join("model.safetensors").exists() {
        return Err(Error::InvalidInput(format!("{} already holds a model.safetensors; refusing to overwrite", output.display())));
    }
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    let mut tensors = Vec::new();
    for name in ckpt.names() {
        let Some(info) = ckpt.info(name) else { continue };
        let (dtype, to_f16) = match info.dtype {
            Dtype::F16 | Dtype::BF16 | Dtype::F32 => (StDtype::F16, true),
            Dtype::Other { name: dt, .. } => match st_dtype(dt) {
                Some(d) => (d, false),
                None => continue, // fp8 and friends: nothing glimpse reads; leave them out
            },
        };
        tensors.push(Converted { ckpt: &ckpt, name: name.to_string(), shape: info.shape.clone(), dtype, to_f16 });
    }
    let bytes: usize = tensors.iter().map(|t| (&t).data_len()).sum();
    let count = tensors.len();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let target = output.join("model.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|t| (t.name.clone(), t)), Some(metadata), &target)
        .map_err(|e| Error::safetensors(&target, e.to_string()))?;

    // Side files: configs, tokenizer, processor; not the old weights.
    for entry in std::fs::read_dir(input).map_err(|e| Error::io(input, e))? {
        let entry = entry.map_err(|e| Error::io(input, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let is_weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json" || name.ends_with(".bin");
        if entry.path().is_file() && !is_weights {
            std::fs::copy(entry.path(), output.join(&name)).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok((count, bytes))
}
