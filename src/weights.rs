//! Checkpoint tensors: safetensors files memory-mapped with memmap2, a single `model.safetensors`
//! or a sharded `model.safetensors.index.json`. fp16 tensors are used in place; bf16 and fp32
//! are converted to fp16 on access. Every error names the file, the tensor and both shapes.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Largest header safetensors itself accepts (100 MB); a longer one is corruption or an attack.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element types that may appear in a safetensors header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F16,
    BF16,
    F32,
    /// A known safetensors dtype glimpse never computes with (e.g. I64 `position_ids`): it may sit
    /// in a checkpoint, but asking for it is an error.
    Other {
        name: &'static str,
        bytes: usize,
    },
}

impl Dtype {
    fn parse(name: &str) -> Option<Dtype> {
        const OTHERS: [(&str, usize); 13] = [
            ("BOOL", 1),
            ("U8", 1),
            ("I8", 1),
            ("F8_E5M2", 1),
            ("F8_E4M3", 1),
            ("F8_E8M0", 1),
            ("I16", 2),
            ("U16", 2),
            ("I32", 4),
            ("U32", 4),
            ("F64", 8),
            ("I64", 8),
            ("U64", 8),
        ];
        match name {
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::BF16),
            "F32" => Some(Dtype::F32),
            _ => OTHERS.iter().find(|(n, _)| *n == name).map(|&(name, bytes)| Dtype::Other { name, bytes }),
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 => 4,
            Dtype::Other { bytes, .. } => bytes,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::Other { name, .. } => name,
        }
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    file: usize,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn byte_len(&self) -> usize {
        self.end - self.start
    }
}

/// fp16 data of one tensor: borrowed from the memory map when stored as aligned fp16, else owned.
#[derive(Clone)]
enum F16Data {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Arc<Vec<f16>>),
    /// Quantized at load (`crate::quant`): no fp16 data is kept.
    Quantized(Arc<crate::quant::QuantTensor>),
}

/// One fp16 weight tensor with its shape.
#[derive(Clone)]
pub struct Weight {
    pub shape: Vec<usize>,
    data: F16Data,
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weight")
            .field("shape", &self.shape)
            .field("zero_copy", &self.is_mapped())
            .field("quantized", &self.quantized().map(|q| q.format))
            .finish()
    }
}

impl Weight {
    pub fn from_vec(shape: Vec<usize>, data: Vec<f16>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Weight { shape, data: F16Data::Owned(Arc::new(data)) }
    }

    /// A weight quantized at load ([`crate::quant`]); its fp16 data is gone.
    pub fn from_quantized(q: crate::quant::QuantTensor) -> Self {
        Weight { shape: vec![q.rows, q.cols], data: F16Data::Quantized(Arc::new(q)) }
    }

    /// The quantized form, for weights quantized at load (None: an fp16 weight).
    pub fn quantized(&self) -> Option<&crate::quant::QuantTensor> {
        match &self.data {
            F16Data::Quantized(q) => Some(q),
            _ => None,
        }
    }

    /// Bytes a kernel reads to use the whole weight: 2 per element in fp16, the quantized
    /// values and their fp16 scales otherwise.
    pub fn stored_bytes(&self) -> usize {
        self.quantized().map_or(self.numel() * 2, |q| q.bytes())
    }

    /// The fp16 values. A weight quantized at load has none and gives an empty slice: only
    /// `Op::Linear` reads quantized weights, through [`Weight::quantized`] (`crate::quant` only
    /// quantizes weights no other op reads; the CUDA executor refuses quantized tables).
    pub fn as_slice(&self) -> &[f16] {
        match &self.data {
            F16Data::Quantized(_) => &[],
            // The range was checked against the file size when the header was parsed, and
            // `start` is even, so the cast cannot fail.
            F16Data::Mapped { map, start, len } => bytemuck::cast_slice(&map[*start..*start + *len]),
            F16Data::Owned(v) => v,
        }
    }

    /// True when the tensor is read in place from the memory map (no copy was made).
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, F16Data::Mapped { .. })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct MappedFile {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// The tensors of a checkpoint, possibly spread over several shard files, or made in memory
/// (random weights for benchmarks and `glimpse synth`).
pub struct Checkpoint {
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorInfo>,
    /// In-memory fp16 tensors (they have no `TensorInfo`).
    in_memory: BTreeMap<String, Weight>,
    /// What error messages call the checkpoint (the single file or the index).
    origin: PathBuf,
    /// `Some` for [`Checkpoint::recording`]: the tensors asked for so far, in order.
    recorded: Option<std::sync::Mutex<Vec<Requested>>>,
}

/// A tensor a model's `load` asked a [`Checkpoint::recording`] for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    pub name: String,
    pub shape: Vec<usize>,
    /// The dtype the loader reads it as (the loader reads every weight as fp16).
    pub dtype: Dtype,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// `model.safetensors.index.json`: which shard file holds each tensor.
#[doc(hidden)]
#[derive(Debug, Deserialize)]
pub struct ShardIndex {
    pub weight_map: HashMap<String, String>,
}

impl ShardIndex {
    /// The shard file names, sorted, each once.
    pub fn shards(&self) -> Vec<&String> {
        let mut names: Vec<&String> = self.weight_map.values().collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Parses a shard index and checks that every shard is a plain file name in the model folder.
/// Public for the fuzzer.
#[doc(hidden)]
pub fn parse_shard_index(bytes: &[u8], path: &Path) -> Result<ShardIndex> {
    let index: ShardIndex = crate::json::from_json_slice(bytes, path)?;
    for shard in index.shards() {
        if shard.is_empty() || shard.contains('/') || shard.contains('\\') || shard == ".." || shard == "." {
            return Err(Error::safetensors(
                path,
                format!("shard name `{shard}` must be a file name in the model folder"),
            ));
        }
    }
    Ok(index)
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("origin", &self.origin).field("tensors", &self.tensors.len()).finish()
    }
}

impl Checkpoint {
    /// Opens the weights of an HF model folder: `model.safetensors`, else the sharded index.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open_file(&single);
        }
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            return Self::open_index(&index);
        }
        if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
            return Err(Error::Unsupported(format!(
                "{}: only pickle weights (pytorch_model.bin) found; glimpse reads safetensors (convert them with transformers' save_pretrained(safe_serialization=True))",
                dir.display()
            )));
        }
        Err(Error::MissingFile { path: single, hint: " (nor model.safetensors.index.json)".into() })
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut ckpt = Checkpoint {
            files: Vec::new(),
            tensors: BTreeMap::new(),
            in_memory: BTreeMap::new(),
            origin: path.to_path_buf(),
            recorded: None,
        };
        let (file, entries) = map_and_parse(path, 0)?;
        ckpt.files.push(file);
        ckpt.tensors = entries.into_iter().collect();
        Ok(ckpt)
    }

    /// Opens a sharded checkpoint from its `model.safetensors.index.json`.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        let bytes = crate::files::read(index_path, crate::files::MAX_CONFIG_BYTES)?;
        let index = parse_shard_index(&bytes, index_path)?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut ckpt = Checkpoint {
            files: Vec::new(),
            tensors: BTreeMap::new(),
            in_memory: BTreeMap::new(),
            origin: index_path.to_path_buf(),
            recorded: None,
        };
        for shard in index.shards() {
            let path = dir.join(shard);
            let file_idx = ckpt.files.len();
            let (file, entries) = map_and_parse(&path, file_idx)?;
            ckpt.files.push(file);
            for (name, info) in entries {
                if ckpt.tensors.contains_key(&name) {
                    return Err(Error::safetensors(&path, format!("tensor `{name}` appears in more than one shard")));
                }
                ckpt.tensors.insert(name, info);
            }
        }
        for (name, shard) in &index.weight_map {
            match ckpt.tensors.get(name) {
                Some(info)
                    if ckpt.files[info.file].path.file_name().map(|f| f.to_string_lossy() == *shard.as_str())
                        == Some(true) => {}
                Some(info) => {
                    return Err(Error::safetensors(
                        index_path,
                        format!(
                            "index puts `{name}` in {shard}, but it is in {}",
                            ckpt.files[info.file].path.display()
                        ),
                    ))
                }
                None => {
                    return Err(Error::safetensors(
                        index_path,
                        format!("index lists `{name}` in {shard}, but that shard does not hold it"),
                    ))
                }
            }
        }
        Ok(ckpt)
    }

    /// A checkpoint of fp16 tensors held in memory; `origin` names it in messages.
    pub fn in_memory(origin: &str, tensors: impl IntoIterator<Item = (String, Weight)>) -> Self {
        Checkpoint {
            files: Vec::new(),
            tensors: BTreeMap::new(),
            in_memory: tensors.into_iter().collect(),
            origin: PathBuf::from(origin),
            recorded: None,
        }
    }

    /// The same checkpoint named after `origin`: families that read files next to the weights
    /// (InstructBLIP's `qformer_tokenizer/`) look for them in its folder.
    pub fn with_origin(mut self, origin: impl Into<PathBuf>) -> Self {
        self.origin = origin.into();
        self
    }

    /// A checkpoint that holds nothing and answers every [`Checkpoint::f16`] with zeros of the
    /// asked shape, logging (name, shape, dtype): running a model's `load` on it lists exactly
    /// the tensors that model reads (`glimpse synth` writes those). `contains` is true only for
    /// tensors already asked for, so optional tensors (a tied lm_head, the older split qkv
    /// biases) take the loader's default, as transformers writes them. The zeros are lazily
    /// mapped anonymous memory: recording a 7B model costs no RAM.
    pub fn recording(origin: &str) -> Self {
        Checkpoint {
            files: Vec::new(),
            tensors: BTreeMap::new(),
            in_memory: BTreeMap::new(),
            origin: PathBuf::from(origin),
            recorded: Some(std::sync::Mutex::new(Vec::new())),
        }
    }

    /// Whether this is a [`Checkpoint::recording`] (its tensors hold no data worth reading).
    pub fn is_recording(&self) -> bool {
        self.recorded.is_some()
    }

    /// The tensors asked for so far, in first-asked order (empty unless [`Checkpoint::recording`]).
    pub fn requested(&self) -> Vec<Requested> {
        self.recorded.as_ref().map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).clone()).unwrap_or_default()
    }

    /// Logs `name` (a second request must repeat its shape) and returns zeros of `shape`.
    fn record(&self, log: &std::sync::Mutex<Vec<Requested>>, name: &str, shape: &[usize]) -> Result<Weight> {
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        match log.iter().find(|r| r.name == name) {
            Some(r) if r.shape != shape => {
                return Err(Error::ShapeMismatch {
                    name: name.into(),
                    path: self.origin.clone(),
                    expected: shape.to_vec(),
                    found: r.shape.clone(),
                })
            }
            Some(_) => {}
            None => log.push(Requested { name: name.into(), shape: shape.to_vec(), dtype: Dtype::F16 }),
        }
        let len = shape.iter().product::<usize>() * 2;
        // A private read-only anonymous map: zero pages, never committed.
        let map = memmap2::MmapOptions::new()
            .len(len.max(2))
            .map_anon()
            .and_then(|m| m.make_read_only())
            .map_err(|e| Error::io(self.origin.clone(), e))?;
        Ok(Weight { shape: shape.to_vec(), data: F16Data::Mapped { map: Arc::new(map), start: 0, len } })
    }

    /// The in-memory tensors (empty for a checkpoint read from files).
    pub fn memory_tensors(&self) -> impl Iterator<Item = (&str, &Weight)> {
        self.in_memory.iter().map(|(n, w)| (n.as_str(), w))
    }

    /// Where the checkpoint came from (a file, or the shard index).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().chain(self.in_memory.keys()).map(|s| s.as_str())
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
            || self.in_memory.contains_key(name)
            || self
                .recorded
                .as_ref()
                .is_some_and(|r| r.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|t| t.name == name))
    }

    /// Path of the file holding `name` (for messages).
    pub fn path_of(&self, name: &str) -> &Path {
        self.tensors.get(name).map(|i| self.files[i.file].path.as_path()).unwrap_or(&self.origin)
    }

    /// Total bytes of tensor data on disk.
    pub fn data_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.byte_len()).sum()
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.files[info.file].map[info.start..info.end]
    }

    fn lookup(&self, name: &str, expected: &[usize]) -> Result<&TensorInfo> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            expected: expected.to_vec(),
            path: self.origin.clone(),
        })?;
        if info.shape != expected {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                path: self.path_of(name).to_path_buf(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok(info)
    }

    fn unsupported(&self, name: &str, info: &TensorInfo) -> Error {
        Error::UnsupportedDtype {
            name: name.into(),
            path: self.path_of(name).to_path_buf(),
            dtype: info.dtype.name().into(),
        }
    }

    /// The fp16 weight `name`, which must have exactly shape `expected`. fp16 data stays in the
    /// memory map; bf16/fp32 are converted (round to nearest even, as torch's `.half()`).
    pub fn f16(&self, name: &str, expected: &[usize]) -> Result<Weight> {
        if let Some(log) = &self.recorded {
            return self.record(log, name, expected);
        }
        if let Some(w) = self.in_memory.get(name) {
            if w.shape != expected {
                return Err(Error::ShapeMismatch {
                    name: name.into(),
                    path: self.origin.clone(),
                    expected: expected.to_vec(),
                    found: w.shape.clone(),
                });
            }
            return Ok(w.clone());
        }
        let info = self.lookup(name, expected)?;
        let bytes = self.bytes(info);
        let data = match info.dtype {
            Dtype::F16 if info.start % 2 == 0 => {
                F16Data::Mapped { map: self.files[info.file].map.clone(), start: info.start, len: info.byte_len() }
            }
            Dtype::F16 => {
                F16Data::Owned(Arc::new(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect()))
            }
            Dtype::BF16 => F16Data::Owned(Arc::new(
                bytes.chunks_exact(2).map(|b| f16::from_f32(bf16::from_le_bytes([b[0], b[1]]).to_f32())).collect(),
            )),
            Dtype::F32 => {
                let f32s = read_f32_le(bytes);
                let mut out = vec![f16::ZERO; f32s.len()];
                out.convert_from_f32_slice(&f32s);
                F16Data::Owned(Arc::new(out))
            }
            Dtype::Other { .. } => return Err(self.unsupported(name, info)),
        };
        Ok(Weight { shape: info.shape.clone(), data })
    }

    /// The tensor `name` widened to f32, with its shape (for goldens and fp32 reference paths).
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        // A recording checkpoint logs it as a scalar (the only tensor read this way is CLIP's
        // `logit_scale`, shape [] as transformers stores it).
        if let Some(log) = &self.recorded {
            self.record(log, name, &[])?;
            return Ok((vec![0.0], Vec::new()));
        }
        if let Some(w) = self.in_memory.get(name) {
            return Ok((w.as_slice().iter().map(|v| v.to_f32()).collect(), w.shape.clone()));
        }
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            expected: vec![],
            path: self.origin.clone(),
        })?;
        let bytes = self.bytes(info);
        let data = match info.dtype {
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F32 => read_f32_le(bytes),
            Dtype::Other { .. } => return Err(self.unsupported(name, info)),
        };
        Ok((data, info.shape.clone()))
    }

    /// Every floating-point tensor (F16, BF16, F32, F64) holding NaN or infinite values, in name
    /// order. Reads every byte of the checkpoint, in parallel (`glimpse info --check-weights`;
    /// a load does not, see README "Models").
    pub fn non_finite(&self) -> Vec<NonFinite> {
        use rayon::prelude::*;
        let scan = |dtype: &'static str, bytes: &[u8]| match dtype {
            "F16" => Some(non_finite_16(bytes, F16_BITS.0, F16_BITS.1)),
            "BF16" => Some(non_finite_16(bytes, 0x7f80, 0x007f)),
            "F32" => Some(non_finite_32(bytes, 0x7f80_0000, 0x007f_ffff)),
            "F64" => Some(non_finite_64(bytes, 0x7ff0_0000_0000_0000, 0x000f_ffff_ffff_ffff)),
            _ => None,
        };
        let on_disk = self.tensors.par_iter().filter_map(|(name, info)| {
            let (nan, inf) = scan(info.dtype.name(), self.bytes(info))?;
            (nan + inf > 0).then(|| NonFinite {
                name: name.clone(),
                dtype: info.dtype.name(),
                shape: info.shape.clone(),
                nan,
                inf,
            })
        });
        let in_memory = self.in_memory.par_iter().filter_map(|(name, w)| {
            let (nan, inf) = non_finite_16(bytemuck::cast_slice(w.as_slice()), F16_BITS.0, F16_BITS.1);
            (nan + inf > 0).then(|| NonFinite { name: name.clone(), dtype: "F16", shape: w.shape.clone(), nan, inf })
        });
        let mut found: Vec<NonFinite> = on_disk.chain(in_memory).collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        found
    }

    /// Raw little-endian bytes of a tensor, whatever its dtype (for `glimpse convert`).
    pub fn raw_bytes(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        self.tensors.get(name).map(|info| (info, self.bytes(info)))
    }
}

/// A tensor holding values that are not finite (NaN or ±infinity), as
/// [`Checkpoint::non_finite`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonFinite {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub nan: usize,
    pub inf: usize,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let numel: usize = self.shape.iter().product();
        write!(
            f,
            "{} ({} {:?}): {} NaN, {} infinite of {numel} values",
            self.name, self.dtype, self.shape, self.nan, self.inf
        )
    }
}

/// Counters of the floats of one width whose exponent bits are all ones (NaN or infinite).
macro_rules! non_finite_counter {
    ($name:ident, $t:ty) => {
        /// (NaN, infinite) values among the little-endian floats of `bytes` whose exponent and
        /// mantissa bits are `exp` and `man`, read in parallel: a branch-free count of all-ones
        /// exponents per 1 MiB block (about 3 GB/s a core), sorted into NaN and infinity only in a
        /// block that has any.
        fn $name(bytes: &[u8], exp: $t, man: $t) -> (usize, usize) {
            use rayon::prelude::*;
            const N: usize = std::mem::size_of::<$t>();
            let word = |c: &[u8]| <$t>::from_le_bytes(c.try_into().unwrap_or_default());
            bytes
                .par_chunks((1 << 20) / N * N)
                .map(|block| {
                    // A block holds fewer than 2^32 values: a u32 count vectorizes.
                    let odd = block.chunks_exact(N).fold(0u32, |k, c| k + u32::from(word(c) & exp == exp)) as usize;
                    if odd == 0 {
                        return (0, 0);
                    }
                    let nan = block.chunks_exact(N).filter(|c| word(c) & exp == exp && word(c) & man != 0).count();
                    (nan, odd - nan)
                })
                .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        }
    };
}
non_finite_counter!(non_finite_16, u16);
non_finite_counter!(non_finite_32, u32);
non_finite_counter!(non_finite_64, u64);

/// The exponent and mantissa bits of an fp16 value.
const F16_BITS: (u16, u16) = (0x7c00, 0x03ff);

fn read_f32_le(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Maps a safetensors file and validates its header (see [`parse_safetensors`]).
fn map_and_parse(path: &Path, file_idx: usize) -> Result<(MappedFile, Vec<(String, TensorInfo)>)> {
    crate::files::check_regular(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len < 8 {
        return Err(too_short(path, file_len));
    }
    // SAFETY: the map is read-only and private to this process; glimpse never writes through it.
    // A file truncated by another process while mapped would fault, as with any mmap-based
    // loader (safetensors, transformers); checkpoints are not expected to change under us.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let mut entries = parse_safetensors(&map, path)?;
    for (_, info) in &mut entries {
        info.file = file_idx;
    }
    Ok((MappedFile { path: path.to_path_buf(), map: Arc::new(map) }, entries))
}

fn too_short(path: &Path, len: u64) -> Error {
    Error::safetensors(
        path,
        format!("truncated: the file is {len} bytes, shorter than the 8-byte header length that starts every safetensors file"),
    )
}

/// Validates the header of a whole safetensors file held in `bytes`: length, JSON, dtypes,
/// shapes against byte ranges, ranges inside the data section, no two tensors overlapping.
/// Returns each tensor's place (file index 0). Public for the fuzzer.
#[doc(hidden)]
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<Vec<(String, TensorInfo)>> {
    let bad = |msg: String| Error::safetensors(path, msg);
    let file_len = bytes.len() as u64;
    let Some(len_bytes) = bytes.first_chunk::<8>() else {
        return Err(too_short(path, file_len));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > file_len - 8 {
        return Err(bad(format!(
            "header length {header_len} runs past the end of the file ({file_len} bytes): the file is truncated or not safetensors"
        )));
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!("header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")));
    }
    let data_start = 8 + header_len as usize;
    let data_len = bytes.len() - data_start;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;

    let mut entries = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry =
            serde_json::from_value(value).map_err(|e| bad(format!("tensor `{name}`: bad header entry: {e}")))?;
        let dtype = Dtype::parse(&entry.dtype)
            .ok_or_else(|| bad(format!("tensor `{name}`: unknown dtype `{}`", entry.dtype)))?;
        let [begin, end] = entry.data_offsets;
        if begin > end || end > data_len {
            return Err(bad(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] are out of range (the data section is {data_len} bytes)"
            )));
        }
        let numel = entry.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let needed = numel.and_then(|n| n.checked_mul(dtype.size()));
        if needed != Some(end - begin) {
            return Err(bad(format!(
                "tensor `{name}`: shape {:?} of {} needs {} bytes, but data_offsets [{begin}, {end}] span {}",
                entry.shape,
                dtype.name(),
                needed.map_or("too many".to_string(), |n| n.to_string()),
                end - begin
            )));
        }
        entries.push((
            name,
            TensorInfo { dtype, shape: entry.shape, file: 0, start: data_start + begin, end: data_start + end },
        ));
    }
    let mut by_start: Vec<&(String, TensorInfo)> = entries.iter().filter(|(_, i)| i.end > i.start).collect();
    by_start.sort_by_key(|(_, i)| i.start);
    for pair in by_start.windows(2) {
        let ((a, ia), (b, ib)) = (pair[0], pair[1]);
        if ib.start < ia.end {
            return Err(bad(format!(
                "tensors `{a}` (bytes {}..{}) and `{b}` (bytes {}..{}) overlap",
                ia.start - data_start,
                ia.end - data_start,
                ib.start - data_start,
                ib.end - data_start
            )));
        }
    }
    Ok(entries)
}
