//! `glimpse convert`: writes an fp16 copy of a checkpoint folder (one `model.safetensors`) so
//! later loads map every tensor in place. Non-float tensors and side files are copied unchanged.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

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
///
/// `output` may not be, contain, or lie inside `input` (writing there would replace the files
/// being read). Every file is written atomically, side files first and `model.safetensors` last,
/// so a failed run leaves no partial file and running it again completes the folder.
pub fn convert_dir(input: &Path, output: &Path) -> Result<(usize, usize)> {
    check_disjoint(input, output)?;
    let ckpt = Checkpoint::open_dir(input)?;
    let target = output.join("model.safetensors");
    if target.exists() {
        return Err(Error::InvalidInput(format!(
            "{} already holds a model.safetensors; refusing to overwrite it (pick a new or empty output folder)",
            output.display()
        )));
    }
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    // Now that it exists, compare the real folder (`..` or symlinks among the new components).
    check_disjoint(input, output)?;

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

    // Side files: configs, tokenizer, processor; not the old weights.
    for entry in std::fs::read_dir(input).map_err(|e| Error::io(input, e))? {
        let entry = entry.map_err(|e| Error::io(input, e))?;
        let name = entry.file_name();
        let lossy = name.to_string_lossy();
        let is_weights =
            lossy.ends_with(".safetensors") || lossy == "model.safetensors.index.json" || lossy.ends_with(".bin");
        if entry.path().is_file() && !is_weights {
            let src = entry.path();
            // Side files are small (configs, tokenizer): read whole, so a read error names the source.
            let content = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_atomic(&output.join(&name), |tmp| std::fs::write(tmp, &content))?;
        }
    }

    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_atomic(&target, |tmp| {
        safetensors::serialize_to_file(tensors.iter().map(|t| (t.name.clone(), t)), Some(metadata), tmp).map_err(|e| {
            match e {
                safetensors::SafeTensorError::IoError(source) => source,
                other => std::io::Error::other(format!("cannot serialize the converted tensors: {other}")),
            }
        })
    })?;
    Ok((count, bytes))
}

/// Writes `path` through a temporary file in the same folder: `fill` writes the temp file, which
/// is then fsynced and renamed over `path`, and the folder is fsynced. On any failure the temp
/// file is removed, so `path` is either untouched or complete.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.glimpse-tmp-{}", std::process::id()));
    let result =
        fill(&tmp).and_then(|()| std::fs::File::open(&tmp)?.sync_all()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(source) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Io { path: path.to_path_buf(), source });
    }
    // Makes the rename itself durable; not every filesystem allows syncing a folder.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The canonical form of `path`, which need not exist: its nearest existing ancestor is
/// canonicalised and the missing components are appended (they cannot be symlinks, so `..`
/// among them is resolved lexically).
pub fn canonical_target(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| Error::io(".", e))?.join(path)
    };
    let mut missing = Vec::new();
    let mut base = abs.as_path();
    let canon = loop {
        match base.canonicalize() {
            Ok(c) => break c,
            Err(_) => {
                let (Some(parent), Some(name)) = (base.parent(), base.components().next_back()) else {
                    return Err(Error::InvalidInput(format!("{}: no existing folder above this path", path.display())));
                };
                missing.push(name.as_os_str().to_os_string());
                base = parent;
            }
        }
    };
    let mut out = canon;
    for name in missing.iter().rev() {
        match Path::new(name).components().next() {
            Some(Component::ParentDir) => {
                out.pop();
            }
            Some(Component::CurDir) | None => {}
            Some(_) => out.push(name),
        }
    }
    Ok(out)
}

/// Fails when `output` is `input`, lies inside it, or contains it (compared as canonical paths).
pub fn check_disjoint(input: &Path, output: &Path) -> Result<()> {
    let (i, o) = (input.canonicalize().map_err(|e| Error::io(input, e))?, canonical_target(output)?);
    let relation = if o == i {
        "is the input folder"
    } else if o.starts_with(&i) {
        "is inside the input folder"
    } else if i.starts_with(&o) {
        "contains the input folder"
    } else {
        return Ok(());
    };
    let resolved =
        |given: &Path, real: &Path| if given == real { String::new() } else { format!(" (= {})", real.display()) };
    Err(Error::InvalidInput(format!(
        "output {}{} {relation} {}{}: convert reads the checkpoint while it writes, so the output must be a separate folder, neither the input, inside it nor above it; pick another output folder",
        output.display(),
        resolved(output, &o),
        input.display(),
        resolved(input, &i),
    )))
}
