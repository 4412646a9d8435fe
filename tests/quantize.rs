//! Weight-only quantization at load (`--quantize int8|int4`, `glimpse::quant`): the quantized
//! weights against their fp16 originals (exact bounds), which weights are quantized, and the
//! quantized models against fp16 on the tiny fixtures (logits and greedy tokens, measured).

mod common;

use std::process::Command;
use std::sync::Arc;

use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::Executor;
use glimpse::quant::{QuantTensor, Quantize, INT4_GROUP};
use glimpse::{Device, GenerateOptions, LoadOptions, Model};
use half::f16;

fn load(name: &str, quantize: Option<Quantize>) -> Model {
    load_dir(&common::model_dir(name), quantize)
}

fn load_dir(dir: &std::path::Path, quantize: Option<Quantize>) -> Model {
    Model::load_with(dir, Device::Cpu, LoadOptions { quantize }).unwrap()
}

/// `|w - deq(q(w))| <= s / 2` for every element, in exact (f64) arithmetic; the values in range
/// ([-127, 127] or [-7, 7]); each scale the smallest fp16 >= max|w| / qmax over its span.
fn check_quantized(name: &str, q: &QuantTensor, w: &[f16]) {
    let qmax = match q.format {
        Quantize::Int8 => 127.0,
        Quantize::Int4 => 7.0,
    };
    assert_eq!(w.len(), q.rows * q.cols, "{name}: shape");
    for j in 0..q.rows {
        for kk in 0..q.cols {
            let (wv, s) = (w[j * q.cols + kk].to_f64(), q.scale(j, kk).to_f64());
            let v = q.q(j, kk);
            assert!(f64::from(v.abs()) <= qmax, "{name} ({j}, {kk}): q = {v} out of range");
            let err = (wv - f64::from(v) * s).abs();
            assert!(err <= s / 2.0, "{name} ({j}, {kk}): |w - deq| = {err} > s/2 = {}", s / 2.0);
            assert_eq!(f64::from(q.dequant(j, kk)), f64::from(v) * s, "{name}: dequantization is exact in f32");
        }
        for g in 0..q.groups() {
            let span = g * q.group_len()..((g + 1) * q.group_len()).min(q.cols);
            let max = span.clone().map(|kk| w[j * q.cols + kk].to_f64().abs()).fold(0.0, f64::max);
            let s = q.scale(j, span.start);
            assert!(s.to_f64() >= max / qmax, "{name} row {j} group {g}: scale below max/qmax");
            if max > 0.0 {
                let below = f16::from_bits(s.to_bits() - 1).to_f64();
                assert!(below < max / qmax, "{name} row {j} group {g}: scale {s} is not the smallest fp16 >= max/qmax");
            }
        }
    }
}

#[test]
fn random_weights_meet_the_error_bound() {
    // Odd and tail shapes: k = 1, odd k (a half-used last int4 byte), k with a short last group.
    for (seed, &(n, k)) in [(1, 1), (3, 7), (5, 128), (4, 129), (2, 300), (7, 517)].iter().enumerate() {
        let mut w: Vec<f16> =
            glimpse::synth::random_normal(n * k, 40 + seed as u64).into_iter().map(f16::from_f32).collect();
        // An all-zero row (scale 0) and a row with one large value.
        if n > 2 {
            w[..k].iter_mut().for_each(|v| *v = f16::ZERO);
            w[k] = f16::from_f32(300.0);
        }
        for format in [Quantize::Int8, Quantize::Int4] {
            let q = QuantTensor::quantize(format, "random", &[n, k], &w).unwrap();
            check_quantized(&format!("random {format} [{n}, {k}]"), &q, &w);
            let groups = if format == Quantize::Int8 { 1 } else { k.div_ceil(INT4_GROUP) };
            let data = if format == Quantize::Int8 { n * k } else { n * k.div_ceil(2) };
            assert_eq!(q.bytes(), data + n * groups * 2, "{format} [{n}, {k}]: bytes");
        }
    }
}

#[test]
fn bad_weights_are_clear_errors() {
    let w = vec![f16::ONE, f16::NAN, f16::ONE, f16::ONE];
    let err = QuantTensor::quantize(Quantize::Int8, "layers.0.fc1.weight", &[2, 2], &w).unwrap_err().to_string();
    assert!(err.contains("layers.0.fc1.weight") && err.contains("not finite"), "{err}");
    let err = QuantTensor::quantize(Quantize::Int4, "x.weight", &[4], &w).unwrap_err().to_string();
    assert!(err.contains("x.weight") && err.contains("2-D"), "{err}");
    let err = "int3".parse::<Quantize>().unwrap_err().to_string();
    assert!(err.contains("int3") && err.contains("int8 or int4"), "{err}");
}

/// Every fixture family: exactly the decoder's Linear weights are quantized (names checked),
/// each within the bound of its fp16 original; everything else is untouched.
#[test]
fn fixture_decoders_quantize_within_the_bound() {
    // (fixture, the decoder's Linear weight names end in one of these, how many there are)
    let opt = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight"];
    let llama = [
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    ];
    let t5 = ["q.weight", "k.weight", "v.weight", "o.weight", "wi.weight", "wi_0.weight", "wi_1.weight", "wo.weight"];
    for (name, suffixes, decoder) in [
        ("blip2-opt-tiny", &opt[..], "language_model"),
        ("llava-tiny", &llama[..], "language_model"),
        ("instructblip-tiny", &llama[..], "language_model"),
        ("blip2-flan-t5-tiny", &t5[..], "language_model.decoder."),
    ] {
        // T5's cross-attention K/V run in the encoder phase (once per request): left in fp16.
        let is_decoder_linear = |n: &str| {
            n.contains(decoder)
                && suffixes.iter().any(|s| n.ends_with(s))
                && !n.contains("EncDecAttention.k")
                && !n.contains("EncDecAttention.v")
        };
        let fp16 = load(name, None);
        let base = fp16.family.weights();
        for format in [Quantize::Int8, Quantize::Int4] {
            let model = load(name, Some(format));
            let table = model.family.weights();
            let mut quantized = 0;
            for (i, (wname, w)) in table.names.iter().zip(&table.weights).enumerate() {
                let orig = &base.weights[i];
                assert_eq!(base.names[i], *wname);
                match w.quantized() {
                    Some(q) => {
                        quantized += 1;
                        assert!(
                            is_decoder_linear(wname),
                            "{name} {format}: `{wname}` quantized but is not a decoder Linear weight"
                        );
                        assert!(orig.as_slice().iter().any(|v| v.to_f32() != 0.0), "{name}: `{wname}` is all zeros");
                        check_quantized(&format!("{name} {format} {wname}"), q, orig.as_slice());
                        assert_eq!(w.stored_bytes(), q.bytes());
                    }
                    None => {
                        assert!(!is_decoder_linear(wname), "{name} {format}: decoder Linear `{wname}` left in fp16");
                        assert_eq!(w.as_slice(), orig.as_slice(), "{name} {format}: `{wname}` changed");
                    }
                }
            }
            assert!(quantized > 0, "{name} {format}: nothing quantized");
            // ||w - deq(q(w))|| / ||w|| over every quantized weight, reported.
            let (mut diff, mut norm) = (0f64, 0f64);
            for (w, orig) in table.weights.iter().zip(&base.weights) {
                if let Some(q) = w.quantized() {
                    for j in 0..q.rows {
                        for (kk, v) in q.dequant_row(j).iter().enumerate() {
                            let o = orig.as_slice()[j * q.cols + kk].to_f64();
                            diff += (f64::from(*v) - o).powi(2);
                            norm += o * o;
                        }
                    }
                }
            }
            println!("{name} {format}: {quantized} weights quantized, weight rel. error {:.2e}", (diff / norm).sqrt());
        }
    }
}

/// The prefill logits of every position of `ids` (teacher forcing), `[rows][vocab]`.
fn all_logits(model: &Model, pixels: &[f32], ids: &[u32]) -> Vec<Vec<f32>> {
    let plan = model.family.plan(1, ids.len(), 1, true).unwrap();
    let mut exec: Box<dyn Executor> =
        Box::new(CpuExecutor::new(Arc::clone(model.family.weights()), &plan.graph.buffers));
    exec.write(plan.input("pixels").unwrap(), pixels).unwrap();
    common::write_no_padding_mask(&mut exec, &plan);
    for phase in &plan.encoders {
        exec.run(phase).unwrap();
    }
    exec.set_tokens(ids);
    exec.set_position(0);
    exec.run(&plan.prefill.phase).unwrap();
    let all = exec.read(plan.prefill.logits, ids.len()).unwrap();
    let vocab = all.len() / ids.len();
    all.chunks(vocab).map(<[f32]>::to_vec).collect()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// What a quantized decoder-only model does against fp16 on one image, 20 greedy steps.
struct Measured {
    /// max over the steps of ||logits_q - logits_fp16|| / ||logits_fp16||, teacher-forced on
    /// fp16's greedy tokens.
    max_rel: f64,
    mean_rel: f64,
    /// Steps (teacher-forced) whose argmax equals fp16's.
    top1: usize,
    /// Free-running greedy: tokens equal to fp16's at the same step, and the common prefix.
    greedy_equal: usize,
    prefix: usize,
    steps: usize,
    /// max over the steps of ||logits_q - logits_deq16|| / ||logits_deq16||, where deq16 is the
    /// fp16 model with each quantized weight replaced by its dequantized values rounded to fp16
    /// (NaN when not measured).
    kernel_rel: f64,
}

fn measure(name: &str, format: Quantize) -> Measured {
    measure_dir(name, &common::model_dir(name), format, true)
}

/// [`measure`] on a model folder; `against_deq16` also runs the fp16(deq) model (one more copy
/// of the decoder in memory).
fn measure_dir(name: &str, dir: &std::path::Path, format: Quantize, against_deq16: bool) -> Measured {
    let (fp16, quant) = (load_dir(dir, None), load_dir(dir, Some(format)));
    let px = fp16.preprocess(&common::image("exact_224x224.png")).unwrap();
    // 20 steps, EOS ignored (random synth models end early otherwise).
    let opts = GenerateOptions { max_new_tokens: Some(20), eos_token_ids: Vec::new(), ..fp16.default_options() };
    let want = fp16.caption_pixels(&px, &opts, &mut |_| {}).unwrap();
    let got = quant.caption_pixels(&px, &opts, &mut |_| {}).unwrap();
    let prompt = fp16.input_ids(None).unwrap();
    let n = want.tokens.len();
    // Decoder input: the prompt, then fp16's tokens but the last: rows prompt-1 .. prompt-1+n
    // are the n steps' logits.
    let ids: Vec<u32> = prompt.iter().chain(&want.tokens[..n - 1]).copied().collect();
    let (lf, lq) = (all_logits(&fp16, &px.data, &ids), all_logits(&quant, &px.data, &ids));
    // The fp16 model run by the fp16 kernels on fp16(deq(q(w))): what the quantized kernels
    // compute, up to one fp16 rounding of each dequantized weight (2^-12 relative at most).
    let ld = if against_deq16 {
        let mut deq16 = load_dir(dir, None);
        let table = Arc::make_mut(&mut deq16.family.core_mut().weights);
        for (dst, w) in table.weights.iter_mut().zip(&quant.family.weights().weights) {
            if let Some(q) = w.quantized() {
                let values = (0..q.rows).flat_map(|j| q.dequant_row(j)).map(f16::from_f32).collect();
                *dst = glimpse::weights::Weight::from_vec(vec![q.rows, q.cols], values);
            }
        }
        all_logits(&deq16, &px.data, &ids)
    } else {
        Vec::new()
    };
    let kernel_rel = if against_deq16 { 0.0 } else { f64::NAN };
    let mut m = Measured { max_rel: 0.0, mean_rel: 0.0, top1: 0, greedy_equal: 0, prefix: 0, steps: n, kernel_rel };
    for step in 0..n {
        let row = prompt.len() - 1 + step;
        let (_, rel) = common::errors(&lq[row], &lf[row]);
        m.max_rel = m.max_rel.max(rel);
        if against_deq16 {
            m.kernel_rel = m.kernel_rel.max(common::errors(&lq[row], &ld[row]).1);
        }
        m.mean_rel += rel / n as f64;
        assert_eq!(argmax(&lf[row]), want.tokens[step] as usize, "{name}: teacher-forced fp16 argmax is its token");
        m.top1 += usize::from(argmax(&lq[row]) == argmax(&lf[row]));
    }
    m.greedy_equal = want.tokens.iter().zip(&got.tokens).filter(|(a, b)| a == b).count();
    m.prefix = want.tokens.iter().zip(&got.tokens).take_while(|(a, b)| a == b).count();
    println!(
        "{name} {format}: logits rel. error max {:.2e} mean {:.2e}; teacher-forced top-1 agreement {}/{n}; free greedy tokens equal {}/{n}, common prefix {}; vs fp16(deq) weights {:.2e}",
        m.max_rel, m.mean_rel, m.top1, m.greedy_equal, m.prefix, m.kernel_rel
    );
    m
}

/// The quantized kernels against the fp16 kernels on fp16(deq(q(w))) weights: the two differ
/// only by one fp16 rounding of each dequantized weight (<= 2^-12 relative, ~1.4e-4 RMS), which
/// the tiny random decoders amplify ~10-18x (as they amplify the quantization error itself:
/// int8's 0.5-0.7% weight error becomes 4-7% in the logits); measured 1.4e-3 to 2.5e-3 on every
/// CPU path (GLIMPSE_CPU_ISA avx512, avx2, portable). A wrong scale, nibble order or group
/// index, or a GEMV / GEMM path that mixes rows, moves this by int8's error (4e-2) or more.
const KERNEL_REL: f64 = 5e-3;
/// int8 against fp16, measured 4.3e-2 (llava-tiny) and 6.7e-2 (blip2-opt-tiny, random weights
/// whose logits are ~5x as sensitive as the weights): the bar is ~2x the largest. int4 is
/// reported only (BENCHMARKS.md), as the issue asks.
const INT8_LOGITS_REL: f64 = 0.15;

#[test]
fn quantized_decoders_against_fp16() {
    // Decoder-only fixtures whose encoders read the image only (the harness writes pixels).
    for name in ["blip2-opt-tiny", "llava-tiny"] {
        let m8 = measure(name, Quantize::Int8);
        assert!(m8.max_rel <= INT8_LOGITS_REL, "{name} int8: logits rel. error {} > {INT8_LOGITS_REL}", m8.max_rel);
        assert!(m8.max_rel > 0.0, "{name} int8: logits identical to fp16: was anything quantized?");
        assert!(m8.top1 * 10 >= m8.steps * 9, "{name} int8: top-1 agrees on {}/{} steps", m8.top1, m8.steps);
        assert!(m8.kernel_rel <= KERNEL_REL, "{name} int8: {} from the fp16(deq) model", m8.kernel_rel);
        let m4 = measure(name, Quantize::Int4);
        assert!(m4.kernel_rel <= KERNEL_REL, "{name} int4: {} from the fp16(deq) model", m4.kernel_rel);
        assert!(
            m4.max_rel.is_finite() && m4.max_rel > m8.max_rel,
            "{name}: int4 should move the logits more than int8"
        );
    }
    // llava-tiny's greedy tokens under int8 are fp16's, all 20 (measured; blip2-opt-tiny's
    // diverge after 3, its teacher-forced top-1 differing at 1 step of 20).
    let m = measure("llava-tiny", Quantize::Int8);
    assert_eq!((m.greedy_equal, m.steps), (20, 20), "llava-tiny int8 greedy tokens");
}

#[test]
fn encoder_decoder_greedy_tokens() {
    // T5 (its decoder quantized, the encoder fp16): free-running greedy tokens, reported.
    for name in ["blip2-flan-t5-tiny", "instructblip-flan-t5-tiny"] {
        let fp16 = load(name, None);
        let px = fp16.preprocess(&common::image("exact_224x224.png")).unwrap();
        let opts = GenerateOptions { max_new_tokens: Some(20), ..fp16.default_options() };
        let want = fp16.caption_pixels(&px, &opts, &mut |_| {}).unwrap();
        for format in [Quantize::Int8, Quantize::Int4] {
            let got = load(name, Some(format)).caption_pixels(&px, &opts, &mut |_| {}).unwrap();
            let prefix = want.tokens.iter().zip(&got.tokens).take_while(|(a, b)| a == b).count();
            println!("{name} {format}: fp16 {:?}, quantized {:?} (common prefix {prefix})", want.tokens, got.tokens);
            assert!(!got.tokens.is_empty());
        }
    }
}

fn glimpse(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_glimpse")).args(args).output().expect("run glimpse")
}

#[test]
fn cli_quantize_flag() {
    let model = common::model_dir("blip2-opt-tiny");
    let image = common::image("exact_224x224.png");
    let (m, i) = (model.to_str().unwrap(), image.to_str().unwrap());
    let o = glimpse(&["caption", "-m", m, "--device", "cpu", "--quantize", "int8", "--json", i]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rec: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = load("blip2-opt-tiny", Some(Quantize::Int8))
        .caption(&image, &load("blip2-opt-tiny", None).default_options())
        .unwrap();
    assert_eq!(common::ids(&rec["tokens"]), want.tokens, "CLI int8 = library int8");

    let o = glimpse(&["caption", "-m", m, "--device", "cuda", "--quantize", "int4", i]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--quantize int4") && err.contains("--device cpu"), "{err}");

    let o = glimpse(&["caption", "-m", m, "--quantize", "int3", i]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("int3") && err.contains("int8 or int4"), "{err}");

    let clip = common::model_dir("clip-tiny");
    let o = glimpse(&["bench", "--model", clip.to_str().unwrap(), "--device", "cpu", "--quantize", "int8"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("embedding model"), "{err}");
}

/// The same measurement on a `glimpse synth` folder at real shapes (random weights), reported
/// only: `GLIMPSE_QUANT_SYNTH=DIR cargo test --release --test quantize synth -- --ignored
/// --nocapture` (BENCHMARKS.md has the blip2-opt-2.7b figures).
#[test]
#[ignore = "needs a glimpse synth folder in GLIMPSE_QUANT_SYNTH (e.g. blip2-opt-2.7b, 7.5 GB)"]
fn synth_shapes_against_fp16() {
    let Some(dir) = std::env::var_os("GLIMPSE_QUANT_SYNTH") else {
        println!("SKIP: set GLIMPSE_QUANT_SYNTH to a glimpse synth folder");
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    for format in [Quantize::Int8, Quantize::Int4] {
        let m = measure_dir(&dir.display().to_string(), &dir, format, false);
        assert!(m.max_rel.is_finite() && m.steps > 0);
    }
}

/// Decode ms/token of fp16, int8 and int4 on a `glimpse synth` folder, alternating formats
/// round by round in one process (so load from other jobs hits all three alike): median over
/// the 19 intervals between the 20 tokens of a greedy caption (EOS ignored), per round, and
/// the median of the rounds. Reported only (timings are not asserted): `GLIMPSE_QUANT_SYNTH=DIR
/// cargo test --release --test quantize synth_decode -- --ignored --nocapture --test-threads 1`.
#[test]
#[ignore = "needs a glimpse synth folder in GLIMPSE_QUANT_SYNTH (e.g. blip2-opt-2.7b, 7.5 GB)"]
fn synth_decode_ms_per_token() {
    let Some(dir) = std::env::var_os("GLIMPSE_QUANT_SYNTH") else {
        println!("SKIP: set GLIMPSE_QUANT_SYNTH to a glimpse synth folder");
        return;
    };
    let rounds: usize = std::env::var("GLIMPSE_QUANT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let dir = std::path::PathBuf::from(dir);
    let models: Vec<(&str, Model)> = vec![
        ("fp16", load_dir(&dir, None)),
        ("int8", load_dir(&dir, Some(Quantize::Int8))),
        ("int4", load_dir(&dir, Some(Quantize::Int4))),
    ];
    let px = models[0].1.preprocess(&common::image("exact_224x224.png")).unwrap();
    let opts = GenerateOptions { max_new_tokens: Some(20), eos_token_ids: Vec::new(), ..models[0].1.default_options() };
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut per_format: Vec<Vec<f64>> = vec![Vec::new(); models.len()];
    for round in 0..=rounds {
        for (i, (name, model)) in models.iter().enumerate() {
            let mut stamps = Vec::new();
            let out = model.caption_pixels(&px, &opts, &mut |_| stamps.push(std::time::Instant::now())).unwrap();
            assert_eq!(out.tokens.len(), 20);
            let mut steps: Vec<f64> = stamps.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).collect();
            let m = median(&mut steps);
            // Round 0 warms every model up (page cache, allocations) and is not counted.
            if round > 0 {
                per_format[i].push(m);
            }
            println!("round {round} {name}: decode {m:.1} ms/token (median of {} steps)", steps.len());
        }
    }
    let medians: Vec<f64> = per_format.iter_mut().map(median).collect();
    for ((name, _), m) in models.iter().zip(&medians) {
        println!("{name}: decode {m:.1} ms/token, median of {rounds} rounds ({:.2}x fp16)", m / medians[0]);
    }
}
