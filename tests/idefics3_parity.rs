//! SmolVLM (Idefics3) on the CPU executor against transformers 5.17 (fp32 math on the same fp16
//! weights; goldens from scripts/fixtures_smolvlm.py): frames and prompt ids from glimpse's own
//! processor, the vision tower's last hidden state, the connector output, prefill logits, greedy
//! tokens and log-probs, for one image (two tile grids) and two images of different grids.

mod common;

use std::sync::Arc;

use glimpse::api::{Device, Model};
use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::Executor;
use glimpse::image::{load_rgb, PixelValues};
use glimpse::models::idefics3::processor::{expand_image_tokens, Idefics3ImageProcessor};

const NAME: &str = "smolvlm-tiny";
/// BLIP-2's and LLaVA's bars: f32 on both sides, different summation orders.
const STAGE_REL: f64 = 1e-5;
const STAGE_ABS: f64 = 1e-4;
const LOGPROB_ABS: f64 = 1e-4;

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (max, rel) = common::errors(got, want);
    assert!(rel <= STAGE_REL && max <= STAGE_ABS, "{what}: rel {rel:e} max abs {max:e}");
}

fn cases() -> Vec<serde_json::Value> {
    common::golden_json("smolvlm_tiny.json")["cases"].as_array().unwrap().clone()
}

fn load() -> Model {
    Model::load(common::model_dir(NAME), Device::Cpu).expect("fixture model loads")
}

/// Every frame of the case's images, in order (each image split by the model's processor, and
/// again by the processor alone to check both agree), and each image's tile grid.
fn frames(model: &Model, case: &serde_json::Value) -> (Vec<PixelValues>, Vec<(usize, usize)>) {
    let (proc, _) = Idefics3ImageProcessor::load_from_dir(&common::model_dir(NAME)).unwrap();
    let (mut frames, mut grids) = (Vec::new(), Vec::new());
    for png in case["images"].as_array().unwrap() {
        let png = png.as_str().unwrap();
        let split = model.preprocess(&common::image(png)).unwrap();
        let tiles = proc.preprocess(&load_rgb(&common::image(png)).unwrap(), png).unwrap();
        assert_eq!(split.tiles, Some((tiles.rows, tiles.cols)), "{png}: the model's processor splits");
        assert_eq!(split.frames(), tiles.frames.len(), "{png}: frames");
        assert_eq!(split.data, tiles.frames.iter().flat_map(|f| f.data.clone()).collect::<Vec<_>>(), "{png}");
        grids.push((tiles.rows, tiles.cols));
        frames.extend(tiles.frames);
    }
    (frames, grids)
}

/// The processor's frames are transformers' pixel values bit for bit, and the chat prompt,
/// expanded for the tile grids and tokenized, is transformers' input_ids.
#[test]
fn frames_and_prompt_ids_match_the_processor() {
    let model = load();
    let goldens = common::goldens("smolvlm_tiny.safetensors");
    let chat = model.chat.as_ref().expect("a chat template");
    for case in cases() {
        let cname = case["name"].as_str().unwrap();
        let (frames, grids) = frames(&model, &case);
        let want_grids: Vec<(usize, usize)> = case["grids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (g[0].as_u64().unwrap() as usize, g[1].as_u64().unwrap() as usize))
            .collect();
        assert_eq!(grids, want_grids, "{cname}: tile grids");
        let (want, shape) = goldens.f32(&format!("{cname}.pixels")).unwrap();
        assert_eq!(shape[0], frames.len(), "{cname}: frame count");
        let got: Vec<f32> = frames.iter().flat_map(|f| f.data.iter().copied()).collect();
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{cname}: pixel values");

        let n = grids.len();
        let prompt = chat.user_prompt(n, case["text"].as_str().unwrap()).unwrap();
        assert_eq!(prompt, case["prompt"].as_str().unwrap(), "{cname}: rendered chat prompt");
        let seq_len = common::golden_json("smolvlm_tiny.json")["image_seq_len"].as_u64().unwrap() as usize;
        let expanded = expand_image_tokens(&prompt, &grids, seq_len).unwrap();
        let ids = model.tokenizer.encode_plain(&expanded).unwrap();
        assert_eq!(ids, common::ids(&case["input_ids"]), "{cname}: input ids");
    }
}

/// The vision tower's last hidden state, the connector output and the last prefill logit rows.
#[test]
fn stages_match_transformers() {
    let model = load();
    let goldens = common::goldens("smolvlm_tiny.safetensors");
    for case in cases() {
        let cname = case["name"].as_str().unwrap();
        let (pixels, shape) = goldens.f32(&format!("{cname}.pixels")).unwrap();
        let ids = common::ids(&case["input_ids"]);
        let plan = model
            .family
            .plan_for(&glimpse::generate::PlanShape {
                images: shape[0],
                sequences: 1,
                prompt_len: ids.len(),
                max_new_tokens: 1,
                text_rows: 0,
                all_prefill_logits: true,
            })
            .unwrap();
        let mut exec = CpuExecutor::new(Arc::clone(model.family.weights()), &plan.graph.buffers);
        exec.write(plan.input("pixels").unwrap(), &pixels).unwrap();
        for phase in &plan.encoders {
            exec.run(phase).unwrap();
        }
        for (key, output) in [("vision", "vision"), ("connector", "image_features")] {
            let (want, shape) = goldens.f32(&format!("{cname}.{key}")).unwrap();
            let rows = shape[0] * shape[1];
            let got = exec.read(plan.output(output).unwrap(), rows).unwrap();
            assert_close(&format!("{cname} {key}"), &got, &want);
        }
        exec.write(plan.key_mask.unwrap(), &vec![0.0; plan.capacity]).unwrap();
        exec.set_left_padding(&[0]);
        exec.set_tokens(&ids);
        exec.set_position(0);
        exec.run(&plan.prefill.phase).unwrap();
        let (want, shape) = goldens.f32(&format!("{cname}.logits")).unwrap();
        let all = exec.read(plan.prefill.logits, ids.len()).unwrap();
        let tail = &all[(ids.len() - shape[0]) * shape[1]..];
        assert_close(&format!("{cname} logits"), tail, &want);
    }
}

/// Greedy generation from the frames and ids: transformers' 8 tokens and their log-probs.
#[test]
fn generation_matches_transformers() {
    let model = load();
    for case in cases() {
        let cname = case["name"].as_str().unwrap();
        let (frames, _) = frames(&model, &case);
        let ids = common::ids(&case["input_ids"]);
        let opts = glimpse::GenerateOptions { max_new_tokens: Some(8), min_new_tokens: 8, ..model.default_options() };
        let (seqs, _, _) = model.run_ids(&frames, &ids, &opts, &mut |_| {}).unwrap();
        assert_eq!(seqs.len(), 1, "{cname}: one sequence for one prompt");
        assert_eq!(seqs[0].tokens, common::ids(&case["generated_ids"]), "{cname}: greedy tokens");
        for (i, (got, want)) in seqs[0].logprobs.iter().zip(common::floats(&case["logprobs"])).enumerate() {
            assert!((got - want).abs() <= LOGPROB_ABS, "{cname} step {i}: logprob {got} vs {want}");
        }
    }
}

/// `ask_images` from the image files: the chat template, each image's tiles and prompt, one
/// generation: transformers' tokens, log-probs and text.
#[test]
fn ask_images_matches_transformers() {
    let model = load();
    for case in cases() {
        let cname = case["name"].as_str().unwrap();
        let paths: Vec<std::path::PathBuf> =
            case["images"].as_array().unwrap().iter().map(|i| common::image(i.as_str().unwrap())).collect();
        let refs: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
        let opts = glimpse::GenerateOptions { max_new_tokens: Some(8), min_new_tokens: 8, ..model.default_options() };
        let out = model.ask_images(&refs, case["text"].as_str().unwrap(), &opts).unwrap();
        assert_eq!(out.tokens, common::ids(&case["generated_ids"]), "{cname}: greedy tokens");
        for (i, (got, want)) in out.logprobs.iter().zip(common::floats(&case["logprobs"])).enumerate() {
            assert!((got - want).abs() <= LOGPROB_ABS, "{cname} step {i}: logprob {got} vs {want}");
        }
        assert_eq!(out.text, case["decoded"].as_str().unwrap(), "{cname}: text");
    }
}

/// Frames and image tokens must agree, as transformers checks.
#[test]
fn frame_count_must_match_the_image_tokens() {
    let model = load();
    let case = &cases()[0];
    let (mut frames, _) = frames(&model, case);
    frames.pop();
    let ids = common::ids(&case["input_ids"]);
    let err = model.run_ids(&frames, &ids, &model.default_options(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("image tokens") && err.contains("frames"), "{err}");
}

/// `info` names the family, the tower, the connector and the decoder.
#[test]
fn describes_the_model() {
    let model = load();
    let family = model.family.as_ref();
    let lines = family.describe().join("\n");
    for want in ["Idefics3ForConditionalGeneration", "SigLIP", "pixel shuffle x2", "16 rows per frame", "LLaMA"] {
        assert!(lines.contains(want), "{want} missing from:\n{lines}");
    }
}

/// `glimpse ask` with one and several images, and `glimpse caption` (the chat-family caption
/// instruction, which is the `small` case's text), from the command line.
#[test]
fn cli_ask_and_caption() {
    let bin = env!("CARGO_BIN_EXE_glimpse");
    let dir = common::model_dir(NAME);
    let flags = ["--device", "cpu", "--json", "--max-new-tokens", "8", "--min-new-tokens", "8", "--model"];
    for case in cases() {
        let imgs: Vec<std::path::PathBuf> =
            case["images"].as_array().unwrap().iter().map(|i| common::image(i.as_str().unwrap())).collect();
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("ask").args(flags).arg(&dir);
        imgs.iter().for_each(|p| {
            cmd.arg("--image").arg(p);
        });
        let out = cmd.arg(case["text"].as_str().unwrap()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(common::ids(&rec["tokens"]), common::ids(&case["generated_ids"]), "{}", case["name"]);
        assert_eq!(rec["text"], case["decoded"]);
    }
    let small = cases().into_iter().find(|c| c["name"] == "small").unwrap();
    assert_eq!(small["text"].as_str().unwrap(), glimpse::chat::CAPTION_INSTRUCTION);
    let img = common::image(small["images"][0].as_str().unwrap());
    let out = std::process::Command::new(bin).arg("caption").args(flags).arg(&dir).arg(&img).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(common::ids(&rec["tokens"]), common::ids(&small["generated_ids"]), "caption");
}

/// Captioning several images of different tile grids in one call gives each its own prompt
/// and sequence: the same answer as each image alone (here: the `small` golden for its image).
#[test]
fn caption_batch_runs_each_image_with_its_own_grid() {
    let model = load();
    let cases = cases();
    let small = cases.iter().find(|c| c["name"] == "small").unwrap();
    let wide = model.preprocess(&common::image("wide_301x97.png")).unwrap();
    let tiny = model.preprocess(&common::image(small["images"][0].as_str().unwrap())).unwrap();
    assert_ne!(wide.tiles, tiny.tiles, "two different grids");
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(8), min_new_tokens: 8, ..model.default_options() };
    // Streamed events name the request's image, not the run's: each image's tokens in order.
    let mut streamed = vec![Vec::new(); 2];
    let outs =
        model.run(&[wide.clone(), tiny.clone()], None, &opts, &mut |ev| streamed[ev.sequence].push(ev.token)).unwrap();
    assert_eq!(outs.len(), 2, "one record per image");
    assert_eq!(streamed, vec![outs[0].tokens.clone(), outs[1].tokens.clone()], "streamed per image");
    assert_eq!(outs[1].tokens, common::ids(&small["generated_ids"]), "second image as alone");
    let alone = model.run(std::slice::from_ref(&wide), None, &opts, &mut |_| {}).unwrap();
    assert_eq!(outs[0].tokens, alone[0].tokens, "first image as alone");
}

/// SmolVLM2's classes (`SmolVLMForConditionalGeneration`, model_type `smolvlm`, the SmolVLM image
/// processor) at the same shapes: `ask_images` gives transformers' tokens and log-probs.
#[test]
fn smolvlm2_matches_transformers() {
    let model = Model::load(common::model_dir("smolvlm2-tiny"), Device::Cpu).expect("the SmolVLM2 fixture loads");
    assert!(model.family.describe()[0].contains("SmolVLMForConditionalGeneration"));
    let g = common::golden_json("smolvlm2_tiny.json");
    let image = common::image(g["image"].as_str().unwrap());
    let px = model.preprocess(&image).unwrap();
    let prompt = model.chat.as_ref().unwrap().user_prompt(1, g["text"].as_str().unwrap()).unwrap();
    assert_eq!(model.input_ids_for(Some(&prompt), &[px]).unwrap(), common::ids(&g["input_ids"]), "input ids");
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(8), min_new_tokens: 8, ..model.default_options() };
    let out = model.ask_images(&[&image], g["text"].as_str().unwrap(), &opts).unwrap();
    assert_eq!(out.tokens, common::ids(&g["generated_ids"]), "greedy tokens");
    for (i, (got, want)) in out.logprobs.iter().zip(common::floats(&g["logprobs"])).enumerate() {
        assert!((got - want).abs() <= LOGPROB_ABS, "step {i}: logprob {got} vs {want}");
    }
    assert_eq!(out.text, g["decoded"].as_str().unwrap());
}

/// The position ids of a full patch grid follow transformers' float32 rule for every grid from
/// 1 to 64 patches per side (not the identity for 19, 25, 29, ...).
#[test]
fn grid_positions_follow_transformers() {
    let g = common::golden_json("idefics3_positions.json");
    let mut skipped = 0;
    for n in 1..=64usize {
        let want: Vec<usize> = common::ids(&g["buckets"][n.to_string()]).into_iter().map(|v| v as usize).collect();
        assert_eq!(glimpse::models::idefics3::vision::grid_buckets(n), want, "{n} patches per side");
        skipped += usize::from(want.iter().enumerate().any(|(i, &b)| i != b));
    }
    assert!(skipped >= 10, "the goldens hold grids whose ids are not the identity ({skipped})");
}

/// A 19 x 19 patch grid, where transformers' position ids skip and repeat: the connector output
/// of one frame equals transformers' (so the ids are applied as transformers applies them).
#[test]
fn a_grid_with_skipped_position_ids_matches_transformers() {
    assert_eq!(one_frame_connector("smolvlm-grid19", "smolvlm_grid19.safetensors"), 361, "scale factor 1");
}

/// 35 px frames at patch 4: the conv floors to 8 x 8 patches (the last 3 pixel rows and columns
/// unread), as SmolVLM-Instruct's 384 px frames at patch 14 give 27 x 27.
#[test]
fn frames_that_patches_do_not_tile_floor_as_transformers() {
    assert_eq!(one_frame_connector("smolvlm-floor35", "smolvlm_floor35.safetensors"), 16, "(8 / 2)² rows per frame");
}

/// The connector output of one seeded frame of model `name` against transformers'
/// `get_image_features` (golden `file`); returns the rows per frame.
fn one_frame_connector(name: &str, file: &str) -> usize {
    let dir = common::model_dir(name);
    let cfg = glimpse::models::ModelConfig::load(&dir.join("config.json")).unwrap();
    let ckpt = glimpse::weights::Checkpoint::open_dir(&dir).unwrap();
    let family = glimpse::models::load(&cfg, &ckpt).unwrap();
    let goldens = common::goldens(file);
    let (pixels, _) = goldens.f32("pixels").unwrap();
    let (want, shape) = goldens.f32("connector").unwrap();
    let plan = family.image_plan(1).unwrap().expect("an image stage");
    let mut exec = CpuExecutor::new(Arc::clone(family.weights()), &plan.graph.buffers);
    exec.write(plan.pixels, &pixels).unwrap();
    exec.set_left_padding(&[]);
    exec.set_position(0);
    for phase in &plan.phases {
        exec.run(phase).unwrap();
    }
    assert_eq!(shape[1] * shape[0], plan.rows_per_image, "{name}: rows per frame");
    let got = exec.read(plan.features, plan.rows_per_image).unwrap();
    assert_close(&format!("{name} connector"), &got, &want);
    plan.rows_per_image
}

/// A folder whose processor does not fit the model is refused at load, naming the file, the
/// field, the value and the fix; a scale factor that does not divide the patch grid too.
#[test]
fn mismatched_processor_and_config_are_clear_errors() {
    let edit = |file: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let tmp = common::tempdir();
        common::copy_dir(&common::model_dir(NAME), tmp.path());
        let path = tmp.path().join(file);
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
        let err = Model::load(tmp.path(), Device::Cpu).map(drop).unwrap_err().to_string();
        (tmp, err)
    };
    let (_t, err) = edit("processor_config.json", &|v| v["image_seq_len"] = 9.into());
    assert!(
        err.contains("processor_config.json") && err.contains("image_seq_len") && err.contains("set it to 16"),
        "{err}"
    );
    let (_t, err) =
        edit("processor_config.json", &|v| v["image_processor"]["max_image_size"]["longest_edge"] = 64.into());
    assert!(err.contains("max_image_size") && err.contains("32x32"), "{err}");
    let (_t, err) = edit("config.json", &|v| v["scale_factor"] = 3.into());
    assert!(err.contains("scale_factor") && err.contains("divide"), "{err}");
}

/// With `do_image_splitting` off (processor_config.json), each image is one frame and its
/// prompt one global image: transformers' ids, tokens, log-probs and text.
#[test]
fn without_image_splitting_matches_transformers() {
    let tmp = common::tempdir();
    common::copy_dir(&common::model_dir(NAME), tmp.path());
    let path = tmp.path().join("processor_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["image_processor"]["do_image_splitting"] = false.into();
    std::fs::write(&path, v.to_string()).unwrap();
    let model = Model::load(tmp.path(), Device::Cpu).unwrap();
    let golden = common::golden_json("smolvlm_nosplit.json");
    for case in golden["cases"].as_array().unwrap() {
        let cname = case["name"].as_str().unwrap();
        let paths: Vec<std::path::PathBuf> =
            case["images"].as_array().unwrap().iter().map(|i| common::image(i.as_str().unwrap())).collect();
        let pixels: Vec<PixelValues> = paths.iter().map(|p| model.preprocess(p).unwrap()).collect();
        assert_eq!(pixels.iter().map(PixelValues::frames).sum::<usize>(), case["frames"].as_u64().unwrap() as usize);
        let chat = model.chat.as_ref().unwrap();
        let prompt = chat.user_prompt(pixels.len(), case["text"].as_str().unwrap()).unwrap();
        assert_eq!(model.input_ids_for(Some(&prompt), &pixels).unwrap(), common::ids(&case["input_ids"]), "{cname}");
        let refs: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
        let opts = glimpse::GenerateOptions { max_new_tokens: Some(8), min_new_tokens: 8, ..model.default_options() };
        let out = model.ask_images(&refs, case["text"].as_str().unwrap(), &opts).unwrap();
        assert_eq!(out.tokens, common::ids(&case["generated_ids"]), "{cname}: greedy tokens");
        for (i, (got, want)) in out.logprobs.iter().zip(common::floats(&case["logprobs"])).enumerate() {
            assert!((got - want).abs() <= LOGPROB_ABS, "{cname} step {i}: logprob {got} vs {want}");
        }
        // `Output::text` is the decoded text stripped as Python's `str.strip` (`decode_text`).
        let decoded = glimpse::tokenizer::py_strip(case["decoded"].as_str().unwrap());
        assert_eq!(out.text, decoded, "{cname}: text");
    }
}
