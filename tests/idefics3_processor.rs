//! SmolVLM's / Idefics3's processor against transformers 5.17 (`Idefics3ImageProcessorPil`,
//! `Idefics3Processor`; goldens written by scripts/fixtures_idefics3.py): tile grids, pixel values
//! bit for bit, the expanded prompts and their token ids.

mod common;

use glimpse::image::load_rgb;
use glimpse::models::idefics3::processor::{
    expand_image_tokens, image_prompt, rescale_to_max_len, EdgeSize, Idefics3ImageConfig, Idefics3ImageProcessor,
};
use glimpse::tokenizer::Tokenizer;
use glimpse::Error;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::Path;

fn processor(case: &Value) -> Idefics3ImageProcessor {
    let n = |k: &str| case[k].as_u64().expect(k) as usize;
    let cfg = Idefics3ImageConfig {
        size: EdgeSize { longest_edge: Some(n("size_longest_edge")), ..EdgeSize::default() },
        max_image_size: EdgeSize { longest_edge: Some(n("max_image_size_longest_edge")), ..EdgeSize::default() },
        do_image_splitting: case["do_image_splitting"].as_bool().unwrap(),
        resample: n("resample") as u32,
        ..Idefics3ImageConfig::default()
    };
    Idefics3ImageProcessor::new(cfg, Path::new("test")).expect("valid config")
}

fn sha256_hex(bytes: impl Iterator<Item = u8>) -> String {
    let mut h = Sha256::new();
    h.update(bytes.collect::<Vec<u8>>());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Every config and PNG: the grid, the frame count, the float32 pixel values equal to
/// transformers' bit for bit (their sha256; and value by value against the stored 8-bit frames
/// through the exact byte -> float table where the config's frames are stored).
#[test]
fn tiles_and_pixels_match_transformers() {
    let golden = common::golden_json("idefics3_processor.json");
    let frames_golden = common::goldens("idefics3_pixels.safetensors");
    let (lut, _) = frames_golden.f32("_lut").expect("lut");
    let mut checked_values = 0;
    for (name, case) in golden["configs"].as_object().unwrap() {
        let proc = processor(case);
        let tile = proc.config().tile();
        for (png, want) in case["images"].as_object().unwrap() {
            let what = format!("{name}/{png}");
            let tiles = proc.preprocess(&load_rgb(&common::image(png)).unwrap(), png).unwrap();
            assert_eq!(tiles.rows as u64, want["rows"].as_u64().unwrap(), "{what}: rows");
            assert_eq!(tiles.cols as u64, want["cols"].as_u64().unwrap(), "{what}: cols");
            assert_eq!(tiles.frames.len() as u64, want["frames"].as_u64().unwrap(), "{what}: frames");
            assert!(tiles.frames.iter().all(|f| (f.height, f.width) == (tile, tile)), "{what}: frame size");
            let values: Vec<f32> = tiles.frames.iter().flat_map(|f| f.data.iter().copied()).collect();
            let got = sha256_hex(values.iter().flat_map(|v| v.to_le_bytes()));
            assert_eq!(got, want["pixel_values_sha256"].as_str().unwrap(), "{what}: pixel values differ");
            if let Some((info, bytes)) = frames_golden.raw_bytes(&what) {
                assert_eq!(info.shape, vec![tiles.frames.len(), 3, tile, tile], "{what}: stored shape");
                let plane = tile * tile;
                for (i, (&v, &b)) in values.iter().zip(bytes).enumerate() {
                    let c = (i / plane) % 3;
                    assert_eq!(v.to_bits(), lut[c * 256 + b as usize].to_bits(), "{what}: value {i}");
                }
                checked_values += 1;
            }
        }
    }
    assert_eq!(checked_values, 27, "the three small configs store every PNG's frames");
}

/// The fixture folder's processor_config.json loads as the `tiny` config (`image_processor`
/// section, errors naming `image_processor.<field>`).
#[test]
fn loads_the_image_processor_section() {
    let dir = common::fixtures().join("idefics3-processor");
    let (proc, path) = Idefics3ImageProcessor::load_from_dir(&dir).unwrap();
    assert!(path.ends_with("processor_config.json"));
    let cfg = proc.config();
    assert_eq!((cfg.size.longest_edge, cfg.tile(), cfg.resample), (Some(128), 32, 1));
    assert!(cfg.do_image_splitting && cfg.do_pad);
}

/// Each `<image>` expands to its grid's prompt, and the tokenizer of the fixture folder gives
/// transformers' ids for the whole expanded text.
#[test]
fn prompts_expand_and_tokenize_as_transformers() {
    let golden = common::golden_json("idefics3_processor.json");
    let seq_len = golden["image_seq_len"].as_u64().unwrap() as usize;
    let dir = common::fixtures().join("idefics3-processor");
    let (proc, _) = Idefics3ImageProcessor::load_from_dir(&dir).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    for case in golden["prompts"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let grids: Vec<(usize, usize)> = case["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|png| {
                let png = png.as_str().unwrap();
                let t = proc.preprocess(&load_rgb(&common::image(png)).unwrap(), png).unwrap();
                (t.rows, t.cols)
            })
            .collect();
        let expanded = expand_image_tokens(case["text"].as_str().unwrap(), &grids, seq_len).unwrap();
        assert_eq!(expanded, case["expanded"].as_str().unwrap(), "{name}: expanded prompt");
        assert_eq!(tokenizer.encode(&expanded).unwrap(), common::ids(&case["input_ids"]), "{name}: input ids");
    }
}

#[test]
fn grid_prompts_are_transformers_layout() {
    let (fake, img) = ("<fake_token_around_image>", "<image>");
    assert_eq!(image_prompt(0, 0, 2), format!("{fake}<global-img>{img}{img}{fake}"));
    assert_eq!(
        image_prompt(1, 2, 1),
        format!("{fake}<row_1_col_1>{img}{fake}<row_1_col_2>{img}\n\n{fake}<global-img>{img}{fake}")
    );
}

#[test]
fn image_count_mismatch_is_an_error() {
    let err = expand_image_tokens("<image> and <image>", &[(0, 0)], 4).unwrap_err();
    assert!(matches!(&err, Error::InvalidInput(m) if m.contains("2 <image> tokens but 1 images")), "{err}");
    assert!(expand_image_tokens("no image here", &[(0, 0)], 4).is_err());
}

/// transformers' longest-edge rule: truncation, then odd sides rounded up to even.
#[test]
fn longest_edge_rounds_like_transformers() {
    assert_eq!(rescale_to_max_len(97, 301, 128), (42, 128)); // int(41.25) = 41 -> 42
    assert_eq!(rescale_to_max_len(311, 83, 128), (128, 34)); // int(34.16) = 34
    assert_eq!(rescale_to_max_len(9, 13, 2048), (1418, 2048)); // int(1417.8) = 1417 -> 1418
    assert_eq!(rescale_to_max_len(1, 4000, 2048), (1, 2048)); // int(0.512) = 0 -> 0, then at least 1
}

#[test]
fn bad_settings_are_clear_errors() {
    let bad = |cfg: Idefics3ImageConfig| Idefics3ImageProcessor::new(cfg, Path::new("processor_config.json"));
    let msg = |r: glimpse::Result<Idefics3ImageProcessor>| r.map(drop).unwrap_err().to_string();
    let m = msg(bad(Idefics3ImageConfig { resample: 2, ..Idefics3ImageConfig::default() }));
    assert!(m.contains("`resample` is 2") && m.contains("LANCZOS"), "{m}");
    let m = msg(bad(Idefics3ImageConfig { max_image_size: EdgeSize::default(), ..Idefics3ImageConfig::default() }));
    assert!(m.contains("`max_image_size`") && m.contains("longest_edge"), "{m}");
    let m = msg(bad(Idefics3ImageConfig { image_std: vec![0.5, 0.0, 0.5], ..Idefics3ImageConfig::default() }));
    assert!(m.contains("`image_std`"), "{m}");
    let m = msg(bad(Idefics3ImageConfig {
        size: EdgeSize { longest_edge: Some(0), ..EdgeSize::default() },
        ..Idefics3ImageConfig::default()
    }));
    assert!(m.contains("`size.longest_edge` is 0"), "{m}");
}

/// A bad field in the `image_processor` section is named with its path in the file.
#[test]
fn a_bad_field_in_the_file_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = r#"{"image_processor": {"resample": "lanczos", "max_image_size": {"longest_edge": 32}}}"#;
    std::fs::write(dir.path().join("processor_config.json"), cfg).unwrap();
    let err = Idefics3ImageProcessor::load_from_dir(dir.path()).map(drop).unwrap_err().to_string();
    assert!(err.contains("image_processor.resample") && err.contains("processor_config.json"), "{err}");
}
