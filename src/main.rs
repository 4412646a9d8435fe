//! The `glimpse` command line: caption, ask, embed, classify, serve, info, convert, synth, bench,
//! parity.
//!
//! Exit status: 0 on success; 1 when anything failed (a bad argument, a model that does not
//! load, any image that failed, a write error on stdout); 2 for usage errors (clap). When the
//! reader of stdout goes away (`glimpse caption ... | head -1`) glimpse stops quietly, as
//! ripgrep does: status 0, or 1 if an image had already failed.

mod cli {
    pub mod generate;
    pub mod output;
}

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use cli::output::{diagnostic, Stdout, Stop};
use glimpse::dataset::Task;
use glimpse::generate::GenerationOverrides;
use glimpse::{Device, GenerateOptions, Model, Output};

#[derive(Parser)]
#[command(
    name = "glimpse",
    version,
    about = "Fast, faithful vision-language inference (BLIP-2, InstructBLIP, LLaVA, CLIP) from Hugging Face checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    source: ModelSource,
    /// New tokens to generate at most (default: generation_config.json, else 20).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// One JSON object per image per line: image, text, tokens, logprobs, timings, device
    /// (beam search adds score, and sequences when several are returned); or image and error
    /// for an image that failed.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    gen: cli::generate::GenArgs,
    /// Quantize the language decoder's Linear weights at load: int8 (per output row) or int4
    /// (groups of 128 inputs); weight-only, CPU only for now (see README "Quantization").
    #[arg(long, value_name = "int8|int4")]
    quantize: Option<glimpse::Quantize>,
    /// With --input: images per model batch.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..), requires = "input")]
    batch_size: u64,
}

/// Dataset mode of caption, ask and embed: every image of SRC, one record each, into DST
/// (see README, "Datasets").
#[derive(Args)]
struct DatasetArgs {
    /// A folder of images (recursive, sorted), a text file of paths (one per line, relative to
    /// its folder), or a .jsonl / .parquet table with a `path`, `image` or `file_name` column
    /// (paths, or image bytes in Parquet); an `id` or `key` column names the records.
    #[arg(long, value_name = "SRC", requires = "output")]
    input: Option<PathBuf>,
    /// Where the records go: Parquet when it ends in .parquet, else JSONL. Written batch by
    /// batch, durably; an existing DST is refused unless --resume.
    #[arg(long, value_name = "DST", requires = "input")]
    output: Option<PathBuf>,
    /// Continue an interrupted run: inputs whose key (id, else image) DST holds are skipped.
    #[arg(long, requires = "input")]
    resume: bool,
    /// The input table's column of image paths or bytes (default: path, image, file_name).
    #[arg(long, value_name = "COLUMN", requires = "input")]
    path_column: Option<String>,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Inputs per forward pass.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// One JSON object per input per line (`image` or `text`, then `embedding`, or `labels` and
    /// `probs`); or the input and `error` for an input that failed.
    #[arg(long)]
    json: bool,
}

/// Which model runs where: a folder or hub id, how a hub id is fetched, and the device.
#[derive(Args)]
struct ModelSource {
    /// Model folder, or a hub id (e.g. Salesforce/blip2-opt-2.7b; for embed a CLIP model such as
    /// openai/clip-vit-base-patch32), downloaded on first use into the Hugging Face cache.
    #[arg(long, short)]
    model: String,
    #[command(flatten)]
    hub: HubArgs,
    /// cpu, cuda, or auto (CUDA when usable, else CPU).
    #[arg(long, default_value = "auto")]
    device: String,
}

impl ModelSource {
    /// Resolves the model (a hub id is downloaded first) and loads it with `load` on the device
    /// asked for; says on stderr when `auto` fell back to the CPU.
    fn load<M>(
        &self,
        load: impl FnOnce(&Path, Device) -> glimpse::Result<M>,
        backend_name: impl Fn(&M) -> String,
    ) -> glimpse::Result<M> {
        let device = self.device.parse::<Device>()?;
        let dir = glimpse::hub::resolve_model_with(&self.model, &self.hub.options())?;
        let model = load(&dir, device)?;
        if device == Device::Auto && backend_name(&model) == "cpu" {
            note_cpu_fallback();
        }
        Ok(model)
    }
}

/// Where a hub id comes from (HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE and HF_HUB_OFFLINE apply too).
#[derive(Args)]
struct HubArgs {
    /// Branch, tag or commit of a hub id.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Use the local cache only, never the network (as HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// No download progress bars (nor, with --input, the dataset progress line and summary).
    #[arg(long, short)]
    quiet: bool,
}

impl HubArgs {
    fn options(&self) -> glimpse::hub::HubOptions {
        let mut o = glimpse::hub::HubOptions::from_env();
        o.revision.clone_from(&self.revision);
        o.offline |= self.offline;
        o.progress = !self.quiet;
        o
    }
}

#[derive(Subcommand)]
enum Command {
    /// Caption one or more images: one record per image, in order. Plain output is the caption
    /// for one image, `IMAGE<TAB>CAPTION` lines for several (newlines, tabs, backslashes and
    /// control characters escaped as \n \t \\ \u{..}).
    Caption {
        #[command(flatten)]
        run: RunArgs,
        #[arg(required_unless_present = "input", conflicts_with = "input")]
        images: Vec<PathBuf>,
        #[command(flatten)]
        data: DatasetArgs,
    },
    /// Answer a question about an image: BLIP-2 uses "Question: {q} Answer:"; chat models
    /// (LLaVA) apply the checkpoint's chat template to one user message (the images, then the
    /// question). Several images: `--image A --image B QUESTION` (chat models only; one record).
    Ask {
        #[command(flatten)]
        run: RunArgs,
        /// An image of the question (repeatable); then QUESTION is the only positional argument.
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        /// IMAGE QUESTION, or QUESTION alone with --image (IMAGE alone, or nothing with --image,
        /// when --prompt gives the text). (A path need not be UTF-8, as with caption's images.)
        #[arg(required_unless_present_any = ["input", "prompt"], conflicts_with = "input", num_args = 1..=2, value_names = ["IMAGE", "QUESTION"])]
        args: Vec<std::ffi::OsString>,
        /// With --input: the question for rows without a `question` column.
        #[arg(long, requires = "input")]
        question: Option<String>,
        /// The prompt exactly as the model's processor takes it, with no template: the text with
        /// one `<image>` placeholder per image, in order (`"User:<image>Describe it.\nAssistant:"`).
        #[arg(long, conflicts_with = "input")]
        prompt: Option<String>,
        #[command(flatten)]
        data: DatasetArgs,
    },
    /// Embed images (or texts with --text) with a CLIP model: one record per input, in order,
    /// each the unit-length embedding (`CLIPModel`'s image_embeds / text_embeds). Plain output is
    /// the space-separated values, after `INPUT<TAB>` when there are several inputs.
    Embed {
        #[command(flatten)]
        args: EmbedArgs,
        /// A text to embed instead of images (repeat for several); tokenized as CLIPProcessor
        /// does, without truncation: a text over the model's positions (77) is that record's error.
        #[arg(long = "text", value_name = "TEXT", conflicts_with_all = ["images", "input"], required_unless_present_any = ["images", "input"])]
        texts: Vec<String>,
        #[arg(conflicts_with = "input")]
        images: Vec<PathBuf>,
        #[command(flatten)]
        data: DatasetArgs,
    },
    /// Zero-shot classification with a CLIP model: per image, the softmax over the labels of
    /// exp(logit_scale) * cosine similarity. Labels are used verbatim as texts (write templates
    /// such as "a photo of a cat." yourself). JSON: `labels` (as given) and `probs`; plain: the
    /// labels best first with their probabilities.
    Classify {
        #[command(flatten)]
        args: EmbedArgs,
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// A candidate label (repeat: at least one).
        #[arg(long = "label", value_name = "TEXT", required = true)]
        labels: Vec<String>,
    },
    /// Download a hub model (config, processor, tokenizer, safetensors weights) into the Hugging
    /// Face cache, or find it complete there; prints the snapshot folder.
    Download {
        /// Hub id, e.g. Salesforce/blip2-opt-2.7b.
        model: String,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Describe a model folder: family, dimensions, parameters, dtypes, size on disk.
    Info {
        model: String,
        /// Also read every weight for NaN and infinite values, naming each tensor that holds any
        /// (exit status 1 then). Reads the whole checkpoint: seconds for a 7B model from memory.
        #[arg(long)]
        check_weights: bool,
    },
    /// Write an fp16 copy of a checkpoint (a folder or a cached hub id) into a new folder outside
    /// it, so later loads are zero-copy.
    Convert { input: String, output: PathBuf },
    /// Write a model with random weights at real shapes as an HF checkpoint folder.
    Synth {
        /// tiny, blip2-opt-2.7b, blip2-opt-6.7b, blip2-flan-t5-xl, blip2-flan-t5-tiny, llava-1.5-7b,
        /// llava-1.5-13b, llava-tiny, clip-vit-large-patch14, clip-tiny, instructblip-vicuna-7b,
        /// instructblip-tiny, instructblip-flan-t5-xl or instructblip-flan-t5-tiny.
        #[arg(long)]
        preset: String,
        /// New or empty folder to write.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Serve the model over HTTP with OpenAI's API: POST /v1/chat/completions (generating
    /// models), POST /v1/embeddings (CLIP), GET /v1/models, /health, /metrics. Prints
    /// `listening on http://ADDR` on stdout; SIGTERM or Ctrl-C drains and exits. See docs/serve.md.
    Serve {
        #[command(flatten)]
        args: glimpse::serve::ServeArgs,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// Time every stage (vision, Q-Former, prefill, decode, latency, batch throughput) against
    /// the machine's bandwidth and FLOP floors.
    Bench(glimpse::bench::BenchArgs),
    /// Compare prefill logits with transformers' on the same input (a --tensors file written by
    /// scripts/hf_reference.py): error vs fp32 must be <= 2x transformers' own fp16 error.
    Parity {
        #[arg(long, short)]
        model: String,
        /// pixel_values, input_ids, prefill_logits_fp32 and prefill_logits_fp16.
        #[arg(long)]
        reference: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        json: bool,
        /// CPU only: round every activation to fp16 as the CUDA executor stores them, to predict
        /// GPU parity without a GPU.
        #[arg(long)]
        emulate_fp16: bool,
        /// With --emulate-fp16: keep the Q-Former in fp32 (as transformers does).
        #[arg(long, requires = "emulate_fp16")]
        fp32_qformer: bool,
    },
}

/// `glimpse --version`: the crate version, the commit it was built from, and whether CUDA
/// kernels are embedded (for which archs).
fn version() -> String {
    let kernels = if glimpse::backend::cuda::kernels_available() {
        format!("CUDA kernels: {}", glimpse::backend::cuda::kernel_archs())
    } else {
        "built without CUDA kernels".to_string()
    };
    format!("{} (commit {}, {kernels})", env!("CARGO_PKG_VERSION"), glimpse::bench::BUILD_COMMIT)
}

/// A failed command: a library error, or stdout that stopped taking output.
enum CliError {
    Glimpse(glimpse::Error),
    Stdout(Stop),
}

impl From<glimpse::Error> for CliError {
    fn from(e: glimpse::Error) -> Self {
        CliError::Glimpse(e)
    }
}

impl From<Stop> for CliError {
    fn from(e: Stop) -> Self {
        CliError::Stdout(e)
    }
}

fn main() -> ExitCode {
    // clap takes a 'static version string; this one is built once per process.
    let version: &'static str = Box::leak(version().into_boxed_str());
    let matches = match Cli::command().version(version).try_get_matches() {
        Ok(m) => m,
        // clap ignores write errors on --help/--version; off a terminal they go through Stdout.
        Err(e)
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                && !std::io::stdout().is_terminal() =>
        {
            return match Stdout::new().text(&e.render().to_string()) {
                Ok(()) | Err(Stop::Closed) => ExitCode::SUCCESS,
                Err(e) => {
                    diagnostic("error", &e.to_string());
                    ExitCode::FAILURE
                }
            };
        }
        Err(e) => e.exit(),
    };
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(cli.command) {
        Ok(code) => code,
        Err(CliError::Stdout(Stop::Closed)) => ExitCode::SUCCESS,
        Err(CliError::Stdout(e)) => {
            diagnostic("error", &e.to_string());
            ExitCode::FAILURE
        }
        Err(CliError::Glimpse(e)) => {
            diagnostic("error", &e.to_string());
            ExitCode::FAILURE
        }
    }
}

/// Says on stderr that `--device auto` runs on the CPU, and why.
fn note_cpu_fallback() {
    let why = match (glimpse::backend::cuda_unavailable_reason(), glimpse::backend::auto_fallback_reason()) {
        (Some(e), _) => e.to_string(),
        (None, Some(load_error)) => format!("a GPU is usable but loading the model onto it failed: {load_error}"),
        (None, None) => "a GPU is usable but the model could not be loaded onto it".to_string(),
    };
    diagnostic("note", &format!("--device auto: running on the CPU ({why}); pass --device cpu to silence this or --device cuda to require a GPU"));
}

/// For commands that pick their backend inside the library (bench, parity): the note is given
/// up front when `auto` will find no GPU.
fn note_if_auto_falls_back(device: &str) {
    if device.parse::<Device>().is_ok_and(|d| d == Device::Auto)
        && glimpse::backend::cuda_unavailable_reason().is_some()
    {
        note_cpu_fallback();
    }
}

fn load(args: &RunArgs) -> glimpse::Result<(Model, GenerateOptions)> {
    let options = glimpse::LoadOptions { quantize: args.quantize };
    let model = args.source.load(|dir, device| Model::load_with(dir, device, options), Model::backend_name)?;
    let opts = model.options(&GenerationOverrides { max_new_tokens: args.max_new_tokens, ..args.gen.overrides()? })?;
    args.gen.check_stream(&opts, args.json)?;
    Ok((model, opts))
}

fn json_record(model: &Model, image: &Path, out: &Output) -> String {
    let mut record = glimpse::dataset::json_record(serde_json::Value::Null, out, model.load_seconds);
    if let Some(fields) = record.as_object_mut() {
        fields.extend(cli::output::image_fields(image));
    }
    record.to_string()
}

/// `--stream`: one image's text printed as it is generated (escaped as the plain output is,
/// after `IMAGE<TAB>` when there are several images), then a newline.
fn stream_image(
    model: &Model,
    opts: &GenerateOptions,
    image: &Path,
    question: Option<&str>,
    several: bool,
    stdout: &mut Stdout,
) -> Result<(), CliError> {
    let pixels = model.preprocess(image)?;
    let prompt = question.map(|q| model.question_prompt(q));
    let mut streamer = glimpse::generate::stream::TextStreamer::new(&model.tokenizer);
    if several {
        stdout.text(&format!("{}\t", cli::output::escape(&image.display().to_string())))?;
    }
    let mut failure: Option<CliError> = None;
    let mut on_token = |ev: &glimpse::TokenEvent| {
        if failure.is_some() {
            return;
        }
        let text = match streamer.put(ev.token) {
            Ok(t) => t,
            Err(e) => return failure = Some(e.into()),
        };
        if let Err(e) = stdout.text(&cli::output::escape(&text)) {
            failure = Some(e.into());
        }
    };
    model.run(&[pixels], prompt.as_deref(), opts, &mut on_token)?;
    if let Some(e) = failure {
        return Err(e);
    }
    let rest = streamer.end()?;
    stdout.line(&cli::output::escape(&rest))?;
    Ok(())
}

/// Runs `images` in order (a caption, or an answer to `question`), one record per image; a
/// failed image is reported and the rest still run. Exit status 1 if any failed.
fn run_images(
    model: &Model,
    opts: &GenerateOptions,
    images: &[PathBuf],
    question: Option<&str>,
    args: &RunArgs,
) -> Result<ExitCode, CliError> {
    let json = args.json;
    let mut stdout = Stdout::new();
    let several = images.len() > 1;
    let mut failed = false;
    for image in images {
        if args.gen.stream {
            match stream_image(model, opts, image, question, several, &mut stdout) {
                Ok(()) => continue,
                Err(CliError::Stdout(Stop::Closed)) => break,
                Err(CliError::Glimpse(e)) => {
                    failed = true;
                    let msg = e.to_string();
                    diagnostic("error", &cli::output::image_error(image, &msg));
                    if let Some(line) = cli::output::plain_record(image, Err(&msg), several) {
                        stdout.line(&line)?;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let result = match question {
            Some(q) => model.ask(image, q, opts),
            None => model.caption(image, opts),
        };
        let record = match &result {
            Ok(out) if json => Some(json_record(model, image, out)),
            Ok(out) => cli::output::plain_record(image, Ok(&out.text), several),
            Err(e) => {
                failed = true;
                let msg = e.to_string();
                diagnostic("error", &cli::output::image_error(image, &msg));
                if json {
                    Some(cli::output::json_error_record(image, &msg))
                } else {
                    cli::output::plain_record(image, Err(&msg), several)
                }
            }
        };
        if let Some(line) = record {
            match stdout.line(&line) {
                Ok(()) => {}
                // Nobody reads the rest: stop quietly, keeping the status of what ran.
                Err(Stop::Closed) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn load_embedder(args: &EmbedArgs) -> glimpse::Result<glimpse::EmbedModel> {
    args.source.load(|dir, device| glimpse::EmbedModel::load(dir, device), glimpse::EmbedModel::backend_name)
}

/// What one input produced: its JSON fields and its plain text.
type Outcome = (serde_json::Map<String, serde_json::Value>, String);

/// Runs `f` once on the inputs that are still `Ok`; when it fails, each of them gets its error.
fn batched<X, Y>(
    items: Vec<Result<X, String>>,
    f: impl FnOnce(&[X]) -> glimpse::Result<Vec<Y>>,
) -> Vec<Result<Y, String>> {
    let mut ok = Vec::new();
    let slots: Vec<Result<(), String>> = items.into_iter().map(|r| r.map(|x| ok.push(x))).collect();
    let mut results = match f(&ok) {
        Ok(ys) => ys.into_iter().map(Ok).collect::<Vec<_>>(),
        Err(e) => (0..ok.len()).map(|_| Err(e.to_string())).collect(),
    }
    .into_iter();
    slots.into_iter().map(|s| s.and_then(|()| results.next().unwrap_or_else(|| Err("no result".into())))).collect()
}

/// One input of `embed`: the fields that name it in its `--json` record (`text`, or `image`
/// and, for a path that is not UTF-8, `image_bytes`) and how plain output and errors show it.
struct EmbedInput {
    fields: serde_json::Map<String, serde_json::Value>,
    shown: String,
}

impl EmbedInput {
    fn text(text: &str) -> Self {
        let mut fields = serde_json::Map::new();
        fields.insert("text".into(), text.into());
        Self { fields, shown: text.to_string() }
    }
    fn image(path: &Path) -> Self {
        Self { fields: cli::output::image_fields(path), shown: path.display().to_string() }
    }
}

/// Writes one record per input, in order, `batch` inputs per call of
/// `run`; failed inputs are reported and the rest still run. Exit status 1 if any failed.
fn embed_records(
    inputs: &[EmbedInput],
    json: bool,
    batch: usize,
    mut run: impl FnMut(std::ops::Range<usize>) -> Vec<Result<Outcome, String>>,
) -> Result<ExitCode, CliError> {
    let mut stdout = Stdout::new();
    let several = inputs.len() > 1;
    let mut failed = false;
    let mut start = 0;
    while start < inputs.len() {
        let end = (start + batch).min(inputs.len());
        for (input, result) in inputs[start..end].iter().zip(run(start..end)) {
            let path = Path::new(&input.shown);
            let mut record = input.fields.clone();
            let line = match result {
                Ok((fields, plain)) => {
                    if json {
                        record.extend(fields);
                        Some(serde_json::Value::Object(record).to_string())
                    } else {
                        cli::output::plain_record(path, Ok(&plain), several)
                    }
                }
                Err(msg) => {
                    failed = true;
                    diagnostic("error", &cli::output::image_error(path, &msg));
                    if json {
                        record.insert("error".into(), msg.into());
                        Some(serde_json::Value::Object(record).to_string())
                    } else {
                        cli::output::plain_record(path, Err(&msg), several)
                    }
                }
            };
            if let Some(line) = line {
                match stdout.line(&line) {
                    Ok(()) => {}
                    Err(Stop::Closed) => return Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        start = end;
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn embedding_outcome(e: Vec<f32>) -> Outcome {
    let plain = e.iter().map(f32::to_string).collect::<Vec<_>>().join(" ");
    let mut fields = serde_json::Map::new();
    fields.insert("embedding".into(), serde_json::json!(e));
    (fields, plain)
}

fn run_embed(args: &EmbedArgs, texts: &[String], images: &[PathBuf]) -> Result<ExitCode, CliError> {
    let batch = glimpse::dataset::batch_size(args.batch_size)?;
    let model = load_embedder(args)?;
    if !texts.is_empty() {
        let inputs: Vec<EmbedInput> = texts.iter().map(|t| EmbedInput::text(t)).collect();
        return embed_records(&inputs, args.json, batch, |r| {
            let ids = texts[r].iter().map(|t| model.text_ids(t).map_err(|e| e.to_string())).collect();
            batched(ids, |ids| model.embed_text_ids(ids)).into_iter().map(|e| e.map(embedding_outcome)).collect()
        });
    }
    let inputs: Vec<EmbedInput> = images.iter().map(|p| EmbedInput::image(p)).collect();
    embed_records(&inputs, args.json, batch, |r| {
        let px = images[r].iter().map(|p| model.preprocess(p).map_err(|e| e.to_string())).collect();
        batched(px, |px| model.embed_images(px)).into_iter().map(|e| e.map(embedding_outcome)).collect()
    })
}

fn run_classify(args: &EmbedArgs, images: &[PathBuf], labels: &[String]) -> Result<ExitCode, CliError> {
    let batch = glimpse::dataset::batch_size(args.batch_size)?;
    let model = load_embedder(args)?;
    let label_refs: Vec<&str> = labels.iter().map(String::as_str).collect();
    // Every record needs the labels: embedding them is the command's own step, not a record's.
    let label_embeds = model.embed_texts(&label_refs)?;
    let inputs: Vec<EmbedInput> = images.iter().map(|p| EmbedInput::image(p)).collect();
    embed_records(&inputs, args.json, batch, |r| {
        let px = images[r].iter().map(|p| model.preprocess(p).map_err(|e| e.to_string())).collect();
        batched(px, |px| {
            let logits = model.logits(&model.embed_images(px)?, &label_embeds)?;
            Ok(logits.iter().map(|row| glimpse::api::softmax(row)).collect())
        })
        .into_iter()
        .map(|probs| {
            probs.map(|probs| {
                let mut order: Vec<usize> = (0..probs.len()).collect();
                order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
                let plain = order
                    .iter()
                    .take(5)
                    .map(|&i| format!("{} ({:.4})", labels[i], probs[i]))
                    .collect::<Vec<_>>()
                    .join("; ");
                let mut fields = serde_json::Map::new();
                fields.insert("labels".into(), serde_json::json!(labels));
                fields.insert("probs".into(), serde_json::json!(probs));
                (fields, plain)
            })
        })
        .collect()
    })
}

/// One question about several images (chat models): one record, whose `image` field lists every
/// image in order (plain output: the answer).
/// What `ask` asks about several images (or one with `--prompt`) in one record.
enum Ask<'a> {
    /// The family's question form over every image.
    Question(&'a str),
    /// The processor's own text, one `<image>` per image.
    Prompt(&'a str),
}

fn run_multi(
    model: &Model,
    opts: &GenerateOptions,
    images: &[PathBuf],
    ask: Ask<'_>,
    json: bool,
) -> Result<ExitCode, CliError> {
    let paths: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    let out = match ask {
        Ask::Question(question) => model.ask_images(&paths, question, opts)?,
        Ask::Prompt(prompt) => {
            let pixels = paths.iter().map(|p| model.preprocess(p)).collect::<glimpse::Result<Vec<_>>>()?;
            let request = glimpse::api::Request::new(&pixels, glimpse::api::Prompt::Raw(Some(prompt)), opts);
            let mut outs = model.generate(&request, &mut |_| {})?;
            if outs.len() != 1 {
                return Err(glimpse::Error::InvalidInput(format!(
                    "the --prompt holds {} <image> placeholders for {} images, which makes {} answers: give one <image> per image",
                    prompt.matches("<image>").count(),
                    images.len(),
                    outs.len()
                ))
                .into());
            }
            outs.remove(0)
        }
    };
    let line = if json {
        // The images' names as text (`\xHH` for a byte that is not UTF-8), in order, and where
        // a name cannot hold its path exactly, `image_bytes`: each path's bytes in base64 (null
        // for the names that are exact).
        let fields: Vec<_> = images.iter().map(|p| cli::output::image_fields(p)).collect();
        let names: Vec<_> = fields.iter().map(|f| f["image"].clone()).collect();
        let mut record = glimpse::dataset::json_record(names.into(), &out, model.load_seconds);
        let raw_field = glimpse::dataset::input::RAW_PATH_FIELD;
        if fields.iter().any(|f| f.contains_key(raw_field)) {
            let raw: Vec<_> = fields.iter().map(|f| f.get(raw_field).cloned().unwrap_or_default()).collect();
            if let Some(obj) = record.as_object_mut() {
                obj.insert(raw_field.into(), raw.into());
            }
        }
        record.to_string()
    } else {
        cli::output::plain_record(&images[0], Ok(&out.text), false).unwrap_or_default()
    };
    match Stdout::new().line(&line) {
        Ok(()) | Err(Stop::Closed) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e.into()),
    }
}

/// Fails when `output` lies inside the Hugging Face cache, which huggingface_hub manages.
fn refuse_hub_cache(output: &Path) -> glimpse::Result<()> {
    let Some(cache) = glimpse::hub::cache_dir().and_then(|c| c.canonicalize().ok()) else { return Ok(()) };
    if glimpse::convert::canonical_target(output)?.starts_with(&cache) {
        return Err(glimpse::Error::InvalidInput(format!(
            "output {} is inside the Hugging Face cache ({}), which huggingface_hub manages: pick an output folder outside it",
            output.display(),
            cache.display()
        )));
    }
    Ok(())
}

/// A dataset run checked before its model loads: the input opened, the output allowed.
struct PreparedDataset {
    input: glimpse::dataset::input::Input,
    output: PathBuf,
    resume: bool,
    quiet: bool,
    batch_size: usize,
}

/// `Some` in dataset mode (--input): opens the input and refuses an existing output without
/// --resume, so that such mistakes show before a large model loads.
fn prepare_dataset(data: &DatasetArgs, quiet: bool, batch_size: u64) -> glimpse::Result<Option<PreparedDataset>> {
    if data.input.is_none() {
        let given = [
            ("--output", data.output.is_some()),
            ("--resume", data.resume),
            ("--path-column", data.path_column.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, on)| *on) {
            return Err(glimpse::Error::InvalidInput(format!(
                "{flag} works in dataset mode only, with --input SRC: add --input, or drop {flag} (records of images given as arguments go to stdout; redirect it to a file)"
            )));
        }
    }
    let (Some(src), Some(dst)) = (&data.input, &data.output) else { return Ok(None) };
    let batch_size = glimpse::dataset::batch_size(batch_size)?;
    glimpse::dataset::output::check_new(dst, data.resume)?;
    glimpse::dataset::output::check_not_input(src, dst)?;
    let opts = glimpse::dataset::input::InputOptions { path_column: data.path_column.clone() };
    let input = glimpse::dataset::input::open(src, &opts)?;
    Ok(Some(PreparedDataset { input, output: dst.clone(), resume: data.resume, quiet, batch_size }))
}

/// Runs a dataset to its output and reports on stderr. Exit status 1 if any input failed (its
/// record holds `error`), 130 when Ctrl-C stopped it (the output holds every finished batch).
fn run_dataset(task: &Task, d: PreparedDataset) -> Result<ExitCode, CliError> {
    let opts = glimpse::dataset::RunOptions { batch_size: d.batch_size, resume: d.resume, progress: !d.quiet };
    let s = glimpse::dataset::run(task, d.input, &d.output, &opts, glimpse::dataset::interrupt_flag())?;
    let dst = d.output.display();
    if !d.quiet {
        let skipped = if s.skipped > 0 { format!(", {} skipped as already in it", s.skipped) } else { String::new() };
        diagnostic(
            "note",
            &format!(
                "wrote {} records to {dst} ({} failed{skipped}) in {:.1} s, {:.1} images/s",
                s.written,
                s.failed,
                s.seconds,
                s.written as f64 / s.seconds.max(1e-9)
            ),
        );
    }
    if s.interrupted {
        diagnostic(
            "error",
            &format!("interrupted: {dst} holds every finished batch; run the same command with --resume to continue"),
        );
        return Ok(ExitCode::from(130));
    }
    if let Some((image, msg)) = &s.first_error {
        diagnostic(
            "error",
            &format!(
                "{} of {} inputs failed (their records in {dst} hold `error`); the first: {}",
                s.failed,
                s.written,
                cli::output::image_error(Path::new(image), msg)
            ),
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn run(command: Command) -> Result<ExitCode, CliError> {
    match command {
        Command::Caption { run, images, data } => {
            if let Some(prepared) = prepare_dataset(&data, run.source.hub.quiet, run.batch_size)? {
                let (model, opts) = load(&run)?;
                return run_dataset(&Task::Caption { model: &model, opts: &opts }, prepared);
            }
            let (model, opts) = load(&run)?;
            run_images(&model, &opts, &images, None, &run)
        }
        Command::Ask { run, images, args, question, prompt, data } => {
            if let Some(prepared) = prepare_dataset(&data, run.source.hub.quiet, run.batch_size)? {
                let (model, opts) = load(&run)?;
                let task = Task::Ask { model: &model, opts: &opts, question: question.as_deref() };
                return run_dataset(&task, prepared);
            }
            let text = |q: &std::ffi::OsString| {
                q.clone().into_string().map_err(|q| {
                    glimpse::Error::InvalidInput(format!("the question {q:?} is not UTF-8 text: pass it as UTF-8"))
                })
            };
            if let Some(prompt) = prompt {
                let images = match (images.is_empty(), &args[..]) {
                    (true, [image]) => vec![PathBuf::from(image)],
                    (false, []) => images,
                    _ => Cli::command()
                        .error(ErrorKind::WrongNumberOfValues, "ask --prompt takes IMAGE, or --image IMAGE ...")
                        .exit(),
                };
                let (model, opts) = load(&run)?;
                return run_multi(&model, &opts, &images, Ask::Prompt(&prompt), run.json);
            }
            let (images, question) = match (images.is_empty(), &args[..]) {
                (true, [image, question]) => (vec![PathBuf::from(image)], text(question)?),
                (false, [question]) => (images, text(question)?),
                _ => Cli::command()
                    .error(ErrorKind::WrongNumberOfValues, "ask takes IMAGE QUESTION, or --image IMAGE ... QUESTION")
                    .exit(),
            };
            let (model, opts) = load(&run)?;
            if let [_, _, ..] = &images[..] {
                return run_multi(&model, &opts, &images, Ask::Question(&question), run.json);
            }
            run_images(&model, &opts, &images, Some(&question), &run)
        }
        Command::Embed { args, texts, images, data } => {
            match prepare_dataset(&data, args.source.hub.quiet, args.batch_size)? {
                Some(prepared) => run_dataset(&Task::Embed { model: &load_embedder(&args)? }, prepared),
                None => run_embed(&args, &texts, &images),
            }
        }
        Command::Classify { args, images, labels } => run_classify(&args, &images, &labels),
        Command::Download { model, hub } => {
            let fetched = glimpse::hub::download(&model, &hub.options())?;
            if !hub.quiet {
                let what = if fetched.downloaded.is_empty() {
                    "already in the cache".to_string()
                } else {
                    format!("downloaded {} files ({:.1} MB)", fetched.downloaded.len(), fetched.bytes as f64 / 1e6)
                };
                diagnostic("note", &format!("{model} at commit {}: {what}", fetched.commit));
            }
            Stdout::new().line(&fetched.snapshot.display().to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Info { model, check_weights } => {
            let dir = glimpse::hub::resolve_model(&model)?;
            let (text, non_finite) = glimpse::info::describe_with(&dir, check_weights)?;
            Stdout::new().line(&text)?;
            if let Some(first) = non_finite.first() {
                let n = non_finite.len();
                return Err(glimpse::Error::InvalidInput(format!(
                    "{} holds NaN or infinite values in {n} tensor{} (listed above; the first is `{}`): the checkpoint is corrupt or was saved from a diverged run; download or convert it again",
                    dir.display(),
                    if n == 1 { "" } else { "s" },
                    first.name
                ))
                .into());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert { input, output } => {
            let dir = glimpse::hub::resolve_model(&input)?;
            refuse_hub_cache(&output)?;
            let (n, bytes) = glimpse::convert::convert_dir(&dir, &output)?;
            let target = output.join("model.safetensors");
            Stdout::new().line(&format!("wrote {n} tensors ({:.1} MB) to {}", bytes as f64 / 1e6, target.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Synth { preset, out, seed } => {
            let start = std::time::Instant::now();
            glimpse::synth::write_folder(&preset, &out, seed)?;
            let params = glimpse::synth::parameter_count(&glimpse::synth::preset(&preset)?)?;
            // Progress for people, on stderr; a stderr that cannot be written is no failure.
            let _ = writeln!(
                std::io::stderr(),
                "wrote {preset} (seed {seed}, {:.3} B parameters, fp16) to {} in {:.1} s",
                params as f64 / 1e9,
                out.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { args, hub } => {
            note_if_auto_falls_back(&args.device);
            let dir = glimpse::hub::resolve_model_with(&args.model, &hub.options())?;
            glimpse::serve::run(&args, &dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            note_if_auto_falls_back(&args.device);
            let report = glimpse::bench::run_any(&args)?;
            let mut stdout = Stdout::new();
            if args.json {
                stdout.line(&report.to_json().to_string())?;
            } else {
                stdout.text(&report.table())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Parity { model, reference, device, json, emulate_fp16, fp32_qformer } => {
            let dir = glimpse::hub::resolve_model(&model)?;
            use glimpse::parity::Fp16Emulation;
            let emulation = match (emulate_fp16, fp32_qformer) {
                (false, _) => Fp16Emulation::Off,
                (true, false) => Fp16Emulation::All,
                (true, true) => Fp16Emulation::KeepQFormerF32,
            };
            let device_kind = device.parse()?;
            note_if_auto_falls_back(&device);
            let r = glimpse::parity::run(&dir, &reference, device_kind, emulation)?;
            let mut stdout = Stdout::new();
            if json {
                let line = serde_json::to_string(&r)
                    .map_err(|e| glimpse::Error::InvalidInput(format!("parity report as JSON: {e}")))?;
                stdout.line(&line)?;
            } else {
                let (g, t) = (&r.glimpse_vs_fp32, &r.transformers_fp16_vs_fp32);
                stdout.line(&format!("prefill logits [{} x {}] on {}", r.rows, r.vocab, r.device))?;
                stdout.line(&format!(
                    "  glimpse vs transformers fp32:          rel {:.3e}  max abs {:.3e}  argmax {}/{}",
                    g.rel_l2, g.max_abs, g.argmax_agree, r.rows
                ))?;
                stdout.line(&format!(
                    "  transformers fp16 vs transformers fp32: rel {:.3e}  max abs {:.3e}  argmax {}/{}",
                    t.rel_l2, t.max_abs, t.argmax_agree, r.rows
                ))?;
                stdout.line(&format!(
                    "  ratio {:.2} (bar: <= 2): {}",
                    r.ratio,
                    if r.pass { "pass" } else { "FAIL" }
                ))?;
            }
            Ok(if r.pass { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}
