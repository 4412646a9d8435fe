//! `glimpse parity`: glimpse's prefill logits on the exact input transformers used
//! (scripts/hf_reference.py --tensors), held to the flash-attention rule: the error against
//! transformers fp32 may be at most 2x the error of transformers' own fp16 run.

use std::path::Path;

use serde::Serialize;

use crate::api::{Device, Model};
use crate::error::{Error, Result};
use crate::weights::Checkpoint;

/// How far one set of logits is from the fp32 reference.
#[derive(Debug, Clone, Serialize)]
pub struct Distance {
    pub rel_l2: f64,
    pub max_abs: f64,
    /// Rows whose argmax equals the reference's.
    pub argmax_agree: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParityReport {
    pub device: String,
    pub rows: usize,
    pub vocab: usize,
    pub glimpse_vs_fp32: Distance,
    pub transformers_fp16_vs_fp32: Distance,
    /// glimpse rel_l2 / transformers fp16 rel_l2; the bar is <= 2.
    pub ratio: f64,
    pub pass: bool,
}

fn distance(got: &[f32], want: &[f32], vocab: usize) -> Distance {
    let (mut num, mut den, mut max_abs) = (0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = f64::from(g) - f64::from(w);
        num += d * d;
        den += f64::from(w) * f64::from(w);
        max_abs = max_abs.max(d.abs());
    }
    let argmax = crate::backend::cpu::ops::argmax;
    let argmax_agree = got.chunks(vocab).zip(want.chunks(vocab)).filter(|(g, w)| argmax(g) == argmax(w)).count();
    Distance { rel_l2: (num / den.max(f64::MIN_POSITIVE)).sqrt(), max_abs, argmax_agree }
}

/// CPU-only: store activations in fp16 as the CUDA executor does (optionally keeping the
/// Q-Former in fp32, as transformers does), to predict GPU parity before running on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp16Emulation {
    Off,
    All,
    KeepQFormerF32,
}

/// Runs the model on the reference file's pixel values and input ids and compares logits.
pub fn run(model_dir: &Path, reference: &Path, device: Device, emulation: Fp16Emulation) -> Result<ParityReport> {
    let model = Model::load(model_dir, device)?;
    let refs = Checkpoint::open_file(reference)?;
    let (pixels, pshape) = refs.f32("pixel_values")?;
    let (info, id_bytes) = refs
        .raw_bytes("input_ids")
        .ok_or_else(|| Error::InvalidInput(format!("{}: no `input_ids`", reference.display())))?;
    if info.dtype.name() != "I64" || info.shape.first() != Some(&1) || pshape.first() != Some(&1) {
        return Err(Error::InvalidInput(format!(
            "{}: expected batch-1 pixel_values and I64 input_ids, got {pshape:?} and {} {:?}",
            reference.display(),
            info.dtype.name(),
            info.shape
        )));
    }
    let ids: Vec<u32> = id_bytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .map(|v| u32::try_from(v).map_err(|_| Error::InvalidInput(format!("input id {v} out of range"))))
        .collect::<Result<_>>()?;
    let (fp32, lshape) = refs.f32("prefill_logits_fp32")?;
    let (fp16, _) = refs.f32("prefill_logits_fp16")?;
    let (rows, vocab) = (ids.len(), lshape.last().copied().unwrap_or(0));
    if lshape != [rows, vocab] || fp16.len() != fp32.len() {
        return Err(Error::InvalidInput(format!("{}: logits shape {lshape:?} for {rows} ids", reference.display())));
    }

    let plan = model.family.plan(1, rows, 1, true)?;
    let mut exec: Box<dyn crate::backend::Executor> = if emulation == Fp16Emulation::Off {
        model.executor(&plan.graph)?
    } else {
        if model.backend_name() != "cpu" {
            return Err(Error::InvalidInput("fp16 emulation runs on the CPU executor: pass --device cpu".into()));
        }
        let mut cpu =
            crate::backend::cpu::CpuExecutor::new(std::sync::Arc::clone(model.family.weights()), &plan.graph.buffers);
        let keep_qformer = emulation == Fp16Emulation::KeepQFormerF32;
        cpu.emulate_fp16(|name| keep_qformer && name.starts_with("qformer."));
        Box::new(cpu)
    };
    exec.write(plan.input("pixels")?, &pixels)?;
    for phase in &plan.encoders {
        exec.run(phase)?;
    }
    plan.write_prompt_inputs(exec.as_mut(), &ids)?;
    exec.set_tokens(&ids);
    exec.set_position(0);
    exec.run(&plan.prefill.phase)?;
    let ours = exec.read(plan.prefill.logits, rows)?;

    let glimpse_vs_fp32 = distance(&ours, &fp32, vocab);
    let transformers_fp16_vs_fp32 = distance(&fp16, &fp32, vocab);
    let ratio = glimpse_vs_fp32.rel_l2 / transformers_fp16_vs_fp32.rel_l2.max(f64::MIN_POSITIVE);
    let device = match emulation {
        Fp16Emulation::Off => exec.device_name(),
        Fp16Emulation::All => "cpu (fp16 activations emulated)".into(),
        Fp16Emulation::KeepQFormerF32 => "cpu (fp16 activations emulated, Q-Former fp32)".into(),
    };
    Ok(ParityReport { device, rows, vocab, glimpse_vs_fp32, transformers_fp16_vs_fp32, ratio, pass: ratio <= 2.0 })
}
