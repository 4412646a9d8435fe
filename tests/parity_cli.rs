//! `glimpse parity` on a reference file built from the fixture goldens (what
//! scripts/hf_reference.py --tensors writes: pixel_values, input_ids, fp32 and fp16 logits).

mod common;

use std::process::Command;

use half::f16;

/// Writes a reference file for the caption case of odd_257x181.png whose "fp16" logits are the
/// fp32 goldens perturbed by `noise` (relative) and rounded to fp16, or, with `None`, exactly
/// the fp32 goldens (a yardstick with no error).
fn reference(dir: &std::path::Path, noise: Option<f32>) -> std::path::PathBuf {
    let g = common::golden_json("blip2-opt-tiny.json");
    let case = g["cases"].as_array().unwrap().iter().find(|c| c["name"] == "caption_odd_257x181").unwrap();
    let ids: Vec<i64> = common::ids(&case["input_ids"]).into_iter().map(i64::from).collect();
    let model = glimpse::Model::load(common::model_dir("blip2-opt-tiny"), glimpse::Device::Cpu).unwrap();
    let px = model.preprocess(&common::image("odd_257x181.png")).unwrap();
    let (fp32, shape) = common::goldens("blip2-opt-tiny.safetensors").f32("caption_odd_257x181.logits").unwrap();
    let fp16: Vec<f32> = match noise {
        Some(n) => fp32
            .iter()
            .enumerate()
            .map(|(i, v)| f16::from_f32(v * (1.0 + if i % 2 == 0 { n } else { -n })).to_f32())
            .collect(),
        None => fp32.clone(),
    };
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (pb, l32, l16) = (bytes(&px.data), bytes(&fp32), bytes(&fp16));
    let ib: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let views = vec![
        ("pixel_values", TensorView::new(Dtype::F32, vec![1, 3, 224, 224], &pb).unwrap()),
        ("input_ids", TensorView::new(Dtype::I64, vec![1, ids.len()], &ib).unwrap()),
        ("prefill_logits_fp32", TensorView::new(Dtype::F32, shape.clone(), &l32).unwrap()),
        ("prefill_logits_fp16", TensorView::new(Dtype::F32, shape, &l16).unwrap()),
    ];
    let path = dir.join("ref.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

fn parity(reference: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args([
            "parity",
            "--model",
            &common::model_dir("blip2-opt-tiny").display().to_string(),
            "--device",
            "cpu",
            "--json",
        ])
        .arg("--reference")
        .arg(reference)
        .output()
        .unwrap()
}

#[test]
fn cpu_passes_against_an_fp16_yardstick() {
    let dir = common::tempdir();
    let o = parity(&reference(dir.path(), Some(1e-3)));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["glimpse_vs_fp32"]["rel_l2"].as_f64().unwrap() < 1e-5);
    assert_eq!(r["glimpse_vs_fp32"]["argmax_agree"], r["rows"]);
    assert!(r["ratio"].as_f64().unwrap() < 0.1 && r["pass"] == true);
}

#[test]
fn fails_when_worse_than_twice_the_yardstick() {
    // Against a yardstick with no error at all, any difference is more than 2x of it.
    let dir = common::tempdir();
    let o = parity(&reference(dir.path(), None));
    assert!(!o.status.success());
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["pass"], false);
}

#[test]
fn fp16_emulation_predicts_gpu_error() {
    let dir = common::tempdir();
    let reference = reference(dir.path(), Some(4e-3));
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args([
            "parity",
            "--model",
            &common::model_dir("blip2-opt-tiny").display().to_string(),
            "--device",
            "cpu",
            "--json",
            "--emulate-fp16",
        ])
        .arg("--reference")
        .arg(&reference)
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["device"].as_str().unwrap().contains("emulated"));
    // fp16 storage costs far more than the f32 reference's ~1e-7, and stays inside the GPU bar.
    let rel = r["glimpse_vs_fp32"]["rel_l2"].as_f64().unwrap();
    assert!(rel > 1e-4 && rel < common::GPU_STAGE_REL, "{rel}");
    // --fp32-qformer only makes sense with --emulate-fp16.
    let bad = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["parity", "--model", "x", "--reference", "y", "--fp32-qformer"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
