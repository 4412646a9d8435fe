//! The `glimpse` command line: caption, ask, info, convert, synth, bench.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use glimpse::{Device, GenerateOptions, Model, Output};

#[derive(Parser)]
#[command(name = "glimpse", version, about = "Fast, faithful vision-language inference (BLIP-2) from Hugging Face checkpoints")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct RunArgs {
    /// Model folder, or a hub id (e.g. Salesforce/blip2-opt-2.7b) already in the local HF cache.
    #[arg(long, short)]
    model: String,
    /// cpu, cuda, or auto (CUDA when usable, else CPU).
    #[arg(long, default_value = "auto")]
    device: String,
    /// New tokens to generate at most (default: generation_config.json, else 20).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// One JSON object per image per line: image, text, tokens, logprobs, timings, device.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Caption one or more images.
    Caption {
        #[command(flatten)]
        run: RunArgs,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Answer a question about an image ("Question: {q} Answer:").
    Ask {
        #[command(flatten)]
        run: RunArgs,
        image: PathBuf,
        question: String,
    },
    /// Describe a model folder: family, dimensions, parameters, dtypes, size on disk.
    Info { model: String },
    /// Write an fp16 copy of a checkpoint folder, so later loads are zero-copy.
    Convert { input: PathBuf, output: PathBuf },
    /// Write a model with random weights at real shapes as an HF checkpoint folder.
    Synth {
        /// tiny, blip2-opt-2.7b or blip2-opt-6.7b.
        #[arg(long)]
        preset: String,
        /// New or empty folder to write.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
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

/// `glimpse --version`: the crate version and whether CUDA kernels are embedded (for which archs).
fn version() -> String {
    let kernels = if glimpse::backend::cuda::kernels_available() {
        format!("CUDA kernels: {}", glimpse::backend::cuda::kernel_archs())
    } else {
        "built without CUDA kernels".to_string()
    };
    format!("{} ({kernels})", env!("CARGO_PKG_VERSION"))
}

fn main() -> ExitCode {
    // clap takes a 'static version string; this one is built once per process.
    let version: &'static str = Box::leak(version().into_boxed_str());
    let matches = Cli::command().version(version).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &RunArgs) -> glimpse::Result<(Model, GenerateOptions)> {
    let dir = glimpse::hub::resolve_model(&args.model)?;
    let model = Model::load(&dir, args.device.parse::<Device>()?)?;
    let mut opts = model.default_options();
    if let Some(n) = args.max_new_tokens {
        opts.max_new_tokens = Some(n);
    }
    opts.validate()?;
    Ok((model, opts))
}

fn print_output(model: &Model, image: &Path, out: &Output, json: bool) {
    if json {
        let line = serde_json::json!({
            "image": image.display().to_string(),
            "text": out.text,
            "tokens": out.tokens,
            "logprobs": out.logprobs,
            "timings": out.timings,
            "device": out.device,
            "load_seconds": model.load_seconds,
        });
        println!("{line}");
    } else {
        println!("{}", out.text);
    }
}

fn run(command: Command) -> glimpse::Result<ExitCode> {
    match command {
        Command::Caption { run, images } => {
            let (model, opts) = load(&run)?;
            let mut failed = 0;
            for image in &images {
                // One bad image is reported and skipped; the others are still captioned.
                match model.caption(image, &opts) {
                    Ok(out) => print_output(&model, image, &out, run.json),
                    Err(e) => {
                        eprintln!("error: {e}");
                        failed += 1;
                    }
                }
            }
            Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Ask { run, image, question } => {
            let (model, opts) = load(&run)?;
            let out = model.ask(&image, &question, &opts)?;
            print_output(&model, &image, &out, run.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Info { model } => {
            let dir = glimpse::hub::resolve_model(&model)?;
            println!("{}", glimpse::info::describe(&dir)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert { input, output } => {
            let (n, bytes) = glimpse::convert::convert_dir(&input, &output)?;
            println!("wrote {n} tensors ({:.1} MB) to {}", bytes as f64 / 1e6, output.join("model.safetensors").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Synth { preset, out, seed } => {
            let start = std::time::Instant::now();
            glimpse::synth::write_folder(&preset, &out, seed)?;
            let params = glimpse::synth::parameter_count(&glimpse::synth::preset(&preset)?);
            eprintln!(
                "wrote {preset} (seed {seed}, {:.3} B parameters, fp16) to {} in {:.1} s",
                params as f64 / 1e9,
                out.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            glimpse::bench::run_cli(&args)?;
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
            let r = glimpse::parity::run(&dir, &reference, device.parse()?, emulation)?;
            if json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                let (g, t) = (&r.glimpse_vs_fp32, &r.transformers_fp16_vs_fp32);
                println!("prefill logits [{} x {}] on {}", r.rows, r.vocab, r.device);
                println!("  glimpse vs transformers fp32:          rel {:.3e}  max abs {:.3e}  argmax {}/{}", g.rel_l2, g.max_abs, g.argmax_agree, r.rows);
                println!("  transformers fp16 vs transformers fp32: rel {:.3e}  max abs {:.3e}  argmax {}/{}", t.rel_l2, t.max_abs, t.argmax_agree, r.rows);
                println!("  ratio {:.2} (bar: <= 2): {}", r.ratio, if r.pass { "pass" } else { "FAIL" });
            }
            Ok(if r.pass { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}
