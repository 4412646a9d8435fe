//! Checkpoint loading: zero-copy fp16, conversion of bf16/fp32, sharded indexes, and every
//! malformed-file error naming the file, the tensor and the shapes.

mod common;

use std::path::Path;

use glimpse::weights::Checkpoint;
use glimpse::Error;
use half::{bf16, f16};

/// Writes a safetensors file from a raw header JSON and data bytes.
fn write_raw(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

fn open_err(header: &str, data: &[u8]) -> String {
    let dir = common::tempdir();
    let path = dir.path().join("model.safetensors");
    write_raw(&path, header, data);
    match Checkpoint::open_file(&path) {
        Err(e @ Error::Safetensors { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("model.safetensors"), "error names the file: {msg}");
            msg
        }
        Err(other) => panic!("wrong error kind: {other}"),
        Ok(_) => panic!("malformed file accepted"),
    }
}

fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
}

#[test]
fn fp16_is_zero_copy_and_fp32_bf16_are_converted() {
    let dir = common::tempdir();
    let path = dir.path().join("model.safetensors");
    let vals = random_f32(6, 7);
    let h: Vec<u8> = vals.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
    let f: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let b: Vec<u8> = vals.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
    let header = r#"{"__metadata__":{"format":"pt"},"h":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},"f":{"dtype":"F32","shape":[2,3],"data_offsets":[12,36]},"b":{"dtype":"BF16","shape":[6],"data_offsets":[36,48]},"pos":{"dtype":"I64","shape":[1],"data_offsets":[48,56]}}"#;
    // Pad the header to 8 bytes as safetensors does, so fp16 data is aligned.
    let header = format!("{header:<width$}", width = header.len().div_ceil(8) * 8);
    write_raw(&path, &header, &[h, f, b, vec![0u8; 8]].concat());
    let ckpt = Checkpoint::open_file(&path).unwrap();

    let wh = ckpt.f16("h", &[2, 3]).unwrap();
    assert!(wh.is_mapped(), "aligned fp16 is used in place");
    let want: Vec<f16> = vals.iter().map(|v| f16::from_f32(*v)).collect();
    assert_eq!(wh.as_slice(), &want[..]);
    let wf = ckpt.f16("f", &[2, 3]).unwrap();
    assert!(!wf.is_mapped());
    assert_eq!(wf.as_slice(), &want[..], "fp32 -> fp16 rounds to nearest even like torch .half()");
    let wb = ckpt.f16("b", &[6]).unwrap();
    let want_b: Vec<f16> = vals.iter().map(|v| f16::from_f32(bf16::from_f32(*v).to_f32())).collect();
    assert_eq!(wb.as_slice(), &want_b[..]);
    // Extra non-float tensors may sit in a checkpoint but cannot be used as weights.
    let err = ckpt.f16("pos", &[1]).unwrap_err().to_string();
    assert!(err.contains("pos") && err.contains("I64"), "{err}");
}

#[test]
fn missing_and_misshaped_tensors_name_key_and_shapes() {
    let dir = common::tempdir();
    let path = dir.path().join("model.safetensors");
    write_raw(&path, r#"{"w":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}"#, &[0u8; 8]);
    let ckpt = Checkpoint::open_file(&path).unwrap();
    match ckpt.f16("missing.weight", &[4, 5]) {
        Err(Error::MissingTensor { name, expected, .. }) => {
            assert_eq!((name.as_str(), expected), ("missing.weight", vec![4, 5]))
        }
        other => panic!("{other:?}"),
    }
    let err = ckpt.f16("w", &[3, 2]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("`w`") && msg.contains("[3, 2]") && msg.contains("[2, 2]") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn missing_file_is_named() {
    let dir = common::tempdir();
    let err = Checkpoint::open_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("not found"), "{err}");
}

#[test]
fn truncated_file() {
    let dir = common::tempdir();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    let err = Checkpoint::open_file(&path).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn header_length_past_the_end() {
    let dir = common::tempdir();
    let path = dir.path().join("model.safetensors");
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    let err = Checkpoint::open_file(&path).unwrap_err().to_string();
    assert!(err.contains("runs past the end"), "{err}");
}

#[test]
fn header_not_json() {
    assert!(open_err("{not json", &[]).contains("not valid JSON"));
}

#[test]
fn offsets_out_of_range() {
    let msg = open_err(r#"{"w":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}}"#, &[0u8; 4]);
    assert!(msg.contains("`w`") && msg.contains("out of range"), "{msg}");
}

#[test]
fn overlapping_tensors() {
    let msg = open_err(
        r#"{"a":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[4],"data_offsets":[4,12]}}"#,
        &[0u8; 12],
    );
    assert!(msg.contains("`a`") && msg.contains("`b`") && msg.contains("overlap"), "{msg}");
}

#[test]
fn unknown_dtype() {
    let msg = open_err(r#"{"w":{"dtype":"F17","shape":[2],"data_offsets":[0,4]}}"#, &[0u8; 4]);
    assert!(msg.contains("unknown dtype") && msg.contains("F17"), "{msg}");
}

#[test]
fn shape_disagrees_with_byte_range() {
    let msg = open_err(r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0u8; 8]);
    assert!(msg.contains("needs 12 bytes"), "{msg}");
}

#[test]
fn sharded_index_errors() {
    let dir = common::tempdir();
    let index = dir.path().join("model.safetensors.index.json");
    write_raw(
        &dir.path().join("a.safetensors"),
        r#"{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
        &[0u8; 4],
    );

    std::fs::write(&index, r#"{"weight_map":{"w":"a.safetensors","v":"a.safetensors"}}"#).unwrap();
    let err = Checkpoint::open_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("`v`") && err.contains("a.safetensors"), "{err}");

    std::fs::write(&index, r#"{"weight_map":{"w":"gone.safetensors"}}"#).unwrap();
    let err = Checkpoint::open_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("gone.safetensors") && err.contains("not found"), "{err}");

    std::fs::write(&index, r#"{"weight_map":{"w":"../a.safetensors"}}"#).unwrap();
    let err = Checkpoint::open_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("file name"), "{err}");

    std::fs::write(&index, r#"{"weight_map":{"w":"a.safetensors"}}"#).unwrap();
    let ckpt = Checkpoint::open_dir(dir.path()).unwrap();
    assert_eq!(ckpt.f16("w", &[2]).unwrap().numel(), 2);
}

#[test]
fn fixture_checkpoints_load() {
    // fp16 single file: every tensor used in place.
    let tiny = Checkpoint::open_dir(&common::model_dir("blip2-opt-tiny")).unwrap();
    for name in tiny.names() {
        let shape = tiny.info(name).unwrap().shape.clone();
        assert!(tiny.f16(name, &shape).unwrap().is_mapped(), "{name} copied");
    }
    // fp32 sharded: converted.
    let proj = Checkpoint::open_dir(&common::model_dir("blip2-opt-tiny-proj")).unwrap();
    assert!(proj.origin().ends_with("model.safetensors.index.json"));
    assert!(proj.contains("language_model.lm_head.weight"));
}

#[test]
fn model_load_names_missing_tensor() {
    // Copy the tiny model without one tensor: loading names that tensor and its shape.
    let src = common::model_dir("blip2-opt-tiny");
    let dir = common::tempdir();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    let ckpt = Checkpoint::open_dir(&src).unwrap();
    let drop = "qformer.encoder.layer.2.crossattention.attention.key.weight";
    let mut tensors = Vec::new();
    for name in ckpt.names().filter(|n| *n != drop) {
        let (data, shape) = ckpt.f32(name).unwrap();
        let bytes: Vec<u8> = data.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        tensors.push((name.to_string(), shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let err = glimpse::Model::load(dir.path(), glimpse::Device::Cpu).err().expect("missing tensor").to_string();
    assert!(err.contains(drop) && err.contains("[128, 176]"), "{err}");
}
