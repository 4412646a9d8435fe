//! `glimpse bench --dataset` on the CPU with the tiny preset: the three rates and the CPU time
//! per image of each measurement are reported, positive and consistent (speeds not asserted).

use std::process::Command;

mod common;

#[test]
fn bench_dataset_reports_rates_and_cpu_time_per_image() {
    let dir = common::tempdir();
    for (i, name) in ["wide_301x97.png", "photo_q90.jpg", "odd_257x181.png", "tall_83x311.png"].iter().enumerate() {
        let ext = name.rsplit('.').next().expect("extension");
        std::fs::copy(common::image(name), dir.path().join(format!("img{i}.{ext}"))).expect("copy fixture");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["bench", "--preset", "tiny", "--device", "cpu", "--new-tokens", "2", "--json"])
        .args(["--dataset-images", "4", "--dataset-batch", "2", "--dataset"])
        .arg(dir.path())
        .output()
        .expect("run glimpse");
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "bench failed: {err}");
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not one JSON object ({e}): {out}"));
    let d = &v["dataset"];
    assert_eq!((d["images"].as_u64(), d["batch"].as_u64()), (Some(4), Some(2)), "{d}");
    let num = |k: &str| d[k].as_f64().unwrap_or_else(|| panic!("{k} missing or not a number: {d}"));
    for k in [
        "preprocess_images_per_s",
        "model_only_images_per_s",
        "pipeline_images_per_s",
        "preprocess_cpu_ms_per_image",
        "model_only_cpu_ms_per_image",
        "pipeline_cpu_ms_per_image",
    ] {
        assert!(num(k) > 0.0 && num(k).is_finite(), "{k} = {}", num(k));
    }
    // The pipeline does the model's work and more (decode, preprocess, records).
    let ratio = num("model_only_cpu_ms_per_image") / num("pipeline_cpu_ms_per_image");
    assert!((num("cpu_fraction_of_model_only") - ratio).abs() < 1e-9, "{d}");
    assert!(ratio > 0.0 && ratio < 1.5, "model/pipeline CPU time {ratio}: {d}");
}
