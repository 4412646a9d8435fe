//! The fuzz command: `cargo run --release --example fuzz -- --target all --cases 1000000 --seed 1`.
//! Prints cases, time and crashes per target; writes each crashing input to `--out`. Replay a
//! finding with `--target T --replay FILE` (runs it once, outside catch_unwind).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use glimpse::fuzz::{self, CountingAlloc, Options, Target};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[derive(Parser)]
struct Args {
    /// A target (safetensors, shard-index, config, generation-config, preprocessor, image) or `all`.
    #[arg(long, default_value = "all")]
    target: String,
    /// Cases per target.
    #[arg(long, default_value_t = 10_000)]
    cases: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Folder for crashing inputs.
    #[arg(long, default_value = "fuzz-findings")]
    out: PathBuf,
    /// A case slower than this (ms) is a finding.
    #[arg(long, default_value_t = 2000)]
    time_limit_ms: u64,
    /// A case whose heap grows more than this (MB) is a finding.
    #[arg(long, default_value_t = 2048)]
    memory_limit_mb: usize,
    /// The seed corpus: tests/fixtures of this checkout.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))]
    fixtures: PathBuf,
    /// Run one saved input (a finding) through the target and exit.
    #[arg(long)]
    replay: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> glimpse::Result<ExitCode> {
    let targets = if args.target == "all" { Target::ALL.to_vec() } else { vec![Target::parse(&args.target)?] };
    if let Some(file) = &args.replay {
        let input =
            std::fs::read(file).map_err(|e| glimpse::Error::InvalidInput(format!("{}: {e}", file.display())))?;
        for t in targets {
            t.run(&input);
            println!("{}: no panic", t.name());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let opts = Options {
        cases: args.cases,
        seed: args.seed,
        time_limit: Duration::from_millis(args.time_limit_ms),
        memory_limit: args.memory_limit_mb << 20,
        out_dir: Some(args.out.clone()),
        ..Options::default()
    };
    let mut crashes = 0;
    for target in targets {
        let seeds = target.seeds(&args.fixtures)?;
        let report = fuzz::run(target, &seeds, &opts)?;
        println!("{report}  (seed {}, {} seed inputs)", args.seed, seeds.len());
        for f in &report.findings {
            println!(
                "  case {}: {}  -> {}",
                f.case,
                f.what,
                f.written_to.as_ref().map_or("not written".into(), |p| p.display().to_string())
            );
        }
        crashes += report.findings.len();
    }
    Ok(if crashes == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
