//! `glimpse synth`: presets, parameter counts, the in-memory random checkpoint, and the tiny
//! preset written as an HF folder that `Model::load` reads back and captions with.

mod common;

use glimpse::synth::{parameter_count, preset, random_checkpoint, tokenizer, write_folder};
use glimpse::weights::{Checkpoint, Dtype, Requested};
use glimpse::{Device, Model};

/// A BLIP-2 preset's config.
fn blip2(name: &str) -> glimpse::models::blip2::Blip2Config {
    preset(name).unwrap().get::<glimpse::models::blip2::Blip2Config>().expect("a BLIP-2 preset").clone()
}

#[test]
fn tiny_round_trips_through_a_folder() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("tiny");
    write_folder("tiny", &dir, 7).expect("write tiny");
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let model = Model::load(&dir, Device::Cpu).expect("Model::load accepts a synth folder");
    assert_eq!(model.family.weights().parameters(), parameter_count(&preset("tiny").unwrap()).unwrap());
    let mut opts = model.default_options();
    assert_eq!(opts.eos_token_ids, vec![202]);
    opts.max_new_tokens = Some(5);
    let out = model.caption(&common::image("odd_257x181.png"), &opts).expect("caption");
    assert!(!out.tokens.is_empty() && out.tokens.len() <= 5);
    // The VQA path (prompt tokenized by the synth tokenizer) runs too.
    let out = model.ask(&common::image("wide_301x97.png"), "what is this?", &model.default_options()).expect("ask");
    assert!(!out.tokens.is_empty());
}

#[test]
fn parameter_counts_match_transformers() {
    // Blip2ForConditionalGeneration(config).num_parameters() in transformers 5.17 (tied lm_head
    // counted once, no Q-Former text branch). The hub card's 3.87 B for blip2-opt-2.7b counts the
    // untied lm_head copy of its fp32 files as well.
    let p27 = parameter_count(&preset("blip2-opt-2.7b").unwrap()).unwrap();
    assert_eq!(p27, 3_744_761_856);
    assert!((3.7e9..3.8e9).contains(&(p27 as f64)));
    assert_eq!(parameter_count(&preset("blip2-opt-6.7b").unwrap()).unwrap(), 7_752_869_376);
    assert_eq!(parameter_count(&preset("tiny").unwrap()).unwrap(), 2_017_968);
}

#[test]
fn presets_have_the_real_shapes() {
    let c = blip2("blip2-opt-2.7b");
    let (v, q, t) = (&c.vision_config, &c.qformer_config, c.text_config.opt().unwrap());
    assert_eq!(
        (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.image_size, v.patch_size),
        (1408, 39, 16, 6144, 224, 14)
    );
    assert_eq!(
        (
            q.hidden_size,
            q.num_hidden_layers,
            q.num_attention_heads,
            q.intermediate_size,
            q.cross_attention_frequency,
            q.encoder_hidden_size
        ),
        (768, 12, 12, 3072, 2, 1408)
    );
    assert_eq!(
        (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.ffn_dim, t.vocab_size, t.max_position_embeddings),
        (2560, 32, 32, 10240, 50304, 2048)
    );
    assert_eq!((c.image_token(), c.num_query_tokens, t.bos_token_id, t.pad_token_id), (50265, 32, Some(2), Some(1)));
    assert_eq!(t.eos_token_id.as_ref().unwrap().to_vec(), vec![50118]);
    let c = blip2("blip2-opt-6.7b");
    let t = c.text_config.opt().unwrap();
    assert_eq!((t.hidden_size, t.ffn_dim, t.num_hidden_layers), (4096, 16384, 32));
    let c = blip2("tiny");
    assert_eq!(
        (
            c.vision_config.head_dim(),
            c.qformer_config.head_dim(),
            c.text_config.opt().unwrap().head_dim(),
            c.vision_config.num_positions()
        ),
        (88, 64, 80, 257)
    );
    assert_eq!(glimpse::synth::presets().len(), 20);
}

#[test]
fn unknown_preset_is_an_error() {
    let e = preset("blip2-opt-13b").unwrap_err().to_string();
    assert!(e.contains("unknown preset `blip2-opt-13b`") && e.contains("tiny"), "{e}");
    let tmp = common::tempdir();
    assert!(write_folder("nope", &tmp.path().join("x"), 0).is_err());
    assert!(!tmp.path().join("x").exists(), "nothing written for an unknown preset");
}

#[test]
fn refuses_to_write_into_a_non_empty_folder() {
    let tmp = common::tempdir();
    std::fs::write(tmp.path().join("keep.txt"), "mine").unwrap();
    let e = write_folder("tiny", tmp.path(), 0).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(std::fs::read_to_string(tmp.path().join("keep.txt")).unwrap(), "mine");
    assert!(!tmp.path().join("model.safetensors").exists());
    // An existing empty folder is fine.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    write_folder("tiny", &empty, 0).expect("empty folder accepted");
}

#[test]
fn random_weights_are_deterministic_and_scaled() {
    let cfg = preset("tiny").unwrap();
    let rc = |seed| random_checkpoint(&cfg, seed).unwrap();
    let (a, b, c) = (rc(1), rc(1), rc(2));
    let name = "language_model.model.decoder.layers.0.fc1.weight";
    let (wa, shape) = a.f32(name).unwrap();
    assert_eq!(shape, vec![320, 160]);
    assert_eq!(wa, b.f32(name).unwrap().0, "same seed, same values");
    assert_ne!(wa, c.f32(name).unwrap().0, "another seed, other values");
    let std = |v: &[f32]| {
        let m = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        (v.iter().map(|&x| (f64::from(x) - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    // OPT linears: gain 3 / sqrt(fan_in); vision linears: 1 / sqrt(fan_in); LN weights ~1.
    assert!((std(&wa) - 3.0 / 160f64.sqrt()).abs() < 0.02, "{}", std(&wa));
    let (wv, _) = a.f32("vision_model.encoder.layers.1.mlp.fc2.weight").unwrap();
    assert!((std(&wv) - 1.0 / 352f64.sqrt()).abs() < 0.005, "{}", std(&wv));
    let (ln, _) = a.f32("qformer.layernorm.weight").unwrap();
    assert!(ln.iter().all(|&x| (0.5..1.5).contains(&x)));
    // Every tensor Blip2::load reads is there with the right shape: loading succeeds.
    glimpse::models::blip2::Blip2::load(cfg.get::<glimpse::models::blip2::Blip2Config>().unwrap(), &a)
        .expect("Blip2::load on the random checkpoint");
}

#[test]
fn tokenizer_puts_image_token_at_its_index() {
    for name in ["tiny", "blip2-opt-2.7b"] {
        let tok = tokenizer(&preset(name).unwrap()).unwrap();
        let cfg = blip2(name);
        assert_eq!(tok.token_to_id("<image>"), Some(cfg.image_token()), "{name}");
        assert_eq!(tok.get_vocab_size(true), cfg.image_token() as usize + 1, "{name}");
        let eos = cfg.text_config.eos_token_id().unwrap().to_vec()[0];
        assert_eq!(tok.id_to_token(eos).as_deref(), Some("Ċ"), "{name}: EOS is the newline token");
        let ids = tok.encode(glimpse::synth::VQA_PROMPT, true).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), 9, "{name}: BOS + 8 tokens, as OPT's tokenizer gives: {ids:?}");
        assert_eq!(ids[0], 2);
        let with_image = tok.encode("<image><image> a dog", true).unwrap().get_ids().to_vec();
        assert_eq!(&with_image[..3], &[2, cfg.image_token(), cfg.image_token()]);
    }
}

/// FNV-1a 64 of a byte string (a fingerprint for pinning a file's bytes).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[test]
fn synth_writes_exactly_the_tensors_load_reads() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("tiny");
    write_folder("tiny", &dir, 7).unwrap();
    // The tensor list comes from Blip2::load itself: the written checkpoint and the loaded
    // weight table name the same tensors with the same shapes (tied lm_head not stored).
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let model = Model::load(&dir, Device::Cpu).unwrap();
    let table = model.family.weights();
    let mut written: Vec<(String, Vec<usize>)> =
        ckpt.names().map(|n| (n.to_string(), ckpt.info(n).unwrap().shape.clone())).collect();
    let mut loaded: Vec<(String, Vec<usize>)> =
        table.names.iter().cloned().zip(table.weights.iter().map(|w| w.shape.clone())).collect();
    written.sort();
    loaded.sort();
    assert_eq!(written, loaded);
    assert!(!ckpt.contains("language_model.lm_head.weight"));
    // Same bytes as the hand-written inventory this replaced wrote (glimpse synth --preset tiny
    // --seed 7 before the change): names, shapes and every value unchanged.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_eq!((bytes.len(), fnv1a(&bytes)), (4_054_512, 0x89da_ee14_9b36_8e8e));
}

#[test]
fn recording_checkpoint_logs_each_request_once() {
    let rec = Checkpoint::recording("<test>");
    assert!(!rec.contains("a.weight"), "nothing is there before it is asked for");
    let w = rec.f16("a.weight", &[3, 5]).unwrap();
    assert_eq!(w.shape, vec![3, 5]);
    assert_eq!(w.as_slice().len(), 15);
    assert!(w.as_slice().iter().all(|v| v.to_f32() == 0.0));
    assert!(rec.contains("a.weight"));
    rec.f16("b.bias", &[5]).unwrap();
    rec.f16("a.weight", &[3, 5]).expect("asking again with the same shape is fine");
    let err = rec.f16("a.weight", &[5, 3]).unwrap_err().to_string();
    assert!(err.contains("a.weight") && err.contains("[5, 3]") && err.contains("[3, 5]"), "{err}");
    let req = |name: &str, shape: &[usize]| Requested { name: name.into(), shape: shape.to_vec(), dtype: Dtype::F16 };
    assert_eq!(rec.requested(), vec![req("a.weight", &[3, 5]), req("b.bias", &[5])]);
    // An f32 read (CLIP's logit_scale) is logged as a scalar, as transformers stores it.
    assert_eq!(rec.f32("logit_scale").unwrap(), (vec![0.0], vec![]));
    assert_eq!(rec.requested().last(), Some(&req("logit_scale", &[])));
    // Any other checkpoint records nothing.
    assert!(random_checkpoint(&preset("tiny").unwrap(), 0).unwrap().requested().is_empty());
}

/// Runs `transformers` (when it and torch are importable) on a synth folder: `class` loads it
/// with no missing, unexpected or mismatched keys, AutoProcessor loads, and the parameter count
/// is printed as `params N`. None (with the reason printed) when Python cannot run the check.
fn transformers_params(dir: &std::path::Path, class: &str) -> Option<usize> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import sys, importlib.util as u\n\
                  missing = [m for m in ('torch', 'transformers') if u.find_spec(m) is None]\n\
                  if missing: print('skipped: no ' + ', '.join(missing)); sys.exit(0)\n\
                  import transformers as t\n\
                  m, info = getattr(t, sys.argv[2]).from_pretrained(sys.argv[1], output_loading_info=True)\n\
                  bad = {k: v for k, v in info.items() if k in ('missing_keys', 'unexpected_keys', 'mismatched_keys') and v}\n\
                  assert not bad, bad\n\
                  p = t.AutoProcessor.from_pretrained(sys.argv[1])\n\
                  print('processor', type(p).__name__)\n\
                  print('params', sum(x.numel() for x in m.parameters()))";
    let o = match std::process::Command::new(&python).args(["-c", script]).arg(dir).arg(class).output() {
        Ok(o) => o,
        Err(e) => {
            println!(
                "skipped: {python} cannot run ({e}); install Python with torch and transformers to run this check"
            );
            return None;
        }
    };
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "transformers rejected the folder: {}\n{out}", String::from_utf8_lossy(&o.stderr));
    println!("transformers: {}", out.trim());
    if out.starts_with("skipped") {
        return None;
    }
    let params = out.lines().find_map(|l| l.strip_prefix("params ")).expect("params line");
    Some(params.trim().parse().unwrap())
}

#[test]
fn llava_presets_have_the_real_shapes() {
    for (name, (h, i, l, n)) in [("llava-1.5-7b", (4096, 11008, 32, 32)), ("llava-1.5-13b", (5120, 13824, 40, 40))] {
        let Some(c) = preset(name).unwrap().get::<glimpse::models::llava::LlavaConfig>().cloned() else {
            panic!("{name} is not LLaVA")
        };
        let (v, t) = (&c.vision_config, &c.text_config);
        assert_eq!(
            (
                v.hidden_size,
                v.intermediate_size,
                v.num_hidden_layers,
                v.num_attention_heads,
                v.image_size,
                v.patch_size
            ),
            (1024, 4096, 24, 16, 336, 14),
            "{name}"
        );
        assert_eq!((t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads), (h, i, l, n));
        assert_eq!((t.vocab_size, t.max_position_embeddings, t.rms_norm_eps, t.kv_heads()), (32064, 4096, 1e-5, n));
        assert_eq!(t.rope().unwrap().0, 10000.0);
        assert_eq!((c.image_token_index, c.feature_layers().unwrap(), c.image_rows()), (32000, vec![23], 576));
        assert_eq!((c.vision_feature_select_strategy.as_str(), c.projector_hidden_act.as_str()), ("default", "gelu"));
        assert!(!c.tie_word_embeddings);
        // The synthetic LLaMA tokenizer puts `<image>` at image_token_index, `<pad>` right after.
        let tok = tokenizer(&preset(name).unwrap()).unwrap();
        assert_eq!((tok.token_to_id("<image>"), tok.token_to_id("<pad>")), (Some(32000), Some(32001)));
    }
    // LlavaForConditionalGeneration(config).num_parameters(): 7,063,427,072 for llava-1.5-7b
    // (CLIP ViT-L/14-336 303.5 M incl. the unused last layer, projector 21.0 M, LLaMA 6.74 B).
    // transformers 5.17's LlavaForConditionalGeneration at these shapes (built on the meta
    // device, 2026-11-30): sum of parameter numels.
    assert_eq!(parameter_count(&preset("llava-1.5-7b").unwrap()).unwrap(), 7_063_427_072);
}

#[test]
fn clip_preset_has_the_real_shapes() {
    let Some(c) = preset("clip-vit-large-patch14").unwrap().get::<glimpse::models::clip::ClipConfig>().cloned() else {
        panic!("not CLIP")
    };
    let (v, t) = (c.vision_config.as_ref().unwrap(), c.text_config.as_ref().unwrap());
    assert_eq!(
        (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size),
        (1024, 4096, 24, 16, 14, 224)
    );
    assert_eq!(
        (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size),
        (768, 3072, 12, 12, 49408)
    );
    assert_eq!((t.max_position_embeddings, c.projection_dim, t.eos_token_id), (77, 768, Some(49407)));
    // CLIPModel(config).num_parameters() of openai/clip-vit-large-patch14.
    // transformers 5.17's CLIPModel at these shapes (meta device, 2026-11-30).
    assert_eq!(parameter_count(&preset("clip-vit-large-patch14").unwrap()).unwrap(), 427_616_513);
    let tok = tokenizer(&preset("clip-vit-large-patch14").unwrap()).unwrap();
    assert_eq!(tok.token_to_id("<|startoftext|>"), Some(49406));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(49407));
}

#[test]
fn llava_tiny_folder_generates_and_loads_in_transformers() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("llava");
    write_folder("llava-tiny", &dir, 3).expect("write llava-tiny");
    assert!(dir.join("chat_template.jinja").is_file());
    let model = Model::load(&dir, Device::Cpu).expect("Model::load accepts a LLaVA synth folder");
    let ids = model.chat_input_ids(1, "what is this?").expect("chat template and tokenizer");
    // 24 px / 6 px patches: 16 image tokens, CLS dropped.
    assert_eq!(ids.iter().filter(|&&t| t == 1000).count(), 16, "{ids:?}");
    assert_eq!(ids[0], 1, "BOS first");
    let mut opts = model.default_options();
    opts.max_new_tokens = Some(4);
    let out = model.ask(&common::image("odd_257x181.png"), "what is this?", &opts).expect("ask");
    assert!(!out.tokens.is_empty() && out.tokens.len() <= 4, "{:?}", out.tokens);
    let ours = parameter_count(&preset("llava-tiny").unwrap()).unwrap();
    if let Some(theirs) = transformers_params(&dir, "LlavaForConditionalGeneration") {
        assert_eq!(theirs, ours, "transformers holds exactly the tensors synth wrote");
    }
}

#[test]
fn clip_tiny_folder_embeds_and_loads_in_transformers() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("clip");
    write_folder("clip-tiny", &dir, 5).expect("write clip-tiny");
    let model = glimpse::EmbedModel::load(&dir, Device::Cpu).expect("EmbedModel::load accepts a CLIP synth folder");
    let ids = model.text_ids("a photo of a dog").expect("CLIP tokenizer");
    assert_eq!((ids.first(), ids.last()), (Some(&1022), Some(&1023)), "{ids:?}");
    let px = model.preprocess(&common::image("odd_257x181.png")).expect("preprocess");
    let probs = model.classify(&[px], &["a photo of a dog", "a photo of a cat"]).expect("classify");
    assert_eq!(probs[0].len(), 2);
    assert!((probs[0].iter().sum::<f32>() - 1.0).abs() < 1e-4, "{probs:?}");
    // logit_scale is CLIP's init value (ln(1/0.07)), a scalar.
    let (scale, shape) = Checkpoint::open_dir(&dir).unwrap().f32("logit_scale").unwrap();
    assert!(shape.is_empty() && (scale[0] - 2.6592).abs() < 2e-3, "{scale:?} {shape:?}");
    let texts = model.embed_texts(&["a dog"]).unwrap();
    assert_eq!(texts[0].len(), 24);
    let ours = parameter_count(&preset("clip-tiny").unwrap()).unwrap();
    if let Some(theirs) = transformers_params(&dir, "CLIPModel") {
        assert_eq!(theirs, ours, "transformers holds exactly the tensors synth wrote");
    }
}

#[test]
fn instructblip_preset_has_the_real_shapes() {
    let Some(c) =
        preset("instructblip-vicuna-7b").unwrap().get::<glimpse::models::instructblip::InstructBlipConfig>().cloned()
    else {
        panic!("not InstructBLIP")
    };
    let (v, q, t) = (&c.vision_config, &c.qformer_config, c.llama().unwrap());
    assert_eq!((v.hidden_size, v.num_hidden_layers, v.num_positions()), (1408, 39, 257));
    assert_eq!((q.hidden_size, q.num_hidden_layers, q.vocab_size, q.max_position_embeddings), (768, 12, 30523, 512));
    assert_eq!((t.hidden_size, t.num_hidden_layers, t.vocab_size, t.max_position_embeddings), (4096, 32, 32002, 2048));
    assert_eq!((c.num_query_tokens, c.image_token()), (32, 32000));
    // transformers 5.17's InstructBlipForConditionalGeneration at these shapes (meta device,
    // 2026-11-30): sum of parameter numels (the hub card's 7.9 B).
    assert_eq!(parameter_count(&preset("instructblip-vicuna-7b").unwrap()).unwrap(), 7_913_218_816);
}

#[test]
fn instructblip_tiny_folder_generates_and_loads_in_transformers() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("instructblip");
    write_folder("instructblip-tiny", &dir, 5).expect("write instructblip-tiny");
    assert!(dir.join("qformer_tokenizer").join("tokenizer.json").is_file());
    let model = Model::load(&dir, Device::Cpu).expect("Model::load accepts an InstructBLIP synth folder");
    let ids = model.input_ids(Some("what is this?")).unwrap();
    assert_eq!(ids[..5], [1000, 1000, 1000, 1000, 2], "4 image tokens, then BOS </s>");
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(4), ..model.default_options() };
    let out = model.ask(&common::image("odd_257x181.png"), "what is this?", &opts).expect("ask");
    assert!(!out.tokens.is_empty() && out.tokens.len() <= 4, "{:?}", out.tokens);
    model.caption(&common::image("odd_257x181.png"), &opts).expect("caption");
    let ours = parameter_count(&preset("instructblip-tiny").unwrap()).unwrap();
    if let Some(theirs) = transformers_params(&dir, "InstructBlipForConditionalGeneration") {
        assert_eq!(theirs, ours, "transformers holds exactly the tensors synth wrote");
    }
}

/// InstructBLIP Flan-T5-XL: the Vicuna preset's image side, blip2-flan-t5-xl's T5.
#[test]
fn instructblip_flan_t5_preset_has_the_real_shapes() {
    let Some(c) =
        preset("instructblip-flan-t5-xl").unwrap().get::<glimpse::models::instructblip::InstructBlipConfig>().cloned()
    else {
        panic!("not InstructBLIP")
    };
    let glimpse::models::language_model::TextConfig::T5(t) = &c.text_config else { panic!("not T5") };
    assert_eq!((t.d_model, t.d_kv, t.d_ff, t.num_layers, t.num_heads, t.vocab_size), (2048, 64, 5120, 24, 32, 32128));
    assert_eq!(
        (t.act_name().as_str(), t.scale_outputs(), c.image_token(), c.num_query_tokens),
        ("gelu", false, 32100, 32)
    );
    assert_eq!((c.vision_config.num_hidden_layers, c.qformer_config.vocab_size), (39, 30523));
    // transformers 5.17's InstructBlipForConditionalGeneration at these shapes on the meta device
    // (2026-11-30): 3,957,170,944 with the fresh model's head tied to `shared`, plus the stored
    // untied Flan head (32128 x 2048): 4,022,969,088 (the hub card's 4.02 B).
    assert_eq!(parameter_count(&preset("instructblip-flan-t5-xl").unwrap()).unwrap(), 4_022_969_088);
}

#[test]
fn instructblip_flan_t5_tiny_folder_generates_and_loads_in_transformers() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("ib-t5");
    write_folder("instructblip-flan-t5-tiny", &dir, 5).expect("write instructblip-flan-t5-tiny");
    assert!(dir.join("qformer_tokenizer").join("tokenizer.json").is_file());
    let model = Model::load(&dir, Device::Cpu).expect("Model::load accepts an InstructBLIP Flan-T5 synth folder");
    let ids = model.input_ids(Some("what is this?")).unwrap();
    assert_eq!(
        (ids[..4].to_vec(), ids.last()),
        (vec![32100; 4], Some(&1)),
        "4 image tokens, the prompt, </s>: {ids:?}"
    );
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(4), ..model.default_options() };
    let out = model.ask(&common::image("odd_257x181.png"), "what is this?", &opts).expect("ask");
    assert!(!out.tokens.is_empty() && out.tokens.len() <= 4, "{:?}", out.tokens);
    let ours = parameter_count(&preset("instructblip-flan-t5-tiny").unwrap()).unwrap();
    if let Some(theirs) = transformers_params(&dir, "InstructBlipForConditionalGeneration") {
        assert_eq!(theirs, ours, "transformers holds exactly the tensors synth wrote");
    }
}

#[test]
fn blip2_flan_t5_presets_have_the_real_shapes() {
    let Some(c) = preset("blip2-flan-t5-xl").unwrap().get::<glimpse::models::blip2::Blip2Config>().cloned() else {
        panic!("not BLIP-2")
    };
    let glimpse::models::language_model::TextConfig::T5(t) = &c.text_config else { panic!("not T5") };
    assert_eq!(
        (t.d_model, t.d_kv, t.d_ff, t.num_layers, t.decoder_layers(), t.num_heads),
        (2048, 64, 5120, 24, 24, 32)
    );
    assert_eq!(
        (t.vocab_size, c.image_token(), t.act_name().as_str(), t.is_gated(), t.scale_outputs()),
        (32128, 32100, "gelu", true, false)
    );
    assert_eq!(
        (c.vision_config.hidden_size, c.vision_config.num_hidden_layers, c.qformer_config.num_hidden_layers),
        (1408, 39, 12)
    );
    // transformers 5.17's Blip2ForConditionalGeneration at these shapes on the meta device
    // (2026-11-30): 3,876,648,448 with the fresh model's head tied to `shared`, plus the stored
    // untied Flan head (32128 x 2048) that from_pretrained keeps apart: 3,942,446,592, the
    // hub card's 3.94 B.
    assert_eq!(parameter_count(&preset("blip2-flan-t5-xl").unwrap()).unwrap(), 3_942_446_592);
    let tok = tokenizer(&preset("blip2-flan-t5-xl").unwrap()).unwrap();
    assert_eq!(
        (
            tok.token_to_id("<pad>"),
            tok.token_to_id("</s>"),
            tok.token_to_id("<extra_id_0>"),
            tok.token_to_id("<image>")
        ),
        (Some(0), Some(1), Some(32099), Some(32100))
    );
}

#[test]
fn blip2_flan_t5_tiny_folder_generates_and_loads_in_transformers() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("t5");
    write_folder("blip2-flan-t5-tiny", &dir, 7).expect("write blip2-flan-t5-tiny");
    let model = Model::load(&dir, Device::Cpu).expect("Model::load accepts a BLIP-2 Flan-T5 synth folder");
    let ids = model.input_ids(Some("Question: what is this? Answer:")).unwrap();
    assert_eq!((ids[31], ids[32], ids.len(), ids.last()), (32100, 37, 41, Some(&1)), "{ids:?}");
    let out = model.ask(&common::image("odd_257x181.png"), "what is this?", &model.default_options()).expect("ask");
    assert!(!out.tokens.is_empty() && out.tokens.len() <= 20, "{:?}", out.tokens);
    let ours = parameter_count(&preset("blip2-flan-t5-tiny").unwrap()).unwrap();
    if let Some(theirs) = transformers_params(&dir, "Blip2ForConditionalGeneration") {
        assert_eq!(theirs, ours, "transformers holds exactly the tensors synth wrote");
    }
}

/// A write that fails (a full disk; here a 4 KiB file-size limit) leaves no `.partial` file.
#[cfg(target_os = "linux")]
#[test]
fn a_failed_write_leaves_no_partial_files() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_glimpse"));
    cmd.args(["synth", "--preset", "tiny", "--out"]).arg(&out);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: 4096, rlim_max: 4096 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && err.contains("File too large"), "the write must fail: {err}");
    let left: Vec<_> = walk(&out).into_iter().filter(|p| p.to_string_lossy().ends_with(".partial")).collect();
    assert!(left.is_empty(), "{left:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn smolvlm_presets_have_the_real_shapes() {
    use glimpse::models::idefics3::Idefics3Config;
    for (name, (h, i, l, n, kv)) in [("smolvlm-256m", (576, 1536, 30, 9, 3)), ("smolvlm-500m", (960, 2560, 32, 15, 5))]
    {
        let Some(c) = preset(name).unwrap().get::<Idefics3Config>().cloned() else { panic!("{name} is not SmolVLM") };
        let (v, t) = (&c.vision_config, &c.text_config);
        assert_eq!(
            (
                v.hidden_size,
                v.intermediate_size,
                v.num_hidden_layers,
                v.num_attention_heads,
                v.image_size,
                v.patch_size
            ),
            (768, 3072, 12, 12, 512, 16),
            "{name}"
        );
        assert_eq!(
            (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.kv_heads()),
            (h, i, l, n, kv)
        );
        assert_eq!((t.vocab_size, t.max_position_embeddings, t.rope().unwrap().0), (49280, 8192, 100000.0));
        assert_eq!((c.scale_factor, c.image_token_id, c.image_seq_len()), (4, 49190, 64));
        assert!(!c.tie_word_embeddings, "{name}: the hub checkpoints store lm_head");
        let tok = tokenizer(&preset(name).unwrap()).unwrap();
        assert_eq!(tok.token_to_id("<image>"), Some(49190));
        assert!(tok.token_to_id("<row_6_col_6>").is_some_and(|id| (id as usize) < t.vocab_size));
    }
    // Idefics3ForConditionalGeneration(config) at these shapes in transformers 5.17 (meta
    // device, 2026-12-07): sum of parameter numels. The untied head is what makes them 256M/507M.
    assert_eq!(parameter_count(&preset("smolvlm-256m").unwrap()).unwrap(), 256_484_928);
    assert_eq!(parameter_count(&preset("smolvlm-500m").unwrap()).unwrap(), 507_482_304);
    assert_eq!(parameter_count(&preset("smolvlm-tiny").unwrap()).unwrap(), 76_192);
    // SmolVLM-Instruct's shapes (27 x 27 patches of 14 px in 384 px frames, scale factor 3: 81
    // rows per frame): 2,246,272,880 in transformers 5.17 (meta device, 2026-12-07).
    let c = preset("smolvlm-2.2b").unwrap();
    assert_eq!(c.get::<Idefics3Config>().unwrap().image_seq_len(), 81);
    assert_eq!(parameter_count(&c).unwrap(), 2_246_272_880);
}

/// A smolvlm-tiny folder loads, splits an image into tiles and answers through the chat
/// template; its image stage gives one block of rows per frame.
#[test]
fn smolvlm_tiny_folder_generates() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("smolvlm");
    write_folder("smolvlm-tiny", &dir, 11).expect("write smolvlm-tiny");
    assert!(dir.join("chat_template.jinja").is_file());
    let model = Model::load(&dir, Device::Cpu).expect("Model::load accepts a SmolVLM synth folder");
    let px = model.preprocess(&common::image("wide_301x97.png")).unwrap();
    assert!(px.tiles.is_some_and(|(r, c)| r * c > 0), "{:?}", px.tiles);
    let ids = model
        .input_ids_for(Some("<|im_start|>User:<image>what?<end_of_utterance>\nAssistant:"), std::slice::from_ref(&px))
        .unwrap();
    assert_eq!(ids.iter().filter(|&&t| t == 1000).count(), 16 * px.frames(), "16 image tokens per frame");
    let mut opts = model.default_options();
    opts.max_new_tokens = Some(4);
    let out = model.ask(&common::image("wide_301x97.png"), "what is this?", &opts).expect("ask");
    assert!(!out.tokens.is_empty() && out.tokens.len() <= 4, "{:?}", out.tokens);
    let features = model.encode_images(std::slice::from_ref(&px)).unwrap();
    assert_eq!(features[0].values().len(), px.frames() * 16 * 32, "frames x image_seq_len x hidden");
}

/// IDEFICS presets: transformers' parameter counts, and a tiny folder that loads and answers
/// about two interleaved images.
#[test]
fn idefics_presets_count_and_generate() {
    // IdeficsForVisionText2Text(config) at these shapes in transformers 5.17 (meta device,
    // 2026-12-07): sum of parameter numels, the vision tower's unused post_layernorm included.
    assert_eq!(parameter_count(&preset("idefics-9b").unwrap()).unwrap(), 8_929_675_280);
    assert_eq!(parameter_count(&preset("idefics-tiny").unwrap()).unwrap(), 329_348);

    let tmp = common::tempdir();
    let dir = tmp.path().join("idefics");
    write_folder("idefics-tiny", &dir, 5).expect("write idefics-tiny");
    let model = Model::load(&dir, Device::Cpu).expect("Model::load accepts an IDEFICS synth folder");
    assert_eq!(model.tokenizer.token_to_id("<image>"), Some(1001));
    // The weight table: transformers' parameters without the vision tower's post_layernorm
    // (never run), plus the zero bias glimpse's patch embedding adds (32), plus the additional
    // embedding and head rows' own entries (2 x 2 x 64), which are also joined in place into
    // the main embedding and head; the 1000-row tables are held once.
    assert_eq!(model.family.weights().parameters(), 329_348 - 2 * 32 + 32 + 2 * 2 * 64);
    let images: Vec<_> =
        ["rgba_150x120.png", "tall_83x311.png"].iter().map(|n| model.preprocess(&common::image(n)).unwrap()).collect();
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(4), min_new_tokens: 4, ..model.default_options() };
    let prompt = glimpse::api::Prompt::Raw(Some("A<image>then<image>Which one?"));
    let out = model.generate(&glimpse::api::Request::new(&images, prompt, &opts), &mut |_| {}).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].tokens.len(), 4);
    assert!(out[0].logprobs.iter().all(|l| l.is_finite() && *l <= 0.0), "{:?}", out[0].logprobs);
    // The images matter: the same prompt over other images changes the first token's log-prob.
    let swapped = [images[1].clone(), images[0].clone()];
    let other = model.generate(&glimpse::api::Request::new(&swapped, prompt, &opts), &mut |_| {}).unwrap();
    assert_ne!(out[0].logprobs[0], other[0].logprobs[0], "cross-attention must read the images");
}
