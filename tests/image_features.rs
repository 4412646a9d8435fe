//! Precomputed image features ([`Model::encode_images`], [`Request::features`]: the seam the
//! server's image cache uses). For every generating family on the tiny fixtures: the image
//! stage a plan skips leaves the later phases nothing else to read, and an answer given from
//! features computed earlier (alone or in a batch with other images) equals the answer computed
//! from the pixels, to the bit: text, tokens and log-probabilities.

mod common;

use glimpse::generate::PlanShape;
use glimpse::image::PixelValues;
use glimpse::{Device, GenerateOptions, ImageFeatures, ImageInput, Model, Output, Prompt, Request};

const GENERATING: &[&str] = &[
    "blip2-opt-tiny",
    "blip2-opt-tiny-proj",
    "blip2-flan-t5-tiny",
    "instructblip-tiny",
    "instructblip-flan-t5-tiny",
    "llava-tiny",
    "llava-tiny-variant",
];

fn pixels(model: &Model, name: &str) -> PixelValues {
    let bytes = std::fs::read(common::image(name)).unwrap();
    model.preprocess_input(&ImageInput::Bytes { bytes: &bytes, name }).unwrap()
}

fn run(model: &Model, images: &[PixelValues], prompt: Prompt<'_>, features: Option<&[ImageFeatures]>) -> Vec<Output> {
    run_with(model, images, prompt, features, &GenerateOptions { max_new_tokens: Some(8), ..model.default_options() })
}

fn run_with(
    model: &Model,
    images: &[PixelValues],
    prompt: Prompt<'_>,
    features: Option<&[ImageFeatures]>,
    opts: &GenerateOptions,
) -> Vec<Output> {
    let request = Request { features, ..Request::new(images, prompt, opts) };
    model.generate(&request, &mut |_| {}).unwrap()
}

/// One output as compared: text, tokens, log-probabilities and beam score (as bit patterns),
/// the tokens of the other returned hypotheses.
type Answer = (String, Vec<u32>, Vec<u64>, Option<u64>, Vec<Vec<u32>>);

/// Each output as an [`Answer`].
fn answers(outputs: &[Output]) -> Vec<Answer> {
    outputs
        .iter()
        .map(|o| {
            let bits = o.logprobs.iter().map(|l| l.to_bits()).collect();
            let others = o.alternatives.iter().map(|h| h.tokens.clone()).collect();
            (o.text.clone(), o.tokens.clone(), bits, o.score.map(f64::to_bits), others)
        })
        .collect()
}

#[test]
fn every_family_has_an_image_stage_whose_later_phases_read_only_its_features() {
    for name in GENERATING {
        let model = Model::load(common::model_dir(name), Device::Cpu).unwrap();
        let ids = match model.chat {
            Some(_) => model.chat_input_ids(1, "what is it?").unwrap(),
            None => model.input_ids(Some(&model.question_prompt("what is it?"))).unwrap(),
        };
        let sequences = model.family.sequences_for(1, &ids).unwrap();
        let shape = PlanShape { images: 1, sequences, ..PlanShape::new(1, ids.len(), 4) };
        let plan = model.family.plan_for(&shape).unwrap();
        let stage = plan.image_stage.unwrap_or_else(|| panic!("{name}: no image stage"));
        plan.check_image_stage().unwrap_or_else(|e| panic!("{name}: {e}"));
        let alone = model.family.image_plan(2).unwrap().unwrap();
        let (full, own) = (plan.graph.desc(stage.features), alone.graph.desc(alone.features));
        assert_eq!((own.rows, own.cols), (2 * stage.rows_per_image, full.cols), "{name}");
        assert_eq!(alone.rows_per_image, stage.rows_per_image, "{name}");
        let names = |p: &[glimpse::graph::Phase]| p.iter().map(|p| p.name).collect::<Vec<_>>();
        assert_eq!(names(&alone.phases), names(&plan.encoders[..stage.phases]), "{name}");
    }
    // A stage that claims the wrong buffer is refused.
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let mut plan = model.family.plan(1, 40, 4, false).unwrap();
    let stage = plan.image_stage.unwrap();
    let qformer_out = plan.output("qformer_out").unwrap();
    plan.image_stage = Some(glimpse::generate::ImageStage { features: qformer_out, ..stage });
    let err = plan.check_image_stage().unwrap_err().to_string();
    assert!(err.contains("phase `prefill`") && err.contains("reads `image_embeds`"), "{err}");
    plan.image_stage = Some(glimpse::generate::ImageStage { phases: 1, ..stage });
    let err = plan.check_image_stage().unwrap_err().to_string();
    assert!(err.contains("does not write its features"), "{err}");
}

#[test]
fn answers_from_precomputed_features_equal_answers_from_pixels() {
    for name in GENERATING {
        let model = Model::load(common::model_dir(name), Device::Cpu).unwrap();
        let a = pixels(&model, "photo_q90.jpg");
        let b = pixels(&model, "odd_257x181.png");
        // Features of `a` computed alone, of `b` in a batch with `a`.
        let fa = model.encode_images(std::slice::from_ref(&a)).unwrap();
        let fab = model.encode_images(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(fab.len(), 2);
        assert_eq!(fa[0], fab[0], "{name}: an image's features do not depend on its batch");
        assert_ne!(fab[0], fab[1], "{name}");
        assert_eq!(fa[0].size_bytes(), fa[0].values().len() * 4);
        let (one, two) = (std::slice::from_ref(&a), [a.clone(), b.clone()]);
        let mixed = [fa[0].clone(), fab[1].clone()];

        for prompt in [Prompt::Caption, Prompt::Question("what is in the picture?")] {
            let want = run(&model, one, prompt, None);
            assert!(!want[0].tokens.is_empty(), "{name}");
            assert_eq!(answers(&run(&model, one, prompt, Some(&fa))), answers(&want), "{name} {prompt:?}");
            // The features are what the answer reads: another image's give another answer.
            let other = run(&model, one, prompt, Some(std::slice::from_ref(&fab[1])));
            assert_ne!(answers(&other), answers(&want), "{name} {prompt:?}");
            assert_eq!(answers(&other), answers(&run(&model, std::slice::from_ref(&b), prompt, None)), "{name}");
        }
        if model.chat.is_some() {
            // Two images in one chat prompt.
            let q = Prompt::Question("compare them");
            assert_eq!(answers(&run(&model, &two, q, Some(&mixed))), answers(&run(&model, &two, q, None)), "{name}");
        }
        // A batch of two questions (left-padded on BLIP-2), features from different batches.
        let questions = ["what is in the picture?", "and the colour?"];
        let per_image = Prompt::PerImage(&questions);
        let want = run(&model, &two, per_image, None);
        assert_eq!(answers(&run(&model, &two, per_image, Some(&mixed))), answers(&want), "{name} per image");
    }
}

#[test]
fn beam_search_and_sampling_from_features_equal_them_from_pixels() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let img = [pixels(&model, "photo_q90.jpg")];
    let feats = model.encode_images(&img).unwrap();
    let base = GenerateOptions { max_new_tokens: Some(6), ..model.default_options() };
    let beams = GenerateOptions { num_beams: 3, num_return_sequences: 2, ..base.clone() };
    let sampled = GenerateOptions { do_sample: true, seed: Some(7), num_return_sequences: 2, ..base };
    for opts in [beams, sampled] {
        let q = Prompt::Question("what is it?");
        let want = run_with(&model, &img, q, None, &opts);
        assert_eq!(answers(&run_with(&model, &img, q, Some(&feats), &opts)), answers(&want), "{opts:?}");
    }
}

#[test]
fn features_that_do_not_fit_the_request_are_errors() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let img = [pixels(&model, "photo_q90.jpg")];
    let opts = model.default_options();
    let two = model.encode_images(&[img[0].clone(), img[0].clone()]).unwrap();
    let request = Request { features: Some(&two), ..Request::new(&img, Prompt::Caption, &opts) };
    let err = model.generate(&request, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("1 images but features of 2"), "{err}");
    // Features of another model (LLaVA's are wider) do not fit this plan.
    let llava = Model::load(common::model_dir("llava-tiny"), Device::Cpu).unwrap();
    let other = llava.encode_images(&[pixels(&llava, "photo_q90.jpg")]).unwrap();
    let request = Request { features: Some(&other), ..Request::new(&img, Prompt::Caption, &opts) };
    let err = model.generate(&request, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("image feature values given"), "{err}");
    assert!(model.encode_images(&[]).unwrap().is_empty());
}
