//! `glimpse bench`: every stage of a model at real shapes (BLIP-2 presets, or `--model DIR` of
//! any generative family), timed on the CPU or one GPU, next to the floor the machine allows.
//!
//! Stages: each encoder phase of the plan by name (BLIP-2: vision, qformer incl. the language
//! projection), prefill over the caption prompt (image tokens + BOS) and over the VQA prompt,
//! decode ms/token (median over the steps of an N-token generation, EOS ignored), first-token
//! latency (inputs in -> first token), caption latency (inputs in -> N tokens), and images/s at
//! batch 1, 8, 32 (`--throughput-batches`), skipping sizes whose buffers do not fit in free
//! memory. Each stage is timed by `Executor::run_timed` (CUDA events around the phase's kernels
//! on a GPU, wall clock on the CPU) after a warm-up, median of `--repeats`; latencies and
//! throughput are wall clock.
//!
//! Floors are read off the plan's graph (`crate::cost`, no per-model formulas): a phase must at
//! least read its weights (fp16), move its inputs, outputs and KV cache (activations at the
//! executor's width: f32 on the CPU, f16 on the GPU), and do its FLOPs (2 per multiply-add of
//! every Linear, the patch conv and attention's QK^T and PV over the keys each row sees).
//! `floor = max(bytes / copy bandwidth, FLOPs / matrix rate)`, with the bandwidth counted as
//! bytes read + written by a large copy. These are lower bounds no implementation can beat, not
//! targets that intermediate activations would let one reach.

pub mod embed;

use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};

use crate::backend::{Backend, Device, Executor};
use crate::cost::{Cost, GraphCost};
use crate::error::{Error, Result};
use crate::generate::{expand_for_beams, generate, generate_with, GenerateOptions, Hooks, Plan};
use crate::graph::{Phase, WeightTable};
use crate::models::ModelConfig;
use crate::models::{Family, PromptText};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Random weights at a preset's shapes, made in memory: tiny, blip2-opt-2.7b, blip2-opt-6.7b,
    /// llava-1.5-7b, ...; an embedding preset (clip-vit-large-patch14, clip-tiny) times images/s
    /// and texts/s instead (default: the largest BLIP-2 that fits the device; CPU: tiny).
    #[arg(long, conflicts_with = "model")]
    pub preset: Option<String>,
    /// A model folder (or hub id in the local cache) instead of a preset.
    #[arg(long)]
    pub model: Option<String>,
    /// cpu, cuda or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Images per request for the stage timings.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens generated per caption (EOS ignored).
    #[arg(long, default_value_t = 20)]
    pub new_tokens: usize,
    /// Timed runs per stage after the warm-up (default: 10 on a GPU, 3 on the CPU).
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Seed of the random weights, pixels and ids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Batch sizes of the throughput table (embedding models: one image row and one text row each).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub throughput_batches: Vec<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Dataset mode: caption the first --dataset-images images of this folder through the whole
    /// dataset pipeline (read, decode and preprocess overlapped with the model, records written)
    /// and the same images preprocessed beforehand through the model alone, in the same run;
    /// the stage timings are skipped.
    #[arg(long, value_name = "DIR")]
    pub dataset: Option<std::path::PathBuf>,
    /// Images of --dataset to run (the first in sorted order).
    #[arg(long, default_value_t = 256, requires = "dataset")]
    pub dataset_images: usize,
    /// Quantize the language decoder's Linear weights at load (int8 or int4, CPU only for now):
    /// the floors count the bytes the quantized weights occupy (values and fp16 scales).
    #[arg(long, value_name = "int8|int4")]
    pub quantize: Option<crate::quant::Quantize>,
    /// Batch size of --dataset mode.
    #[arg(long, default_value_t = 32, requires = "dataset")]
    pub dataset_batch: usize,
}

/// `--dataset` mode: images/s of the whole pipeline against the model alone.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetBench {
    pub dir: String,
    pub images: usize,
    pub batch: usize,
    /// Read + decode + preprocess of every image, on the whole thread pool, nothing else running.
    pub preprocess_images_per_s: f64,
    /// The model alone on pixels already in memory, batch by batch.
    pub model_only_images_per_s: f64,
    /// `dataset::run` from the files to the records on disk.
    pub pipeline_images_per_s: f64,
    /// pipeline / model only (1.0: preprocessing fully hidden behind the model).
    pub fraction_of_model_only: f64,
    /// `1 / (1/model + 1/preprocess)`: the best rate when the model and the preprocessing share
    /// the same cores (the CPU backend), where overlapping cannot hide any work.
    pub shared_cores_images_per_s: f64,
    /// CPU time of this process (user + system, all threads) per image in each measurement, ms.
    /// Other jobs on the machine move it less than the rates (they still share caches and
    /// hyperthreads with it); NaN where unknown.
    pub preprocess_cpu_ms_per_image: f64,
    pub model_only_cpu_ms_per_image: f64,
    pub pipeline_cpu_ms_per_image: f64,
    /// model-only CPU time / pipeline CPU time: the share of the pipeline's work that is the
    /// model's, which is the fraction of the model-only rate it reaches when the model keeps
    /// every core busy.
    pub cpu_fraction_of_model_only: f64,
}

/// CPU seconds (user + system) this process has used so far, all threads; NaN where unknown.
fn process_cpu_s() -> f64 {
    #[cfg(unix)]
    {
        // SAFETY: getrusage only writes the struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } == 0 {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            return tv(u.ru_utime) + tv(u.ru_stime);
        }
    }
    f64::NAN
}

/// Beams of the beam-search latency row.
pub const BENCH_BEAMS: usize = 5;
/// Settings of the sampled-decode row (scripts/hf_reference.py's `SAMPLED` runs the same).
pub const SAMPLED_TOP_P: f64 = 0.9;
pub const SAMPLED_TEMPERATURE: f64 = 0.7;

/// One timed stage.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub stage: String,
    pub what: String,
    pub median_ms: f64,
    pub min_ms: f64,
    pub samples: usize,
    /// max(memory floor, compute floor).
    pub floor_ms: f64,
    pub memory_floor_ms: f64,
    /// None when no matrix rate is known for the device.
    pub compute_floor_ms: Option<f64>,
    pub bound: &'static str,
    pub bytes: f64,
    pub flops: f64,
    /// floor / median (1.0 = at the floor).
    pub fraction_of_floor: f64,
}

/// Images/s at one batch size, or why it was skipped.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub batch: usize,
    pub images_per_s: Option<f64>,
    pub caption_ms: Option<f64>,
    pub floor_images_per_s: Option<f64>,
    pub fraction_of_floor: Option<f64>,
    pub skipped: Option<String>,
}

/// The machine's measured rates the floors divide by.
#[derive(Debug, Clone, Serialize)]
pub struct Rates {
    /// (bytes read + bytes written) / s of a large copy, in GB/s.
    pub copy_gbs: f64,
    pub copy_source: String,
    pub matrix_gflops: Option<f64>,
    pub matrix_source: String,
}

/// Who ran what, where: the fields every bench report opens with (flattened into its JSON, so
/// the keys stand at the top level).
#[derive(Debug, Clone, Serialize)]
pub struct RunHeader {
    pub date: String,
    pub commit: Option<String>,
    pub device: String,
    pub device_name: String,
    pub threads: usize,
    pub model: String,
    pub preset: Option<String>,
    pub seed: u64,
    pub parameters: usize,
    pub weight_bytes: usize,
    /// The decoder's weight format: fp16, or int8 / int4 with `--quantize`.
    pub weights_format: String,
}

impl RunHeader {
    /// The header of a run of `weights` on the backend named `backend_name` ("cpu" or
    /// "cuda:<card>"), now, at this checkout's commit.
    pub fn new(backend_name: &str, model: String, preset: Option<String>, seed: u64, weights: &WeightTable) -> Self {
        let cpu = backend_name == "cpu";
        Self {
            date: utc_now(),
            commit: git_commit(),
            device: if cpu { "cpu" } else { "cuda" }.into(),
            device_name: if cpu { cpu_name() } else { backend_name.to_string() },
            threads: rayon::current_num_threads(),
            model,
            preset,
            seed,
            parameters: weights.parameters(),
            weight_bytes: weights.weights.iter().map(|w| w.stored_bytes()).sum(),
            weights_format: weights
                .weights
                .iter()
                .find_map(|w| w.quantized().map(|q| format!("{} decoder", q.format)))
                .unwrap_or_else(|| "fp16".into()),
        }
    }

    /// The first lines of a report's readable form.
    fn write(&self, s: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(s, "glimpse bench  {}  commit {}", self.date, self.commit.as_deref().unwrap_or("unknown"));
        let _ = writeln!(s, "device: {}", self.device_name);
        let _ = writeln!(
            s,
            "model:  {} ({:.3} B parameters, {:.2} GB of weights, {})",
            self.model,
            self.parameters as f64 / 1e9,
            self.weight_bytes as f64 / 1e9,
            self.weights_format
        );
    }
}

/// The note a report carries when the device has no matrix rate (its floors are memory-only).
fn matrix_rate_note(rates: &Rates) -> Option<String> {
    rates.matrix_gflops.is_none().then(|| {
        "no matrix rate for this device: floors are memory floors only (set GLIMPSE_MATRIX_TFLOPS)".to_string()
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub header: RunHeader,
    pub batch: usize,
    pub new_tokens: usize,
    pub repeats: usize,
    pub caption_prompt_tokens: usize,
    pub vqa_prompt_tokens: usize,
    pub setup_s: f64,
    pub rates: Rates,
    pub stages: Vec<Stage>,
    pub throughput: Vec<Throughput>,
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetBench>,
}

/// The largest preset whose weights (fp16) plus room for batch-32 activations and KV cache
/// fit in `free_bytes` of GPU memory; `tiny` when none of the real ones fits.
pub fn pick_preset(free_bytes: usize) -> &'static str {
    const GB: usize = 1 << 30;
    // 6.7b: 15.5 GB of weights; 2.7b: 7.5 GB; ~4 GB headroom for activations, cache, context.
    if free_bytes >= 20 * GB {
        "blip2-opt-6.7b"
    } else if free_bytes >= 12 * GB {
        "blip2-opt-2.7b"
    } else {
        "tiny"
    }
}

/// The question of the VQA prefill stage with `--model` (presets use `synth::VQA_PROMPT`, its
/// BLIP-2 template).
const VQA_QUESTION: &str = "what is this?";

/// The model to benchmark: config, weights and the two prompts' ids and texts (the texts feed
/// encoders that read the prompt: InstructBLIP's Q-Former).
struct Subject {
    label: String,
    preset: Option<String>,
    family: Box<dyn Family>,
    caption_ids: Vec<u32>,
    vqa_ids: Vec<u32>,
    caption_text: String,
    vqa_text: String,
}

/// One request shape to time: its plan and host inputs (pixels, then any text inputs).
struct Request {
    plan: Plan,
    inputs: Vec<(&'static str, Vec<f32>)>,
}

impl Request {
    fn inputs(&self) -> Vec<(&str, &[f32])> {
        self.inputs.iter().map(|(n, d)| (*n, d.as_slice())).collect()
    }
}

impl Subject {
    /// The plan of `pixels` (one image per sequence) with the caption or the VQA prompt and up
    /// to `n` new tokens, and its inputs.
    fn request(&self, pixels: Vec<f32>, batch: usize, vqa: bool, n: usize) -> Result<Request> {
        let (ids, text) = if vqa { (&self.vqa_ids, &self.vqa_text) } else { (&self.caption_ids, &self.caption_text) };
        let mut inputs = vec![("pixels", pixels)];
        let mut shape = crate::generate::PlanShape::new(batch, ids.len(), n);
        if let Some(t) = self.family.text_inputs(&vec![text.as_str(); batch])? {
            inputs.extend(t.inputs);
            shape.text_rows = t.rows;
        }
        let plan = self.family.plan_for(&shape)?;
        Ok(Request { plan, inputs })
    }
}

fn load_subject(args: &BenchArgs, device: Device) -> Result<Subject> {
    if let Some(arg) = &args.model {
        let dir = crate::hub::resolve_model(arg)?;
        // The prompts as `caption` and `ask` build them (chat families: through the template).
        let model = crate::api::Model::load(&dir, Device::Cpu)?;
        let image = [bench_image(model.family.as_ref())];
        let caption_ids = model.input_ids_for(None, &image)?;
        let vqa_text = model.question_prompt(VQA_QUESTION);
        let vqa_ids = match &model.chat {
            Some(chat) => model.input_ids_for(Some(&chat.user_prompt(1, VQA_QUESTION)?), &image)?,
            None => model.question_ids(VQA_QUESTION, 1)?,
        };
        let family = model.family;
        return Ok(Subject {
            label: dir.display().to_string(),
            preset: None,
            family,
            caption_ids,
            vqa_ids,
            caption_text: String::new(),
            vqa_text,
        });
    }
    let name = match &args.preset {
        Some(p) => p.clone(),
        None if device == Device::Cuda => pick_preset(cuda_free_bytes()?).to_string(),
        None => "tiny".to_string(),
    };
    let cfg = crate::synth::preset(&name)?;
    if cfg.embeds() {
        return Err(Error::InvalidInput(format!(
            "preset `{name}` is an embedding model ({}): time it with `glimpse bench --preset {name}` (bench::run_any), not the generation benchmark",
            cfg.architecture()
        )));
    }
    // The family loads next to the preset's folder files (tokenizers; no weights), so files it
    // reads at load time (InstructBLIP's qformer_tokenizer/) are there.
    let (family, tokenizer) = with_preset_folder(&name, &cfg, args.seed, |dir| {
        let ckpt = crate::synth::random_checkpoint(&cfg, args.seed)?.with_origin(dir.join("model.safetensors"));
        let mut family = crate::models::load(&cfg, &ckpt)?;
        let tokenizer = crate::tokenizer::Tokenizer::from_dir(dir)?;
        family.bind_tokenizer(&tokenizer)?;
        Ok((family, tokenizer))
    })?;
    // A family whose processor builds the prompt (IDEFICS): the image alone, and the question
    // about it, as `caption` and `ask` build them.
    let processor_ids = |prompt| family.processor_prompt(prompt, 1).map(|text| tokenizer.encode_plain(&text?));
    let processor = (processor_ids(PromptText::Caption), processor_ids(PromptText::Question(VQA_QUESTION)));
    let (caption_ids, vqa_ids) = if let (Some(caption), Some(vqa)) = processor {
        (caption?, vqa?)
    } else if family.chat() {
        preset_chat_prompts(&name, &cfg, args.seed, family.as_ref())?
    } else {
        let tok = crate::synth::tokenizer(&cfg)?;
        let enc = |text: &str| -> Result<Vec<u32>> {
            Ok(tok.encode(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec())
        };
        (family.input_ids(&enc("")?), family.input_ids(&enc(crate::synth::VQA_PROMPT)?))
    };
    Ok(Subject {
        label: format!("preset {name} (random weights, seed {})", args.seed),
        preset: Some(name),
        family,
        caption_ids,
        vqa_ids,
        caption_text: String::new(),
        vqa_text: crate::synth::VQA_PROMPT.to_string(),
    })
}

/// The image the prompts are built for: one frame of the vision tower's size (an
/// image-splitting family sees it unsplit, a 0x0 tile grid), the pixels the bench times.
fn bench_image(family: &dyn Family) -> crate::image::PixelValues {
    let side = family.image_size();
    crate::image::PixelValues { tiles: Some((0, 0)), ..crate::image::PixelValues::frame(side, side, Vec::new()) }
}

/// A chat preset's caption and VQA prompts as `caption` and `ask` build them: its tokenizer and
/// chat template (the preset's folder files, without weights, in a temporary folder) render one
/// user message with one image.
fn preset_chat_prompts(name: &str, cfg: &ModelConfig, seed: u64, family: &dyn Family) -> Result<(Vec<u32>, Vec<u32>)> {
    with_preset_folder(name, cfg, seed, |dir| {
        let chat = crate::chat::ChatProcessor::load_from_dir(dir)?;
        let tok = crate::tokenizer::Tokenizer::from_dir(dir)?;
        let image = [bench_image(family)];
        let ids = |q: &str| crate::api::chat_prompt_ids(&chat, &tok, family, &chat.user_prompt(1, q)?, &image);
        Ok((ids(crate::chat::CAPTION_INSTRUCTION)?, ids(VQA_QUESTION)?))
    })
}

/// Runs `f` on a temporary folder holding preset `name`'s folder files without weights
/// (config, tokenizers, processor, chat template), removed afterwards.
fn with_preset_folder<T>(
    name: &str,
    cfg: &ModelConfig,
    seed: u64,
    f: impl FnOnce(&std::path::Path) -> Result<T>,
) -> Result<T> {
    let dir = std::env::temp_dir().join(format!("glimpse-bench-{name}-{}", std::process::id()));
    // A folder of this name that exists already is someone else's: refuse rather than delete it.
    std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    let result = (|| {
        for (file, text) in crate::synth::folder_files(name, cfg, seed)? {
            let path = dir.join(file);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        }
        f(&dir)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Free GPU memory of device 0.
fn cuda_free_bytes() -> Result<usize> {
    let dev = crate::backend::cuda::CudaDevice::new(0)?;
    let (free, _total) = dev.context().mem_get_info().map_err(|e| Error::Gpu(format!("cuMemGetInfo: {e:?}")))?;
    Ok(free)
}

/// What `glimpse bench` measured: a generating model's stages or an embedding model's rates.
pub enum Outcome {
    Generate(Report),
    Embed(embed::EmbedReport),
}

impl Outcome {
    pub fn table(&self) -> String {
        match self {
            Outcome::Generate(r) => r.table(),
            Outcome::Embed(r) => r.table(),
        }
    }

    pub fn to_json(&self) -> Value {
        let v = match self {
            Outcome::Generate(r) => serde_json::to_value(r),
            Outcome::Embed(r) => serde_json::to_value(r),
        };
        v.unwrap_or_else(|e| json!({ "error": e.to_string() }))
    }
}

/// Runs the benchmark of the model `args` names: [`embed::run`] for an embedding model, else [`run`].
pub fn run_any(args: &BenchArgs) -> Result<Outcome> {
    let batches = [("--batch", args.batch), ("--dataset-batch", args.dataset_batch)];
    let table = args.throughput_batches.iter().map(|&b| ("--throughput-batches", b));
    // Zeros get their own messages below.
    for (flag, b) in batches.into_iter().chain(table).filter(|(_, b)| *b != 0) {
        crate::dataset::check_batch(flag, b as u64)?;
    }
    if embed::embeds(args)? {
        if let Some(q) = args.quantize {
            return Err(Error::InvalidInput(format!(
                "--quantize {q} applies to generating models (their language decoder); this is an embedding model: bench it without --quantize"
            )));
        }
        Ok(Outcome::Embed(embed::run(args)?))
    } else {
        Ok(Outcome::Generate(run(args)?))
    }
}

/// Runs the whole benchmark of a generating model.
pub fn run(args: &BenchArgs) -> Result<Report> {
    let setup = Instant::now();
    if args.new_tokens < 2 {
        return Err(Error::InvalidInput(
            "--new-tokens must be at least 2 (decode is timed over the steps after the first token)".into(),
        ));
    }
    if args.batch == 0 {
        return Err(Error::InvalidInput("--batch must be at least 1".into()));
    }
    if args.repeats == Some(0) {
        return Err(Error::InvalidInput(
            "--repeats 0: each stage needs at least 1 timed run (omit it for the default: 10 on a GPU, 3 on the CPU)"
                .into(),
        ));
    }
    if args.throughput_batches.contains(&0) {
        return Err(Error::InvalidInput(format!(
            "--throughput-batches {}: batch sizes must be at least 1 (e.g. 1,8,32)",
            args.throughput_batches.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",")
        )));
    }
    let device = pick_device(&args.device)?;
    if let Some(dir) = &args.dataset {
        return run_dataset(args, dir, device, setup);
    }
    let mut subject = load_subject(args, device)?;
    if let Some(format) = args.quantize {
        crate::backend::check_quantized_device(device, format)?;
        crate::models::quantize::quantize_family(subject.family.as_mut(), format)?;
    }
    let family = subject.family.as_ref();
    let backend = Backend::new(device, family.weights())?;
    let on_gpu = backend.is_cuda();
    let act_bytes = if on_gpu { 2.0 } else { 4.0 };
    let repeats = args.repeats.unwrap_or(if on_gpu { 10 } else { 3 });
    let rates = measure_rates(&backend)?;
    let mut notes = Vec::new();
    let setup_s = setup.elapsed().as_secs_f64();

    let b = args.batch;
    let n = args.new_tokens;
    let pixels = crate::synth::random_normal(b * 3 * family.image_size().pow(2), args.seed ^ 0x5EED);
    let opts = GenerateOptions { max_new_tokens: Some(n), ..Default::default() };
    let weights = family.weights();

    // Caption-prompt plan: vision, Q-Former, prefill, decode, first token, caption.
    let (p_cap, p_vqa) = (subject.caption_ids.len(), subject.vqa_ids.len());
    let caption = subject.request(pixels.clone(), b, false, n)?;
    let plan = &caption.plan;
    let mut exec = backend.executor(weights, &plan.graph)?;
    let run = TimedRun { plan, inputs: &caption.inputs(), ids: &subject.caption_ids, opts: &opts, repeats };
    let t = time_stages(exec.as_mut(), &run)?;
    drop(exec);
    // VQA-prompt prefill (its own plan: buffers are sized by prompt length).
    let vqa = subject.request(pixels.clone(), b, true, n)?;
    let plan_vqa = &vqa.plan;
    let mut exec = backend.executor(weights, &plan_vqa.graph)?;
    let run = TimedRun { plan: plan_vqa, inputs: &vqa.inputs(), ids: &subject.vqa_ids, opts: &opts, repeats };
    let t_vqa = time_prefill(exec.as_mut(), &run)?;
    drop(exec);

    // Beam search through the same loop: BENCH_BEAMS beams per image, no EOS so every step runs.
    let beam_opts = GenerateOptions { num_beams: BENCH_BEAMS, ..opts.clone() };
    let bb = b * BENCH_BEAMS;
    let beam = subject.request(expand_for_beams(&pixels, b, &beam_opts), bb, false, n)?;
    let plan_beam = &beam.plan;
    let t_beam = match does_not_fit(&backend, plan_beam, act_bytes) {
        Some(why) => {
            notes.push(format!("caption_beam{BENCH_BEAMS} skipped: {why}"));
            None
        }
        None => {
            let mut exec = backend.executor(weights, &plan_beam.graph)?;
            let mut samples = Vec::new();
            for r in 0..=repeats {
                let (_, timings) =
                    generate(plan_beam, exec.as_mut(), &beam.inputs(), &subject.caption_ids, &beam_opts, &mut |_| {})?;
                if r > 0 {
                    samples.push(timings.total_ms);
                }
            }
            // Floor: the model's work at batch x beams (the host-side candidate merge and the KV
            // reorder between steps are not in it).
            let costs = PlanCosts::new(plan_beam, weights, act_bytes);
            let parts: Vec<Cost> =
                costs.first_token().into_iter().chain((0..n - 1).map(|s| costs.decode(p_cap + s))).collect();
            Some((samples, parts))
        }
    };
    drop(beam);

    // Sampled decode on the caption plan: the logits rows come to the host every step, through
    // the processors (temperature, top-k 50 as transformers defaults it, top-p) and the draw.
    let sampled_opts = GenerateOptions {
        do_sample: true,
        top_p: SAMPLED_TOP_P,
        temperature: SAMPLED_TEMPERATURE,
        seed: Some(args.seed),
        ..opts.clone()
    };
    let mut exec = backend.executor(weights, &plan.graph)?;
    let mut t_sampled = Vec::new();
    for r in 0..=repeats {
        let (_, timings) =
            generate(plan, exec.as_mut(), &caption.inputs(), &subject.caption_ids, &sampled_opts, &mut |_| {})?;
        if r > 0 && timings.decode_steps > 0 {
            t_sampled.push(timings.decode_ms / timings.decode_steps as f64);
        }
    }
    drop(exec);

    // Composite stages: the sum of their parts' floors (the parts run one after another).
    let costs = PlanCosts::new(plan, weights, act_bytes);
    let decode_parts: Vec<Cost> = (0..n - 1).map(|s| costs.decode(p_cap + s)).collect();
    let first_parts = costs.first_token();
    let caption_parts: Vec<Cost> = first_parts.iter().chain(&decode_parts).copied().collect();
    let mut stages: Vec<Stage> = plan
        .encoders
        .iter()
        .enumerate()
        .map(|(i, phase)| {
            let samples = t.encoders.get(phase.name).map_or(&[][..], |v| &v[..]);
            stage(phase.name, format!("encoder phase, batch {b}"), samples, &[costs.encoder(i)], 1, &rates)
        })
        .collect();
    stages.extend([
        stage(
            "prefill",
            prompt_label(plan, p_cap, "caption"),
            &t.prefill,
            &[costs.prefill()],
            1,
            &rates,
        ),
        stage(
            "prefill_vqa",
            prompt_label(plan_vqa, p_vqa, "VQA"),
            &t_vqa,
            &[PlanCosts::new(plan_vqa, weights, act_bytes).prefill()],
            1,
            &rates,
        ),
        stage(
            "decode",
            format!("ms per token, median over {} steps x {repeats} runs", n - 1),
            &t.decode,
            &decode_parts,
            n - 1,
            &rates,
        ),
        stage(
            "decode_sampled",
            format!(
                "ms per token of the sampled loop (do_sample, top_p {SAMPLED_TOP_P}, temperature {SAMPLED_TEMPERATURE}): step, logits to the host, processors, draw; median of {repeats} runs"
            ),
            &t_sampled,
            &decode_parts,
            n - 1,
            &rates,
        ),
        stage("first_token", "inputs in -> first token".into(), &t.first_token, &first_parts, 1, &rates),
        stage("caption", format!("inputs in -> {n} tokens"), &t.caption, &caption_parts, 1, &rates),
    ]);
    if let Some((samples, parts)) = &t_beam {
        let what = format!("inputs in -> {n} tokens, {BENCH_BEAMS} beams (no EOS)");
        stages.push(stage(&format!("caption_beam{BENCH_BEAMS}"), what, samples, parts, 1, &rates));
    }

    // Throughput at batch 1, 8, 32: whole captions, one executor per batch size.
    let mut throughput = Vec::new();
    for &tb in &args.throughput_batches {
        let px = crate::synth::random_normal(tb * 3 * family.image_size().pow(2), args.seed ^ tb as u64);
        let request = subject.request(px, tb, false, n)?;
        let plan = &request.plan;
        let costs = PlanCosts::new(plan, weights, act_bytes);
        let parts: Vec<Cost> =
            costs.first_token().into_iter().chain((0..n - 1).map(|s| costs.decode(p_cap + s))).collect();
        let floor_s = parts.iter().map(|c| floor_ms(c, &rates).0).sum::<f64>() / 1e3;
        let floor_ips = tb as f64 / floor_s;
        if let Some(why) = does_not_fit(&backend, plan, act_bytes) {
            throughput.push(Throughput {
                batch: tb,
                images_per_s: None,
                caption_ms: None,
                floor_images_per_s: Some(floor_ips),
                fraction_of_floor: None,
                skipped: Some(why),
            });
            continue;
        }
        let result = backend.executor(weights, &plan.graph).and_then(|mut exec| {
            let mut samples = Vec::new();
            for r in 0..=repeats.min(5) {
                let (_, timings) =
                    generate(plan, exec.as_mut(), &request.inputs(), &subject.caption_ids, &opts, &mut |_| {})?;
                if r > 0 {
                    samples.push(timings.total_ms);
                }
            }
            Ok(median(&samples))
        });
        match result {
            Ok(ms) => {
                let ips = tb as f64 / (ms / 1e3);
                throughput.push(Throughput {
                    batch: tb,
                    images_per_s: Some(ips),
                    caption_ms: Some(ms),
                    floor_images_per_s: Some(floor_ips),
                    fraction_of_floor: Some(ips / floor_ips),
                    skipped: None,
                });
            }
            Err(e) => throughput.push(Throughput {
                batch: tb,
                images_per_s: None,
                caption_ms: None,
                floor_images_per_s: Some(floor_ips),
                fraction_of_floor: None,
                skipped: Some(format!("failed: {e}")),
            }),
        }
    }
    notes.extend(matrix_rate_note(&rates));
    Ok(Report {
        header: RunHeader::new(
            &backend.name(),
            subject.label.clone(),
            subject.preset.clone(),
            args.seed,
            family.weights(),
        ),
        batch: b,
        new_tokens: n,
        repeats,
        caption_prompt_tokens: p_cap,
        vqa_prompt_tokens: p_vqa,
        setup_s,
        rates,
        stages,
        throughput,
        notes,
        dataset: None,
    })
}

/// `--dataset` mode: a model folder (`--model`, or the preset written to a temporary folder, as
/// the pipeline needs its image processor and tokenizer files), then the same images through
/// the model alone and through `dataset::run`.
fn run_dataset(args: &BenchArgs, dir: &std::path::Path, device: Device, setup: Instant) -> Result<Report> {
    if args.dataset_images == 0 || args.dataset_batch == 0 {
        return Err(Error::InvalidInput("--dataset-images and --dataset-batch must be at least 1".into()));
    }
    let (model_dir, temp, label, preset) = match &args.model {
        Some(m) => (crate::hub::resolve_model(m)?, None, m.clone(), None),
        None => {
            let name = args.preset.clone().unwrap_or_else(|| "tiny".into());
            let tmp = std::env::temp_dir().join(format!("glimpse-bench-dataset-{name}-{}", std::process::id()));
            // A folder of this name that exists already is someone else's: refuse rather than reuse it.
            std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let label = format!("preset {name} (random weights, seed {})", args.seed);
            (tmp.clone(), Some(tmp), label, Some(name))
        }
    };
    let result = (|| {
        if let Some(name) = &preset {
            crate::synth::write_folder(name, &model_dir, args.seed)?;
        }
        let model =
            crate::api::Model::load_with(&model_dir, device, crate::api::LoadOptions { quantize: args.quantize })?;
        dataset_report(args, dir, &model, label, preset.clone(), setup)
    })();
    if let Some(tmp) = temp {
        let _ = std::fs::remove_dir_all(tmp);
    }
    result
}

fn dataset_report(
    args: &BenchArgs,
    dir: &std::path::Path,
    model: &crate::api::Model,
    label: String,
    preset: Option<String>,
    setup: Instant,
) -> Result<Report> {
    use crate::dataset::{input, RunOptions, Task};
    use rayon::prelude::*;
    let open = || -> Result<input::Input> {
        let mut inp = input::open(dir, &input::InputOptions::default())?;
        let n = inp.total.unwrap_or(0).min(args.dataset_images);
        inp.total = Some(n);
        inp.items = Box::new(inp.items.take(n));
        Ok(inp)
    };
    let items: Vec<input::Item> = open()?.items.collect::<Result<_>>()?;
    if items.is_empty() {
        return Err(Error::InvalidInput(format!(
            "--dataset {}: no images in it (extensions {})",
            dir.display(),
            input::IMAGE_EXTENSIONS.join(", ")
        )));
    }
    let n = items.len();
    let batch = args.dataset_batch;
    // No EOS: every caption runs --new-tokens steps, the same work in both measurements.
    let opts = GenerateOptions { max_new_tokens: Some(args.new_tokens), ..Default::default() };
    let task = Task::Caption { model, opts: &opts };
    let setup_s = setup.elapsed().as_secs_f64();

    let (t, cpu) = (Instant::now(), process_cpu_s());
    let pixels: Vec<crate::image::PixelValues> = items
        .par_iter()
        .map(|i| match &i.source {
            Ok(input::ImageRef::Path(p)) => model.preprocess(p),
            _ => Err(Error::InvalidInput(format!("{}: not a readable image path", i.image))),
        })
        .collect::<Result<_>>()?;
    let (preprocess_s, preprocess_cpu) = (t.elapsed().as_secs_f64(), process_cpu_s() - cpu);
    // Warm-up at the measured batch size, then the model alone.
    model.run(&pixels[..batch.min(n)], None, &opts, &mut |_| {})?;
    let (t, cpu) = (Instant::now(), process_cpu_s());
    for chunk in pixels.chunks(batch) {
        model.run(chunk, None, &opts, &mut |_| {})?;
    }
    let (model_s, model_cpu) = (t.elapsed().as_secs_f64(), process_cpu_s() - cpu);
    drop(pixels);

    let out_dir = std::env::temp_dir().join(format!("glimpse-bench-records-{}", std::process::id()));
    std::fs::create_dir(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let run_opts = RunOptions { batch_size: batch, resume: false, progress: false };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let cpu = process_cpu_s();
    let pipeline =
        open().and_then(|inp| crate::dataset::run(&task, inp, &out_dir.join("records.jsonl"), &run_opts, &stop));
    let pipeline_cpu = process_cpu_s() - cpu;
    let _ = std::fs::remove_dir_all(&out_dir);
    let summary = pipeline?;
    let rate = |s: f64| n as f64 / s.max(1e-9);
    let (model_only, piped) = (rate(model_s), rate(summary.seconds));
    Ok(Report {
        header: RunHeader::new(&model.backend_name(), label, preset, args.seed, model.family.weights()),
        batch,
        new_tokens: args.new_tokens,
        repeats: 1,
        caption_prompt_tokens: model.input_ids_for(None, &[bench_image(model.family.as_ref())])?.len(),
        vqa_prompt_tokens: 0,
        setup_s,
        rates: Rates {
            copy_gbs: f64::NAN,
            copy_source: "not measured in --dataset mode".into(),
            matrix_gflops: None,
            matrix_source: "not measured in --dataset mode".into(),
        },
        stages: Vec::new(),
        throughput: Vec::new(),
        notes: vec![format!("{} of the images failed in the pipeline", summary.failed)]
            .into_iter()
            .filter(|_| summary.failed > 0)
            .collect(),
        dataset: Some(DatasetBench {
            dir: dir.display().to_string(),
            images: n,
            batch,
            preprocess_images_per_s: rate(preprocess_s),
            model_only_images_per_s: model_only,
            pipeline_images_per_s: piped,
            fraction_of_model_only: piped / model_only,
            shared_cores_images_per_s: 1.0 / (1.0 / model_only + 1.0 / rate(preprocess_s)),
            preprocess_cpu_ms_per_image: 1e3 * preprocess_cpu / n as f64,
            model_only_cpu_ms_per_image: 1e3 * model_cpu / n as f64,
            pipeline_cpu_ms_per_image: 1e3 * pipeline_cpu / n as f64,
            cpu_fraction_of_model_only: model_cpu / pipeline_cpu,
        }),
    })
}

/// What a prefill stage runs over: the prompt, or for an encoder-decoder the start token (the
/// prompt went through the encoder phase).
fn prompt_label(plan: &Plan, tokens: usize, prompt: &str) -> String {
    match plan.encoder_input {
        Some(_) => format!("decoder start token ({prompt} prompt: {tokens} encoder input tokens)"),
        None => format!("{tokens} decoder input tokens ({prompt} prompt)"),
    }
}

/// Raw samples of each stage, ms.
#[derive(Default)]
struct StageTimes {
    /// Each encoder phase by name.
    encoders: std::collections::HashMap<&'static str, Vec<f64>>,
    prefill: Vec<f64>,
    decode: Vec<f64>,
    first_token: Vec<f64>,
    caption: Vec<f64>,
}

/// One request a timing function runs `repeats` times (after a warm-up where it says so).
struct TimedRun<'a> {
    plan: &'a Plan,
    inputs: &'a [(&'a str, &'a [f32])],
    ids: &'a [u32],
    opts: &'a GenerateOptions,
    repeats: usize,
}

impl TimedRun<'_> {
    /// Runs the request once through the generation loop with `on_phase` timing its phases.
    fn run_phases(&self, exec: &mut dyn Executor, on_phase: &mut dyn FnMut(&str, f64) -> bool) -> Result<()> {
        let mut hooks = Hooks { on_token: &mut |_| {}, on_phase: Some(on_phase) };
        generate_with(self.plan, exec, self.inputs, self.ids, self.opts, &mut hooks)?;
        Ok(())
    }
}

/// Stage timings through the generation loop itself: whole captions by wall clock, then the
/// same loop with every phase timed by `Executor::run_timed`.
fn time_stages(exec: &mut dyn Executor, run: &TimedRun<'_>) -> Result<StageTimes> {
    let TimedRun { plan, inputs, ids, opts, repeats } = *run;
    let mut t = StageTimes::default();
    // Whole captions: warm-up (also warms every phase for the per-stage timings), then timed.
    for r in 0..=repeats {
        let (_, timings) = generate(plan, exec, inputs, ids, opts, &mut |_| {})?;
        if r > 0 {
            t.first_token.push(timings.first_token_ms);
            t.caption.push(timings.total_ms);
        }
    }
    for _ in 0..repeats {
        let mut on_phase = |name: &str, ms: f64| {
            match name {
                "prefill" => t.prefill.push(ms),
                "decode" => t.decode.push(ms),
                _ => {
                    if let Some(p) = plan.encoders.iter().find(|p| p.name == name) {
                        t.encoders.entry(p.name).or_default().push(ms);
                    }
                }
            }
            true
        };
        run.run_phases(exec, &mut on_phase)?;
    }
    Ok(t)
}

/// Prefill alone: the loop stops after the prefill phase (the encoders run untimed once per repeat).
fn time_prefill(exec: &mut dyn Executor, run: &TimedRun<'_>) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for r in 0..=run.repeats {
        let mut on_phase = |name: &str, ms: f64| {
            if name != "prefill" {
                return true;
            }
            if r > 0 {
                out.push(ms);
            }
            false
        };
        run.run_phases(exec, &mut on_phase)?;
    }
    Ok(out)
}

/// Why a plan's buffers would not fit in free memory (None: they fit, or it is unknown).
fn does_not_fit(backend: &Backend, plan: &Plan, act_bytes: f64) -> Option<String> {
    let need = plan.graph.buffers.iter().map(|d| (d.rows * d.cols) as f64).sum::<f64>() * act_bytes;
    let free = match backend {
        Backend::Cpu => mem_available_bytes()?,
        Backend::Cuda(w) => w.dev.context().mem_get_info().ok()?.0 as f64,
    };
    (need > 0.9 * free)
        .then(|| format!("needs {:.2} GB of activations and cache, {:.2} GB free", need / 1e9, free / 1e9))
}

fn mem_available_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// A stage's timings against the floor of `parts` (run one after another), divided by `per`
/// (the number of steps, for per-token figures).
fn stage(name: &str, what: String, samples: &[f64], parts: &[Cost], per: usize, rates: &Rates) -> Stage {
    let med = median(samples);
    let k = 1.0 / per.max(1) as f64;
    let (mut floor, mut mem, mut comp, mut bytes, mut flops) = (0.0, 0.0, Some(0.0), 0.0, 0.0);
    let (mut mem_bound, mut comp_bound) = (false, false);
    for c in parts {
        let (f, m, cm) = floor_ms(c, rates);
        floor += f * k;
        mem += m * k;
        comp = comp.zip(cm).map(|(a, b)| a + b * k);
        bytes += c.bytes * k;
        flops += c.flops * k;
        if cm.is_some_and(|cm| cm > m) {
            comp_bound = true;
        } else {
            mem_bound = true;
        }
    }
    Stage {
        stage: name.into(),
        what,
        median_ms: med,
        min_ms: samples.iter().copied().fold(f64::INFINITY, f64::min),
        samples: samples.len(),
        floor_ms: floor,
        memory_floor_ms: mem,
        compute_floor_ms: comp,
        bound: match (mem_bound, comp_bound) {
            (true, true) => "mixed",
            (false, true) => "compute",
            _ => "memory",
        },
        bytes,
        flops,
        fraction_of_floor: floor / med,
    }
}

// ---------------------------------------------------------------------------------------------
// Floors

/// (floor, memory floor, compute floor) in ms of `c` at the machine's rates.
fn floor_ms(c: &Cost, r: &Rates) -> (f64, f64, Option<f64>) {
    let mem = c.bytes / (r.copy_gbs * 1e9) * 1e3;
    let comp = r.matrix_gflops.map(|g| c.flops / (g * 1e9) * 1e3);
    (mem.max(comp.unwrap_or(0.0)), mem, comp)
}

/// The cost of each phase of a plan, read off its graph (`crate::cost`).
pub struct PlanCosts<'a> {
    plan: &'a Plan,
    graph: GraphCost<'a>,
}

impl<'a> PlanCosts<'a> {
    pub fn new(plan: &'a Plan, weights: &'a WeightTable, act_bytes: f64) -> Self {
        Self { plan, graph: GraphCost { graph: &plan.graph, weights, act_bytes } }
    }

    /// Encoder phase `i`, whose outputs the later encoders and the decoder read.
    pub fn encoder(&self, i: usize) -> Cost {
        let p = self.plan;
        let later: Vec<&Phase> = p.encoders[i + 1..].iter().chain([&p.prefill.phase, &p.decode.phase]).collect();
        self.graph.phase(&p.encoders[i], 0, &later, &[])
    }

    /// The prefill over the decoder input, from position 0.
    pub fn prefill(&self) -> Cost {
        let p = self.plan;
        self.graph.phase(&p.prefill.phase, 0, &[&p.decode.phase], &[p.prefill.logits])
    }

    /// One decode step with `position` tokens already cached.
    pub fn decode(&self, position: usize) -> Cost {
        let p = self.plan;
        self.graph.phase(&p.decode.phase, position, &[], &[p.decode.logits])
    }

    /// Inputs in to first token out: every encoder, then the prefill.
    pub fn first_token(&self) -> Vec<Cost> {
        (0..self.plan.encoders.len()).map(|i| self.encoder(i)).chain([self.prefill()]).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Machine rates

fn measure_rates(backend: &Backend) -> Result<Rates> {
    match backend {
        Backend::Cpu => {
            let path = crate::backend::cpu::gemm::selected().map_err(Error::InvalidInput)?;
            let (gbs, copy_source) = cpu_copy_bandwidth();
            let (gflops, matrix_source) = cpu_matrix_gflops(path)?;
            Ok(Rates { copy_gbs: gbs, copy_source, matrix_gflops: Some(gflops), matrix_source })
        }
        Backend::Cuda(w) => {
            let (copy_gbs, copy_source) = cuda_copy_bandwidth(&w.dev)?;
            let (matrix_gflops, matrix_source) = cuda_matrix_gflops();
            Ok(Rates { copy_gbs, copy_source, matrix_gflops, matrix_source })
        }
    }
}

/// Multi-threaded memcpy of 256 MiB, best of 5; (read + written) bytes / s.
fn cpu_copy_bandwidth() -> (f64, String) {
    use rayon::prelude::*;
    const N: usize = 256 << 20;
    let src: Vec<u8> = (0..N).into_par_iter().map(|i| i as u8).collect();
    let mut dst = vec![1u8; N];
    let chunk = N / (4 * rayon::current_num_threads()).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        let s = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(s.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    (
        2.0 * N as f64 / best / 1e9,
        format!(
            "multi-threaded memcpy of 256 MiB on {} threads, best of 6, read+write bytes",
            rayon::current_num_threads()
        ),
    )
}

/// `backend::cpu::ops::linear` on 1024 x 1024 x 1024 (f32 activations, fp16 weights) through the
/// GEMM `path` (named in the description), best of 4.
fn cpu_matrix_gflops(path: crate::backend::cpu::gemm::Isa) -> Result<(f64, String)> {
    const M: usize = 1024;
    let x = crate::synth::random_normal(M * M, 1);
    let w: Vec<half::f16> = crate::synth::random_normal(M * M, 2).into_iter().map(half::f16::from_f32).collect();
    let mut out = vec![0f32; M * M];
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let s = Instant::now();
        let dims = crate::backend::GemmDims { m: M, n: M, k: M };
        crate::backend::cpu::ops::linear(&x, &w, None, crate::graph::Activation::None, &mut out, false, dims)?;
        best = best.min(s.elapsed().as_secs_f64());
    }
    std::hint::black_box(&out);
    let path = path.name();
    Ok((
        2.0 * (M * M * M) as f64 / best / 1e9,
        format!("backend::cpu::ops::linear 1024x1024x1024 ({path} GEMM), best of 4"),
    ))
}

/// Device-to-device copy of 1 GiB, best of 10: (read + written) bytes / s. `GLIMPSE_COPY_GBS`
/// overrides. Switch to `backend::cuda::copy_bandwidth_gbs()` once the backend exposes one.
fn cuda_copy_bandwidth(dev: &crate::backend::cuda::CudaDevice) -> Result<(f64, String)> {
    if let Some(v) = env_f64("GLIMPSE_COPY_GBS") {
        return Ok((v, "GLIMPSE_COPY_GBS".into()));
    }
    const N: usize = 1 << 30;
    let src = dev.alloc::<u8>(N)?;
    let dst = dev.alloc::<u8>(N)?;
    let mut best = f64::INFINITY;
    for i in 0..13 {
        dev.synchronize()?;
        let s = Instant::now();
        dev.copy_device(&src, &dst)?;
        dev.synchronize()?;
        if i >= 3 {
            best = best.min(s.elapsed().as_secs_f64());
        }
    }
    Ok((
        2.0 * N as f64 / best / 1e9,
        "cuMemcpyDtoD of 1 GiB timed by glimpse bench, best of 10, read+write bytes".into(),
    ))
}

/// The GPU's fp16 matrix rate: taken from a GEMM measured elsewhere in the same run (the kernel
/// bench or torch's cuBLAS, see scripts/device-e2e.sh), passed as `GLIMPSE_MATRIX_TFLOPS`.
/// Hook: replace with a call into the kernel bench's GEMM once the backend exposes one.
fn cuda_matrix_gflops() -> (Option<f64>, String) {
    match env_f64("GLIMPSE_MATRIX_TFLOPS") {
        Some(t) => (Some(t * 1e3), "GLIMPSE_MATRIX_TFLOPS (fp16 GEMM measured in the same run)".into()),
        None => (None, "unknown: set GLIMPSE_MATRIX_TFLOPS to a measured fp16 GEMM rate".into()),
    }
}

fn env_f64(name: &str) -> Option<f64> {
    std::env::var(name).ok()?.trim().parse().ok().filter(|v: &f64| *v > 0.0)
}

fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("cpu: {model}, {} threads", rayon::current_num_threads())
}

/// The commit the binary was built from: `GLIMPSE_COMMIT` when set (scripts that know better),
/// else what build.rs embedded (`git rev-parse --short=12 HEAD`, `-dirty` when the tracked files
/// differed from it); None for a build outside git.
pub fn git_commit() -> Option<String> {
    if let Ok(c) = std::env::var("GLIMPSE_COMMIT") {
        if !c.trim().is_empty() {
            return Some(c.trim().to_string());
        }
    }
    Some(BUILD_COMMIT).filter(|c| *c != "unknown").map(str::to_string)
}

/// The commit embedded at build time (`unknown` outside git); see build.rs.
pub const BUILD_COMMIT: &str = env!("GLIMPSE_BUILD_COMMIT");

/// UTC now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The first lines of every bench table: date, commit, device, model and its size.
/// The device `--device` names: cuda (an error naming why when there is none), cpu, or auto
/// (cuda when usable).
fn pick_device(arg: &str) -> Result<Device> {
    Ok(match arg.parse::<Device>()? {
        Device::Cuda => match crate::backend::cuda_unavailable_reason() {
            Some(e) => return Err(Error::InvalidInput(format!("--device cuda: {e}"))),
            None => Device::Cuda,
        },
        Device::Auto if crate::backend::cuda_unavailable_reason().is_none() => Device::Cuda,
        _ => Device::Cpu,
    })
}

impl Report {
    /// The readable form: header, rates, one row per stage, the throughput table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        self.header.write(&mut s);
        if let Some(d) = &self.dataset {
            let _ = writeln!(
                s,
                "dataset: {} images of {}, batch {}, {} new tokens (EOS ignored)",
                d.images, d.dir, d.batch, self.new_tokens
            );
            let _ =
                writeln!(s, "{:<34} {:>10.2} images/s", "read + decode + preprocess alone", d.preprocess_images_per_s);
            let _ =
                writeln!(s, "{:<34} {:>10.2} images/s", "model alone (pixels in memory)", d.model_only_images_per_s);
            let _ = writeln!(
                s,
                "{:<34} {:>10.2} images/s  ({:.1}% of model alone)",
                "whole pipeline (files to records)",
                d.pipeline_images_per_s,
                100.0 * d.fraction_of_model_only
            );
            if self.header.device == "cpu" {
                let _ = writeln!(
                    s,
                    "{:<34} {:>10.2} images/s  (model and preprocessing on the same cores)",
                    "bound on shared cores", d.shared_cores_images_per_s
                );
            }
            if d.pipeline_cpu_ms_per_image.is_finite() {
                let _ = writeln!(
                    s,
                    "{:<34} {:>10.2} ms preprocess alone, {:.2} model alone, {:.2} pipeline ({:.1}% model)",
                    "CPU time per image (all threads)",
                    d.preprocess_cpu_ms_per_image,
                    d.model_only_cpu_ms_per_image,
                    d.pipeline_cpu_ms_per_image,
                    100.0 * d.cpu_fraction_of_model_only
                );
            }
            for n in &self.notes {
                let _ = writeln!(s, "note: {n}");
            }
            return s;
        }
        let _ = writeln!(
            s,
            "batch {}, {} new tokens (EOS ignored), median of {} runs after a warm-up",
            self.batch, self.new_tokens, self.repeats
        );
        let _ = writeln!(s, "copy bandwidth {:.1} GB/s ({})", self.rates.copy_gbs, self.rates.copy_source);
        match self.rates.matrix_gflops {
            Some(g) => {
                let _ = writeln!(s, "matrix rate    {:.1} GFLOP/s ({})", g, self.rates.matrix_source);
            }
            None => {
                let _ = writeln!(s, "matrix rate    {}", self.rates.matrix_source);
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<12} {:>11} {:>11} {:>11}  {:<8} what",
            "stage", "median ms", "floor ms", "% of floor", "bound"
        );
        for st in &self.stages {
            let _ = writeln!(
                s,
                "{:<12} {:>11.3} {:>11.3} {:>10.1}%  {:<8} {}",
                st.stage,
                st.median_ms,
                st.floor_ms,
                100.0 * st.fraction_of_floor,
                st.bound,
                st.what
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "throughput ({} tokens per caption)", self.new_tokens);
        let _ = writeln!(
            s,
            "{:<6} {:>10} {:>12} {:>12} {:>11}",
            "batch", "images/s", "caption ms", "floor img/s", "% of floor"
        );
        for t in &self.throughput {
            match (&t.skipped, t.images_per_s, t.caption_ms) {
                (None, Some(ips), Some(ms)) => {
                    let _ = writeln!(
                        s,
                        "{:<6} {:>10.2} {:>12.2} {:>12.2} {:>10.1}%",
                        t.batch,
                        ips,
                        ms,
                        t.floor_images_per_s.unwrap_or(f64::NAN),
                        100.0 * t.fraction_of_floor.unwrap_or(f64::NAN)
                    );
                }
                (why, _, _) => {
                    let _ = writeln!(s, "{:<6} skipped: {}", t.batch, why.as_deref().unwrap_or("unknown"));
                }
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }

    /// The report as a JSON value (what `--json` prints).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|e| json!({ "error": e.to_string() }))
    }
}
