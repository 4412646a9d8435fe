//! A small deterministic mutation fuzzer for the parsers that read untrusted files: safetensors
//! headers, shard indexes, config.json, generation_config.json, image-processor configs and
//! image bytes. It runs on stable Rust (no cargo-fuzz): case `i` of a run with seed `s` is a
//! pure function of `(s, i)` (a fixture seed with stacked byte, splice, length and JSON-aware
//! mutations), so any finding is replayed from its two numbers. Each case runs under
//! `catch_unwind` with a time bound and, when the binary installs [`CountingAlloc`], a memory
//! bound; a watchdog thread ends the run on a case that hangs. `examples/fuzz.rs` is the command;
//! tests/fuzz.rs runs a short pass in CI.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// What one fuzz target feeds its input to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `weights::parse_safetensors`: a whole safetensors file in memory.
    Safetensors,
    /// `weights::parse_shard_index`: model.safetensors.index.json.
    ShardIndex,
    /// `models::ModelConfig::from_slice`: config.json, parsed and validated.
    Config,
    /// `config::GenerationConfig::from_slice`.
    GenerationConfig,
    /// `config::PreprocessorConfig::from_slice` and `from_processor_slice` (both layouts).
    Preprocessor,
    /// `image::decode_rgb`, the public decoder entry point.
    Image,
}

impl Target {
    pub const ALL: [Target; 6] = [
        Target::Safetensors,
        Target::ShardIndex,
        Target::Config,
        Target::GenerationConfig,
        Target::Preprocessor,
        Target::Image,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Safetensors => "safetensors",
            Target::ShardIndex => "shard-index",
            Target::Config => "config",
            Target::GenerationConfig => "generation-config",
            Target::Preprocessor => "preprocessor",
            Target::Image => "image",
        }
    }

    pub fn parse(name: &str) -> Result<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
            Error::InvalidInput(format!("unknown fuzz target `{name}` (targets: {}, all)", names.join(", ")))
        })
    }

    fn is_json(self) -> bool {
        !matches!(self, Target::Safetensors | Target::Image)
    }

    /// Feeds one input to the code under test; errors are the expected outcome, panics are not.
    pub fn run(self, input: &[u8]) {
        let path = Path::new("fuzz-input");
        let _ = match self {
            Target::Safetensors => crate::weights::parse_safetensors(input, path).map(drop),
            Target::ShardIndex => crate::weights::parse_shard_index(input, path).map(drop),
            Target::Config => crate::models::ModelConfig::from_slice(input, path).map(drop),
            Target::GenerationConfig => crate::config::GenerationConfig::from_slice(input, path).map(drop),
            Target::Preprocessor => {
                let a = crate::config::PreprocessorConfig::from_slice(input, path).map(drop);
                crate::config::PreprocessorConfig::from_processor_slice(input, path).map(drop).and(a)
            }
            Target::Image => crate::image::decode_rgb(input, "fuzz-input").map(drop),
        };
    }

    /// The seed corpus: files of `fixtures` (tests/fixtures) plus small made-up inputs that
    /// reach deeper than the fixtures alone (a valid safetensors file of a few bytes, images
    /// in every enabled format).
    pub fn seeds(self, fixtures: &Path) -> Result<Vec<Vec<u8>>> {
        let read = |rel: &str| std::fs::read(fixtures.join(rel)).map_err(|e| Error::io(fixtures.join(rel), e));
        let json_seed = |v: Value| serde_json::to_vec_pretty(&v).unwrap_or_default();
        let mut seeds = Vec::new();
        match self {
            Target::Safetensors => {
                for rel in ["blip2-opt-tiny/model.safetensors", "blip2-opt-tiny-proj/model-00003-of-00003.safetensors"]
                {
                    let file = read(rel)?;
                    // The real header over small tensors: same names and layout, kilobytes not MBs.
                    if let Some(small) = shrink_safetensors(&file) {
                        seeds.push(small);
                    }
                    // The real header with its data cut short.
                    let header_end = file.first_chunk::<8>().map_or(0, |l| 8 + u64::from_le_bytes(*l) as usize);
                    seeds.push(file[..(header_end + 64).min(file.len())].to_vec());
                }
                seeds.push(safetensors_file(
                    &[("a", "F16", vec![2, 3]), ("b", "BF16", vec![4]), ("c", "F32", vec![1, 1, 2])],
                    true,
                ));
                seeds.push(safetensors_file(&[("ids", "I64", vec![3]), ("empty", "F16", vec![0, 5])], false));
            }
            Target::ShardIndex => {
                seeds.push(read("blip2-opt-tiny-proj/model.safetensors.index.json")?);
                seeds.push(json_seed(json!({"metadata": {"total_size": 8}, "weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}})));
            }
            Target::Config => {
                seeds.push(read("blip2-opt-tiny/config.json")?);
                seeds.push(read("blip2-opt-tiny-proj/config.json")?);
                for preset in crate::synth::presets() {
                    seeds.push(json_seed(crate::synth::preset_json(preset)?));
                }
            }
            Target::GenerationConfig => {
                seeds.push(read("blip2-opt-tiny/generation_config.json")?);
                seeds.push(json_seed(
                    json!({"max_length": 30, "eos_token_id": [2, 50118], "pad_token_id": 1, "bos_token_id": null}),
                ));
            }
            Target::Preprocessor => {
                seeds.push(read("blip2-opt-tiny/processor_config.json")?);
                seeds.push(read("clip-preprocessor/preprocessor_config.json")?);
            }
            Target::Image => {
                for name in
                    ["tiny_13x9.png", "grey_67x45.png", "greyalpha_40x50.png", "palette_100x80.png", "photo_q90.jpg"]
                {
                    seeds.push(read(&format!("images/{name}"))?);
                }
                seeds.extend(encoded_images());
            }
        }
        Ok(seeds)
    }
}

/// A valid safetensors file with the given tensors (zero data), optionally with metadata.
fn safetensors_file(tensors: &[(&str, &str, Vec<usize>)], metadata: bool) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if metadata {
        header.insert("__metadata__".into(), json!({"format": "pt"}));
    }
    let mut offset = 0;
    for (name, dtype, shape) in tensors {
        let size = match *dtype {
            "F32" => 4,
            "I64" => 8,
            _ => 2,
        };
        let len = shape.iter().product::<usize>() * size;
        header.insert((*name).into(), json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}));
        offset += len;
    }
    let header = serde_json::to_vec(&Value::Object(header)).unwrap_or_default();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.resize(out.len() + offset, 0);
    out
}

/// A real file's header re-laid over 2-element tensors, so the seed is small but has real names.
fn shrink_safetensors(file: &[u8]) -> Option<Vec<u8>> {
    let len = u64::from_le_bytes(*file.first_chunk::<8>()?) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(file.get(8..8 + len)?).ok()?;
    let tensors: Vec<(&str, &str, Vec<usize>)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .take(48)
        .map(|(k, v)| (k.as_str(), v["dtype"].as_str().unwrap_or("F16"), vec![2]))
        .collect();
    Some(safetensors_file(&tensors, true))
}

/// A small image encoded in each format the decoder reads (where the image crate can encode it).
fn encoded_images() -> Vec<Vec<u8>> {
    use image::{ImageFormat, RgbImage, RgbaImage};
    let rgb = RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 40) as u8, 200]));
    let rgba = RgbaImage::from_fn(6, 4, |x, y| image::Rgba([(x * 30) as u8, (y * 50) as u8, 9, (x * y * 20) as u8]));
    let mut out = Vec::new();
    for format in [ImageFormat::Bmp, ImageFormat::Gif, ImageFormat::WebP, ImageFormat::Png, ImageFormat::Jpeg] {
        let mut buf = std::io::Cursor::new(Vec::new());
        if rgb.write_to(&mut buf, format).is_ok() {
            out.push(buf.into_inner());
        }
        let mut buf = std::io::Cursor::new(Vec::new());
        if format != ImageFormat::Jpeg && rgba.write_to(&mut buf, format).is_ok() {
            out.push(buf.into_inner());
        }
    }
    out
}

/// SplitMix64: tiny, fast, and the same on every platform.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Bytes that tend to matter to parsers.
const INTERESTING_BYTES: [u8; 12] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b'[', b'-', b'0', b'9'];

/// Values that break JSON consumers: zero, negatives, the edges of integer types, huge and
/// tiny floats, wrong types.
fn interesting_value(rng: &mut Rng) -> Value {
    match rng.below(22) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1),
        3 => json!(u32::MAX),
        4 => json!(u64::from(u32::MAX) + 1),
        5 => json!(u64::MAX),
        6 => json!(i64::MIN),
        7 => json!(1e300),
        8 => json!(-0.0),
        9 => json!(0.5),
        10 => json!(1e-300),
        11 => json!(""),
        12 => json!("gelu"),
        13 => Value::Null,
        14 => json!(true),
        15 => json!([]),
        16 => json!({}),
        17 => json!([0, 1, 2]),
        18 => json!(1usize << 40),
        19 => json!(usize::MAX / 2),
        20 => json!("F16"),
        _ => json!(rng.below(5000)),
    }
}

/// JSON pointers of every node of `v` (capped, breadth first is not needed).
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    if out.len() > 4096 {
        return;
    }
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                pointers(child, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// One structural mutation of a JSON document: replace a node by an interesting value or by a
/// node of another seed, delete a member, copy a subtree elsewhere, nest, or nudge a number.
fn mutate_json(rng: &mut Rng, doc: &mut Value, donor: &Value) {
    let mut ptrs = Vec::new();
    pointers(doc, String::new(), &mut ptrs);
    let at = ptrs[rng.below(ptrs.len())].clone();
    let choice = rng.below(7);
    if choice == 2 {
        // Delete an object member / array element.
        if let Some((parent, key)) = at.rsplit_once('/') {
            let key = key.replace("~1", "/").replace("~0", "~");
            match doc.pointer_mut(parent) {
                Some(Value::Object(m)) => {
                    m.remove(&key);
                }
                Some(Value::Array(a)) => {
                    if let Ok(i) = key.parse::<usize>() {
                        if i < a.len() {
                            a.remove(i);
                        }
                    }
                }
                _ => {}
            }
        }
        return;
    }
    let new = match choice {
        0 | 1 => interesting_value(rng),
        3 => {
            let mut dp = Vec::new();
            pointers(donor, String::new(), &mut dp);
            donor.pointer(&dp[rng.below(dp.len())]).cloned().unwrap_or(Value::Null)
        }
        4 => {
            let src = ptrs[rng.below(ptrs.len())].clone();
            doc.pointer(&src).cloned().unwrap_or(Value::Null)
        }
        5 => {
            let inner = doc.pointer(&at).cloned().unwrap_or(Value::Null);
            if rng.chance(2) {
                json!([inner])
            } else {
                json!({"k": inner})
            }
        }
        _ => match doc.pointer(&at) {
            Some(Value::Number(n)) if n.is_u64() => {
                json!(n.as_u64().unwrap_or(0).wrapping_add(rng.below(3) as u64).wrapping_sub(1))
            }
            Some(Value::Number(n)) => json!(-n.as_f64().unwrap_or(0.0)),
            Some(Value::String(s)) => json!(format!("{s}{s}")),
            _ => interesting_value(rng),
        },
    };
    if let Some(slot) = doc.pointer_mut(&at) {
        *slot = new;
    }
}

/// One byte-level mutation.
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, donor: &[u8]) {
    if data.is_empty() {
        data.push(INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())]);
        return;
    }
    let len = data.len();
    match rng.below(9) {
        0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 => {
            let i = rng.below(len);
            data[i] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
        }
        2 => data.truncate(rng.below(len)),
        3 => {
            // Delete a run.
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            data.drain(i..i + n);
        }
        4 => {
            // Insert random bytes.
            let i = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(i..i, bytes);
        }
        5 => {
            // Duplicate a run in place.
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(256));
            let run = data[i..i + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, run);
        }
        6 if !donor.is_empty() => {
            // Splice: our head, the donor's tail.
            let cut = rng.below(len);
            let from = rng.below(donor.len());
            data.truncate(cut);
            data.extend_from_slice(&donor[from..]);
        }
        7 => {
            // Overwrite a little-endian integer field with an edge value.
            let i = rng.below(len);
            let v: u64 = [0, 1, u64::from(u32::MAX), u64::MAX, 1 << 31, 1 << 40, rng.next_u64()][rng.below(7)];
            for (k, b) in v.to_le_bytes().iter().take(if rng.chance(2) { 4 } else { 8 }).enumerate() {
                if let Some(slot) = data.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
        _ => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
    }
}

/// Case `case` of a run with `seed`: a deterministic mutant of one seed input.
pub fn make_case(target: Target, seeds: &[Vec<u8>], seed: u64, case: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ case.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let base = &seeds[rng.below(seeds.len())];
    let donor = &seeds[rng.below(seeds.len())];
    let mut data = base.clone();
    let rounds = 1 + rng.below(4);
    // JSON-aware mutations on the JSON targets and on the safetensors header (length rewritten
    // to match most of the time, so the mutant gets past the length check).
    if rng.chance(2) {
        if target.is_json() {
            if let (Ok(mut doc), Ok(donor_doc)) =
                (serde_json::from_slice::<Value>(&data), serde_json::from_slice::<Value>(donor))
            {
                for _ in 0..rounds {
                    mutate_json(&mut rng, &mut doc, &donor_doc);
                }
                data = if rng.chance(2) { serde_json::to_vec(&doc) } else { serde_json::to_vec_pretty(&doc) }
                    .unwrap_or_default();
                if rng.chance(4) {
                    mutate_bytes(&mut rng, &mut data, donor);
                }
                return data;
            }
        } else if target == Target::Safetensors {
            if let Some(mutant) = mutate_safetensors_header(&mut rng, &data, donor, rounds) {
                return mutant;
            }
        }
    }
    for _ in 0..rounds {
        mutate_bytes(&mut rng, &mut data, donor);
    }
    data
}

fn mutate_safetensors_header(rng: &mut Rng, file: &[u8], donor: &[u8], rounds: usize) -> Option<Vec<u8>> {
    let len = u64::from_le_bytes(*file.first_chunk::<8>()?) as usize;
    let header = file.get(8..8usize.checked_add(len)?)?;
    let mut doc: Value = serde_json::from_slice(header).ok()?;
    let donor_doc = donor
        .first_chunk::<8>()
        .and_then(|l| donor.get(8..8 + u64::from_le_bytes(*l) as usize))
        .and_then(|h| serde_json::from_slice(h).ok())
        .unwrap_or(Value::Null);
    for _ in 0..rounds {
        mutate_json(rng, &mut doc, &donor_doc);
    }
    let new_header = serde_json::to_vec(&doc).ok()?;
    let mut out =
        if rng.chance(8) { (len as u64).to_le_bytes() } else { (new_header.len() as u64).to_le_bytes() }.to_vec();
    out.extend_from_slice(&new_header);
    out.extend_from_slice(&file[8 + len..]);
    Some(out)
}

// ---- Memory accounting --------------------------------------------------------------------------

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

/// A global allocator that tracks live and peak heap bytes, so the fuzzer can bound each case's
/// memory. A binary opts in with `#[global_allocator] static A: glimpse::fuzz::CountingAlloc =
/// glimpse::fuzz::CountingAlloc;`.
pub struct CountingAlloc;

// SAFETY: every call forwards to the system allocator with the caller's layout and pointer
// unchanged; the counters are only statistics.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_new(System.alloc(layout), layout.size())
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_new(System.alloc_zeroed(layout), layout.size())
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grow_live(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Counts `size` more live bytes, raising the peak with them.
fn grow_live(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

/// Notes a new allocation `p` of `size` bytes (none when it failed) and returns it.
fn count_new(p: *mut u8, size: usize) -> *mut u8 {
    COUNTING.store(true, Ordering::Relaxed);
    if !p.is_null() {
        grow_live(size);
    }
    p
}

/// Whether [`CountingAlloc`] is this binary's allocator (it has seen an allocation).
pub fn memory_counted() -> bool {
    COUNTING.load(Ordering::Relaxed)
}

// ---- Panic capture ------------------------------------------------------------------------------

thread_local! {
    /// Set while a case runs: panics on this thread are recorded here, not printed.
    static CAPTURE: Cell<bool> = const { Cell::new(false) };
    static PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Installs (once) a panic hook that records panics of fuzzing threads and leaves every other
/// thread's panics to the previous hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CAPTURE.with(Cell::get) {
                let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".into());
                PANICS.with(|p| p.borrow_mut().push(format!("{msg}{at}")));
            } else {
                previous(info);
            }
        }));
    });
}

// ---- The run --------------------------------------------------------------------------------------

/// Limits and output of a run.
#[derive(Debug, Clone)]
pub struct Options {
    pub cases: u64,
    pub seed: u64,
    /// A case slower than this is a finding.
    pub time_limit: Duration,
    /// A case whose heap peak grows more than this is a finding (with [`CountingAlloc`]).
    pub memory_limit: usize,
    /// A case running this long is a hang: the watchdog writes it and ends the process.
    pub hang_limit: Duration,
    /// Where findings are written (`<target>-seed<S>-case<I>.bin`); `None`: not written.
    pub out_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cases: 10_000,
            seed: 1,
            time_limit: Duration::from_secs(2),
            memory_limit: 2 << 30,
            hang_limit: Duration::from_secs(60),
            out_dir: None,
        }
    }
}

/// One input that broke a bound.
#[derive(Debug, Clone)]
pub struct Finding {
    pub case: u64,
    /// "panic: ...", "slow: ...", "memory: ...".
    pub what: String,
    pub input: Vec<u8>,
    pub written_to: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub target: Target,
    pub cases: u64,
    pub seconds: f64,
    /// Uncaught panics, and cases over the time or memory bound.
    pub findings: Vec<Finding>,
    /// Panics that the code under test caught itself (e.g. `decode_rgb`'s guard around the
    /// image decoders): handled, but worth knowing about.
    pub caught_panics: u64,
    pub slowest_case_ms: f64,
    /// Largest heap growth of one case, when memory is counted.
    pub peak_case_bytes: Option<usize>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<18} cases {:>9}  time {:>8.1} s  crashes {}  caught panics {}  slowest {:.1} ms  peak {}",
            self.target.name(),
            self.cases,
            self.seconds,
            self.findings.len(),
            self.caught_panics,
            self.slowest_case_ms,
            self.peak_case_bytes.map_or("not counted".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6)),
        )
    }
}

/// Writes a finding atomically: a temp file in the same folder, fsync, rename.
fn write_finding(dir: &Path, name: &str, input: &[u8]) -> Result<PathBuf> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(input).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

fn finding_name(target: Target, seed: u64, case: u64) -> String {
    format!("{}-seed{seed}-case{case}.bin", target.name())
}

/// Runs `opts.cases` cases of `target` from `seeds`.
pub fn run(target: Target, seeds: &[Vec<u8>], opts: &Options) -> Result<Report> {
    run_with(target, seeds, opts, |input| target.run(input))
}

/// [`run`] with another consumer of the inputs (`target` still picks the mutations and names
/// the findings); the harness tests use it.
pub fn run_with(target: Target, seeds: &[Vec<u8>], opts: &Options, consume: impl Fn(&[u8])) -> Result<Report> {
    if seeds.is_empty() {
        return Err(Error::InvalidInput(format!("fuzz target {}: no seed inputs", target.name())));
    }
    install_panic_hook();
    // Watchdog: the case in flight and when it started (ns since `epoch`; 0 = idle).
    let epoch = Instant::now();
    let current = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (current, started, done) = (current.clone(), started.clone(), done.clone());
        let (seeds, opts) = (seeds.to_vec(), opts.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let s = started.load(Ordering::Relaxed);
                if s != 0 && epoch.elapsed().saturating_sub(Duration::from_nanos(s)) > opts.hang_limit {
                    let case = current.load(Ordering::Relaxed);
                    let input = make_case(target, &seeds, opts.seed, case);
                    let at = opts
                        .out_dir
                        .as_deref()
                        .and_then(|d| write_finding(d, &finding_name(target, opts.seed, case), &input).ok());
                    eprintln!(
                        "fuzz {}: case {case} (seed {}) ran over {:?}: a hang; input {}",
                        target.name(),
                        opts.seed,
                        opts.hang_limit,
                        at.map_or("not written".into(), |p| p.display().to_string())
                    );
                    std::process::exit(3);
                }
            }
        })
    };

    let start = Instant::now();
    let mut report = Report {
        target,
        cases: 0,
        seconds: 0.0,
        findings: Vec::new(),
        caught_panics: 0,
        slowest_case_ms: 0.0,
        peak_case_bytes: memory_counted().then_some(0),
    };
    CAPTURE.with(|c| c.set(true));
    for case in 0..opts.cases {
        let input = make_case(target, seeds, opts.seed, case);
        current.store(case, Ordering::Relaxed);
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t0 = Instant::now();
        started.store(epoch.elapsed().as_nanos().max(1) as u64, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| consume(&input)));
        started.store(0, Ordering::Relaxed);
        let elapsed = t0.elapsed();
        let grew = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        let panics = PANICS.with(|p| std::mem::take(&mut *p.borrow_mut()));
        report.cases += 1;
        report.slowest_case_ms = report.slowest_case_ms.max(elapsed.as_secs_f64() * 1e3);
        if let Some(peak) = report.peak_case_bytes.as_mut() {
            *peak = (*peak).max(grew);
        }
        let what = if outcome.is_err() {
            Some(format!("panic: {}", panics.last().map_or("(no message)", |s| s.as_str())))
        } else if memory_counted() && grew > opts.memory_limit {
            Some(format!("memory: {:.0} MB (limit {:.0} MB)", grew as f64 / 1e6, opts.memory_limit as f64 / 1e6))
        } else if elapsed > opts.time_limit {
            Some(format!("slow: {:.0} ms (limit {:?})", elapsed.as_secs_f64() * 1e3, opts.time_limit))
        } else {
            None
        };
        report.caught_panics += (panics.len() - usize::from(outcome.is_err()).min(panics.len())) as u64;
        if let Some(what) = what {
            let written_to = match &opts.out_dir {
                Some(dir) => Some(write_finding(dir, &finding_name(target, opts.seed, case), &input)?),
                None => None,
            };
            report.findings.push(Finding { case, what, input, written_to });
        }
    }
    CAPTURE.with(|c| c.set(false));
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}
