//! The checks of tests/batch_exact.rs that run on the CPU path `GLIMPSE_CPU_ISA` selects, shared
//! with tests/batch_exact_avx2.rs (which forces the `avx2` path in its own process).

use std::sync::Arc;

use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::Executor;
use glimpse::graph::{Activation, Fused, Graph, WeightTable};
use glimpse::image::PixelValues;
use glimpse::quant::{QuantTensor, Quantize};
use glimpse::weights::Weight;
use glimpse::{Device, GenerateOptions, ImageInput, LoadOptions, Model, Output, Prompt, Request};
use half::f16;

/// Full-mantissa uniform values in [-1, 1) from a seed printed by [`Rng::fresh`].
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from the clock (printed, so a failure can be replayed).
    pub fn fresh(test: &str) -> Self {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        println!("{test}: seed {seed}");
        Rng(seed)
    }
    fn uni(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v = ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        // Never exactly zero (a zero row would hide any summation order).
        if v == 0.0 {
            0.5
        } else {
            v
        }
    }
    pub fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uni()).collect()
    }
    pub fn f16s(&mut self, n: usize) -> Vec<f16> {
        (0..n).map(|_| f16::from_f32(self.uni())).collect()
    }
}

/// The weight formats a decoder Linear runs with.
pub const FORMATS: [Option<Quantize>; 3] = [None, Some(Quantize::Int8), Some(Quantize::Int4)];

pub fn format_name(q: Option<Quantize>) -> String {
    q.map_or_else(|| "fp16".to_string(), |q| q.to_string())
}

/// A `[n, k]` weight in `format`.
pub fn weight(format: Option<Quantize>, n: usize, k: usize, rng: &mut Rng) -> Weight {
    let w = rng.f16s(n * k);
    match format {
        None => Weight::from_vec(vec![n, k], w),
        Some(q) => Weight::from_quantized(QuantTensor::quantize(q, "w", &[n, k], &w).unwrap()),
    }
}

/// One Linear through the executor (bias, GELU, residual added), `seqs` sequences of
/// `rows / seqs` rows at `position` (a decoder step: the left padding holds one value per
/// sequence, as `generate` sets it), on `x` (`[rows, k]`) with the residual `res`.
pub fn executor_linear(w: &Weight, bias: &[f16], x: &[f32], res: &[f32], seqs: usize, position: usize) -> Vec<f32> {
    let (n, k) = (w.shape[0], w.shape[1]);
    let rows = x.len() / k;
    let mut table = WeightTable::default();
    let wid = table.add("w", w.clone());
    let bid = table.add("b", Weight::from_vec(vec![n], bias.to_vec()));
    let mut g = Graph::new();
    let (xb, rb, yb) = (g.buffer("x", rows, k), g.buffer("res", rows, n), g.buffer("y", rows, n));
    g.linear(xb, wid, Some(bid), Fused::add(Activation::Gelu, Some(rb)), yb, rows);
    let phase = g.take_phase("linear");
    let mut cpu = CpuExecutor::new(Arc::new(table), &g.buffers);
    cpu.write(xb, x).unwrap();
    cpu.write(rb, res).unwrap();
    cpu.set_left_padding(&vec![0; seqs]);
    cpu.set_position(position);
    cpu.run(&phase).unwrap();
    cpu.read(yb, rows).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Shapes off the GEMV's 16/32-input chunks, the int4 group of 128, the GEMM's 32-column panels
/// and 256-input slices.
pub const SHAPES: [(usize, usize); 4] = [(67, 300), (40, 2 * 256 + 37), (33, 128), (5, 17)];

/// A decode step of `b` sequences (one row each, position > 0) gives every sequence, bit for
/// bit, what a step of that sequence alone gives, for every batch size up to 16 (every chunking
/// of the GEMV's 4 rows) and every weight format.
pub fn decode_step_rows_equal_rows_alone(test: &str) {
    let mut rng = Rng::fresh(test);
    for format in FORMATS {
        for (n, k) in SHAPES {
            let w = weight(format, n, k, &mut rng);
            let bias = rng.f16s(n);
            let (x, res) = (rng.f32s(16 * k), rng.f32s(16 * n));
            let alone: Vec<Vec<u32>> = (0..16)
                .map(|r| bits(&executor_linear(&w, &bias, &x[r * k..][..k], &res[r * n..][..n], 1, 7)))
                .collect();
            for b in (1..=9).chain([12, 16]) {
                let got = executor_linear(&w, &bias, &x[..b * k], &res[..b * n], b, 7);
                for (r, want) in alone.iter().enumerate().take(b) {
                    assert_eq!(
                        &bits(&got[r * n..][..n]),
                        want,
                        "{} [{n}, {k}]: row {r} of a decode step of {b} sequences differs from the row alone",
                        format_name(format)
                    );
                }
            }
        }
    }
}

/// A prefill of `seqs` left-padded prompts (position 0): each prompt's rows equal, bit for bit,
/// the rows of that prompt prefilled alone, for prompts of 1 to 17 rows padded to 17 (rows
/// alone on both sides of the GEMV's 4, the GEMM's 14-row tile).
pub fn prefill_rows_equal_rows_alone(test: &str) {
    let mut rng = Rng::fresh(test);
    let lens = [1, 2, 4, 5, 9, 14, 15, 17];
    let longest = 17;
    for format in FORMATS {
        for (n, k) in SHAPES {
            let w = weight(format, n, k, &mut rng);
            let bias = rng.f16s(n);
            let seqs = lens.len();
            let (x, res) = (rng.f32s(seqs * longest * k), rng.f32s(seqs * longest * n));
            let batched = executor_linear(&w, &bias, &x, &res, seqs, 0);
            for (s, &len) in lens.iter().enumerate() {
                // The prompt's rows are the last `len` of its block (left padding).
                let first = s * longest + longest - len;
                let alone = executor_linear(&w, &bias, &x[first * k..][..len * k], &res[first * n..][..len * n], 1, 0);
                assert_eq!(
                    bits(&batched[first * n..][..len * n]),
                    bits(&alone),
                    "{} [{n}, {k}]: the {len} rows of a prompt in a padded prefill of {seqs} differ from the prompt alone",
                    format_name(format)
                );
            }
        }
    }
}

const IMAGES: [&str; 8] = [
    "photo_q90.jpg",
    "wide_301x97.png",
    "tall_83x311.png",
    "odd_257x181.png",
    "rgba_150x120.png",
    "palette_100x80.png",
    "grey_67x45.png",
    "exact_224x224.png",
];

const QUESTIONS: [&str; 8] = [
    "what?",
    "what is the colour of the big object in the middle of this picture?",
    "how many are there?",
    "who?",
    "is it a cat?",
    "where is it?",
    "what is this?",
    "why?",
];

fn pixels(model: &Model, name: &str) -> PixelValues {
    let bytes = std::fs::read(super::common::image(name)).unwrap();
    model.preprocess_input(&ImageInput::Bytes { bytes: &bytes, name }).unwrap()
}

/// Text, tokens, log-probabilities and beam score, the floats as bit patterns.
type Answer = (String, Vec<u32>, Vec<u64>, Option<u64>);

fn answer(o: &Output) -> Answer {
    (o.text.clone(), o.tokens.clone(), o.logprobs.iter().map(|l| l.to_bits()).collect(), o.score.map(f64::to_bits))
}

fn generate(model: &Model, images: &[PixelValues], prompt: Prompt<'_>, opts: &GenerateOptions) -> Vec<Answer> {
    model.generate(&Request::new(images, prompt, opts), &mut |_| {}).unwrap().iter().map(answer).collect()
}

/// `images` answered in one batch against each answered alone, to the bit.
fn check(what: &str, model: &Model, images: &[PixelValues], questions: Option<&[&str]>, opts: &GenerateOptions) {
    let batched = match questions {
        Some(q) => generate(model, images, Prompt::PerImage(q), opts),
        None => generate(model, images, Prompt::Caption, opts),
    };
    assert_eq!(batched.len(), images.len());
    for (i, got) in batched.iter().enumerate() {
        let one = std::slice::from_ref(&images[i]);
        let alone = match questions {
            Some(q) => generate(model, one, Prompt::PerImage(&q[i..i + 1]), opts).remove(0),
            None => generate(model, one, Prompt::Caption, opts).remove(0),
        };
        assert!(!alone.1.is_empty());
        assert_eq!(
            got,
            &alone,
            "{what}: image {i} ({}) in a batch of {} differs from it alone",
            IMAGES[i],
            images.len()
        );
    }
}

/// On `fixture` in every weight format: greedy captions of 8 different images in one batch,
/// 8 different questions in one left-padded batch, and a 3-beam search over 3 images (9
/// sequences), each equal to the image asked alone: text, tokens, every log-probability and
/// the beam score, to the bit.
pub fn batched_answers_equal_answers_alone(fixture: &str, questions: bool) {
    for format in FORMATS {
        let model =
            Model::load_with(super::common::model_dir(fixture), Device::Cpu, LoadOptions { quantize: format }).unwrap();
        let images: Vec<PixelValues> = IMAGES.iter().map(|i| pixels(&model, i)).collect();
        let greedy = GenerateOptions { max_new_tokens: Some(10), min_new_tokens: 10, ..model.default_options() };
        let what = format!("{fixture} {}", format_name(format));
        check(&format!("{what} captions"), &model, &images, None, &greedy);
        if questions {
            check(&format!("{what} questions"), &model, &images, Some(&QUESTIONS), &greedy);
        }
        let beams = GenerateOptions { num_beams: 3, ..greedy.clone() };
        check(&format!("{what} 3 beams"), &model, &images[..3], None, &beams);
    }
}
