//! `glimpse bench` for embedding models (CLIP): images/s and texts/s at each batch size of
//! `--throughput-batches`, next to the floor read off the graph (`crate::cost`).
//!
//! Each row builds the batch's plan and executor once (as a loaded model serves requests), then
//! times `--repeats` requests after a warm-up: `phase ms` is the tower's phase alone
//! (`Executor::run_timed`: CUDA events on a GPU, wall clock on the CPU), `request ms` the whole
//! request by wall clock (pixels or tokens written, the phase, the embeddings read back; image
//! decoding and preprocessing are not in it, as in transformers' `get_image_features`). Rates are
//! `batch / request ms`. Texts are `BENCH_TEXT_TOKENS` ids each (BOS, random ids, EOS), about a
//! "a photo of a {label}." prompt.

use std::time::Instant;

use serde::Serialize;

use super::{floor_ms, matrix_rate_note, measure_rates, median, pick_device, BenchArgs, Rates, RunHeader};
use crate::backend::{Backend, Executor};
use crate::cost::GraphCost;
use crate::error::{Error, Result};
use crate::models::ModelConfig;
use crate::models::{EmbedPlan, Embedder};

/// Tokens per text of the text rows (BOS and EOS included).
pub const BENCH_TEXT_TOKENS: usize = 16;

/// One timed (tower, batch) row.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedRow {
    /// "image" or "text".
    pub input: &'static str,
    pub batch: usize,
    /// Median of the tower's phase alone.
    pub phase_ms: Option<f64>,
    /// Median of the whole request (inputs written, phase, embeddings read).
    pub request_ms: Option<f64>,
    /// `batch / request_ms`.
    pub per_s: Option<f64>,
    pub floor_ms: f64,
    pub memory_floor_ms: f64,
    pub compute_floor_ms: Option<f64>,
    pub bytes: f64,
    pub flops: f64,
    /// `floor_ms / phase_ms`.
    pub fraction_of_floor: Option<f64>,
    pub skipped: Option<String>,
}

/// The embedding benchmark's report.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedReport {
    #[serde(flatten)]
    pub header: RunHeader,
    pub repeats: usize,
    pub text_tokens: usize,
    pub rates: Rates,
    pub rows: Vec<EmbedRow>,
    pub notes: Vec<String>,
}

/// Whether `args` names an embedding model (a CLIP preset or folder).
pub fn embeds(args: &BenchArgs) -> Result<bool> {
    match (&args.model, &args.preset) {
        (Some(m), _) => {
            let dir = crate::hub::resolve_model(m)?;
            Ok(ModelConfig::load(&dir.join("config.json"))?.embeds())
        }
        (None, Some(p)) => Ok(crate::synth::preset(p)?.embeds()),
        (None, None) => Ok(false),
    }
}

/// The embedder to time, with its label and preset name.
fn load(args: &BenchArgs) -> Result<(Box<dyn Embedder>, String, Option<String>)> {
    if let Some(m) = &args.model {
        let dir = crate::hub::resolve_model(m)?;
        let cfg = ModelConfig::load(&dir.join("config.json"))?;
        let ckpt = crate::weights::Checkpoint::open_dir(&dir)?;
        return Ok((crate::models::load_embedder(&cfg, &ckpt)?, dir.display().to_string(), None));
    }
    let name = args.preset.clone().unwrap_or_default();
    let cfg = crate::synth::preset(&name)?;
    let ckpt = crate::synth::random_checkpoint(&cfg, args.seed)?;
    let label = format!("preset {name} (random weights, seed {})", args.seed);
    Ok((crate::models::load_embedder(&cfg, &ckpt)?, label, Some(name)))
}

/// Runs the embedding benchmark.
pub fn run(args: &BenchArgs) -> Result<EmbedReport> {
    if args.repeats == Some(0) {
        return Err(Error::InvalidInput(
            "--repeats 0: each row needs at least 1 timed run (omit it for the default: 10 on a GPU, 3 on the CPU)"
                .into(),
        ));
    }
    if args.throughput_batches.is_empty() || args.throughput_batches.contains(&0) {
        return Err(Error::InvalidInput("--throughput-batches: give batch sizes of at least 1 (e.g. 1,8,32)".into()));
    }
    let (family, model, preset) = load(args)?;
    let backend = Backend::new(pick_device(&args.device)?, &family.core().weights)?;
    let act_bytes = if backend.is_cuda() { 2.0 } else { 4.0 };
    let repeats = args.repeats.unwrap_or(if backend.is_cuda() { 10 } else { 3 });
    let rates = measure_rates(&backend)?;
    let timer = RowTimer { family: family.as_ref(), backend: &backend, act_bytes, rates: &rates, repeats };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &batch in &args.throughput_batches {
        if let Some(side) = family.image_size() {
            let plan = family.image_plan(batch)?;
            let pixels = crate::synth::random_normal(batch * 3 * side * side, args.seed ^ batch as u64);
            let request = |exec: &mut dyn Executor| -> Result<()> {
                exec.write(input(&plan, "pixels")?, &pixels)?;
                Ok(())
            };
            rows.push(timer.time_row("image", &plan, &request));
        }
        if let Some(positions) = family.text_positions() {
            let len = BENCH_TEXT_TOKENS.min(positions);
            let ids = text_ids(family.as_ref(), batch, len, args.seed);
            let plan = family.text_plan(batch, len)?;
            let rows_at = family.pool_rows(&ids);
            let mask = vec![0.0f32; batch * len];
            let request = |exec: &mut dyn Executor| -> Result<()> {
                exec.write(input(&plan, "key_mask")?, &mask)?;
                exec.set_tokens(&ids.concat());
                exec.set_position(0);
                exec.set_row_indices(&rows_at);
                Ok(())
            };
            rows.push(timer.time_row("text", &plan, &request));
        }
    }
    notes.extend(matrix_rate_note(&rates));
    Ok(EmbedReport {
        header: RunHeader::new(&backend.name(), model, preset, args.seed, &family.core().weights),
        repeats,
        text_tokens: BENCH_TEXT_TOKENS,
        rates,
        rows,
        notes,
    })
}

/// `batch` texts of `len` ids: BOS, random ordinary ids, EOS, pooled where the model's rule
/// finds the EOS.
fn text_ids(family: &dyn Embedder, batch: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let text = family.text_vocab();
    let vocab = text.map_or(3, |(vocab, _)| vocab).max(3) as u32;
    // CLIP's tokenizers put <|startoftext|> and <|endoftext|> last; eos_token_id 2 is the legacy
    // config value that means "pool at the largest id", i.e. at that last id too.
    let bos = vocab - 2;
    let eos = match text.and_then(|(_, eos)| eos) {
        Some(e) if e != 2 && e < vocab => e,
        _ => vocab - 1,
    };
    let noise = crate::synth::random_normal(batch * len, seed ^ 0x7E47);
    (0..batch)
        .map(|b| {
            (0..len)
                .map(|j| match j {
                    0 => bos,
                    j if j + 1 == len => eos,
                    // Ordinary ids below both special tokens: the EOS appears once.
                    j => (noise[b * len + j].abs() * 1e4) as u32 % bos.min(eos).max(1),
                })
                .collect()
        })
        .collect()
}

fn input(plan: &EmbedPlan, name: &str) -> Result<crate::graph::Buf> {
    plan.inputs
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, b)| b)
        .ok_or_else(|| Error::InvalidInput(format!("the embedding plan has no input `{name}`")))
}

/// What every row of one report is timed with: the model, the backend it runs on, the bytes per
/// activation element and device rates its floors are read with, and the timed requests per row.
struct RowTimer<'a> {
    family: &'a dyn Embedder,
    backend: &'a Backend,
    act_bytes: f64,
    rates: &'a Rates,
    repeats: usize,
}

impl RowTimer<'_> {
    /// Times one row: an executor for the plan, a warm-up request, then `repeats` requests.
    fn time_row(
        &self,
        kind: &'static str,
        plan: &EmbedPlan,
        prepare: &dyn Fn(&mut dyn Executor) -> Result<()>,
    ) -> EmbedRow {
        let RowTimer { family, backend, act_bytes, rates, repeats } = *self;
        let weights = &family.core().weights;
        let cost = GraphCost { graph: &plan.graph, weights, act_bytes }.phase(&plan.phase, 0, &[], &[plan.output]);
        let (floor, mem, comp) = floor_ms(&cost, rates);
        let mut row = EmbedRow {
            input: kind,
            batch: plan.batch,
            phase_ms: None,
            request_ms: None,
            per_s: None,
            floor_ms: floor,
            memory_floor_ms: mem,
            compute_floor_ms: comp,
            bytes: cost.bytes,
            flops: cost.flops,
            fraction_of_floor: None,
            skipped: None,
        };
        let timed = (|| -> Result<(f64, f64)> {
            let mut exec = backend.executor(weights, &plan.graph)?;
            let (mut phase, mut request) = (Vec::new(), Vec::new());
            for r in 0..=repeats {
                prepare(exec.as_mut())?;
                let ms = exec.run_timed(&plan.phase)?;
                exec.read(plan.output, plan.batch)?;
                // The whole request again by wall clock, as a caller sees it.
                let start = Instant::now();
                prepare(exec.as_mut())?;
                exec.run(&plan.phase)?;
                exec.read(plan.output, plan.batch)?;
                if r > 0 {
                    phase.push(ms);
                    request.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok((median(&phase), median(&request)))
        })();
        match timed {
            Ok((phase, request)) => {
                row.phase_ms = Some(phase);
                row.request_ms = Some(request);
                row.per_s = Some(plan.batch as f64 / (request / 1e3));
                row.fraction_of_floor = Some(floor / phase);
            }
            Err(e) => row.skipped = Some(format!("failed: {e}")),
        }
        row
    }
}

impl EmbedReport {
    /// The readable form: header, rates, one row per (tower, batch).
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        self.header.write(&mut s);
        let _ =
            writeln!(s, "median of {} requests after a warm-up; texts of {} tokens", self.repeats, self.text_tokens);
        let _ = writeln!(s, "copy bandwidth {:.1} GB/s ({})", self.rates.copy_gbs, self.rates.copy_source);
        if let Some(g) = self.rates.matrix_gflops {
            let _ = writeln!(s, "matrix rate    {:.1} GFLOP/s ({})", g, self.rates.matrix_source);
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<6} {:>6} {:>10} {:>11} {:>10} {:>10} {:>11}",
            "input", "batch", "phase ms", "request ms", "per s", "floor ms", "% of floor"
        );
        for r in &self.rows {
            match (&r.skipped, r.phase_ms, r.request_ms, r.per_s) {
                (None, Some(p), Some(q), Some(v)) => {
                    let _ = writeln!(
                        s,
                        "{:<6} {:>6} {:>10.3} {:>11.3} {:>10.1} {:>10.3} {:>10.1}%",
                        r.input,
                        r.batch,
                        p,
                        q,
                        v,
                        r.floor_ms,
                        100.0 * r.fraction_of_floor.unwrap_or(f64::NAN)
                    );
                }
                (why, ..) => {
                    let _ =
                        writeln!(s, "{:<6} {:>6} skipped: {}", r.input, r.batch, why.as_deref().unwrap_or("unknown"));
                }
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}
