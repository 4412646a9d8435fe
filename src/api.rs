//! The library's front door: load a model folder once, then caption images, answer questions
//! or run raw prompts. A [`Model`] is `Send + Sync`; each request gets its own executor state.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use crate::backend::Device;
use crate::backend::{Backend, Executor};
use crate::config::{GenerationConfig, PreprocessorConfig};
use crate::error::{Error, Result};
use crate::generate::{
    beam_rows, expand_for_beams, generate_prompts, GenerateOptions, GenerationOverrides, Plan, PlanShape, Prompts,
    Sequence, Timings, TokenEvent,
};
use crate::image::{ImageInput, ImageProcessor, PixelValues};
use crate::models::ModelConfig;
use crate::models::{Family, PromptText};
use crate::tokenizer::Tokenizer;
use crate::weights::Checkpoint;

/// What one image's request produced.
#[derive(Debug, Clone)]
pub struct Output {
    pub text: String,
    /// Generated ids, EOS included when produced.
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f64>,
    /// Beam search: transformers' `sequences_scores` of this hypothesis (None for greedy).
    pub score: Option<f64>,
    /// Beam search with `num_return_sequences > 1`: the other returned hypotheses, best first.
    pub alternatives: Vec<Hypothesis>,
    pub timings: Timings,
    pub device: String,
}

/// A further hypothesis of a beam search.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub text: String,
    pub tokens: Vec<u32>,
    pub score: Option<f64>,
}

/// Decoder input ids of a rendered chat prompt `text`: image placeholders expanded for
/// `family`'s image size (or, for a family whose expansion depends on the image, for each of
/// `images` in order), tokenized as the processor does (special tokens added unless the text
/// already starts with BOS, as apply_chat_template).
pub fn chat_prompt_ids(
    chat: &crate::chat::ChatProcessor,
    tokenizer: &Tokenizer,
    family: &dyn Family,
    text: &str,
    images: &[PixelValues],
) -> Result<Vec<u32>> {
    let size = family.image_size();
    let expanded = match family.expand_image_prompt(text, images)? {
        Some(expanded) => expanded,
        None => chat.expand(text, chat.tokens_per_image(size, size)?),
    };
    let ids = if chat.bos_token().is_some_and(|b| expanded.starts_with(b)) {
        tokenizer.encode_plain(&expanded)?
    } else {
        tokenizer.encode(&expanded)?
    };
    Ok(family.input_ids(&ids))
}

/// A model folder loaded for inference (any family of the registry in `models`).
pub struct Model {
    pub dir: PathBuf,
    /// The loaded family: plans, prompt template, defaults, description.
    pub family: Box<dyn Family>,
    pub tokenizer: Tokenizer,
    pub image_processor: ImageProcessor,
    pub generation: GenerationConfig,
    /// Chat template and image-token expansion, for chat families (LLaVA).
    pub chat: Option<crate::chat::ChatProcessor>,
    /// Seconds spent loading (config, memory map, weight table, tokenizer, GPU upload).
    pub load_seconds: f64,
    backend: Backend,
    /// GPU requests run one at a time on the device; the last plan and its executor (buffers,
    /// recorded decode graph) are kept for the next request of the same shape.
    gpu: Mutex<Option<CachedRun>>,
}

/// A built plan with its executor, kept for the next request of the same shape.
type CachedRun = (PlanShape, Plan, Box<dyn Executor>);

/// What a [`Request`] asks of the model's text side.
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    /// A caption (chat families: the caption instruction through the chat template).
    Caption,
    /// One question about the request's images: the family's question template (one image), or
    /// for chat families one user message holding every image, then the question.
    Question(&'a str),
    /// One question per image, run as one batch (left-padded prompts; chat families batch each
    /// stretch of equal consecutive questions).
    PerImage(&'a [&'a str]),
    /// A prompt as the model's processor takes it, without a template (None: no prompt).
    Raw(Option<&'a str>),
}

/// One generation request: preprocessed images, what to ask and how to generate
/// ([`Model::generate`]).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub images: &'a [PixelValues],
    pub prompt: Prompt<'a>,
    pub options: &'a GenerateOptions,
    /// The images' features computed earlier by [`Model::encode_images`], one per image in
    /// order (an image cache): the family's image stage is then not run and the pixels are not
    /// read. None: computed from the pixels. The answer is the same either way (on the CPU, to
    /// the bit: an image's features do not depend on the batch it was computed in).
    pub features: Option<&'a [ImageFeatures]>,
}

impl<'a> Request<'a> {
    /// A request computing its image features from the pixels.
    pub fn new(images: &'a [PixelValues], prompt: Prompt<'a>, options: &'a GenerateOptions) -> Self {
        Self { images, prompt, options, features: None }
    }
}

/// One image's output of its family's image stage ([`crate::generate::ImageStage`]): what the
/// model computes from the pixels alone before anything reads the prompt (BLIP-2: the projected
/// Q-Former queries; LLaVA: the projected patch features; InstructBLIP: the vision tower's
/// output). From [`Model::encode_images`], for [`Request::features`]; cheap to clone.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFeatures(Arc<[f32]>);

impl ImageFeatures {
    pub fn values(&self) -> &[f32] {
        &self.0
    }

    /// Bytes its values take (f32).
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.0)
    }
}

impl From<Vec<f32>> for ImageFeatures {
    fn from(values: Vec<f32>) -> Self {
        Self(values.into())
    }
}

/// A request's images inside [`Model::generate`]: the pixels, and their features when the
/// request brings them.
#[derive(Clone, Copy)]
struct Images<'a> {
    pixels: &'a [PixelValues],
    features: Option<&'a [ImageFeatures]>,
}

impl<'a> Images<'a> {
    fn pixels(pixels: &'a [PixelValues]) -> Self {
        Self { pixels, features: None }
    }

    fn len(&self) -> usize {
        self.pixels.len()
    }

    /// Frames over all images: what the family's vision tower runs on (one per image except
    /// for image-splitting families).
    fn frames(&self) -> usize {
        self.pixels.iter().map(PixelValues::frames).sum()
    }

    fn range(&self, r: std::ops::Range<usize>) -> Self {
        Self { pixels: &self.pixels[r.clone()], features: self.features.map(|f| &f[r]) }
    }
}

/// The pixel values of `images` (every frame of each), one after another, each checked to be
/// the `size` x `size` the vision tower takes.
fn stack_pixels(images: &[PixelValues], size: usize) -> Result<Vec<f32>> {
    let mut pixels = Vec::with_capacity(images.iter().map(|i| i.data.len()).sum());
    for img in images {
        if (img.height, img.width) != (size, size) {
            return Err(Error::InvalidInput(format!(
                "pixel values are {}x{}, the vision model takes {size}x{size}",
                img.height, img.width
            )));
        }
        pixels.extend_from_slice(&img.data);
    }
    Ok(pixels)
}

/// The features of a request's images, one after another (each of one length).
fn stack_features(features: &[ImageFeatures], images: &[PixelValues]) -> Result<Vec<f32>> {
    // Features per frame: a split image's features hold one block per frame.
    let frames: Vec<usize> = images.iter().map(PixelValues::frames).collect();
    let per_frame = |i: usize| features[i].values().len() / frames.get(i).copied().unwrap_or(1).max(1);
    let len = if features.is_empty() { 0 } else { per_frame(0) };
    if (0..features.len()).any(|i| {
        per_frame(i) != len || per_frame(i) * frames.get(i).copied().unwrap_or(1) != features[i].values().len()
    }) {
        return Err(Error::InvalidInput(
            "the request's image features differ in size: compute them with this model's encode_images".into(),
        ));
    }
    Ok(features.iter().flat_map(|f| f.values().iter().copied()).collect())
}

/// A model folder's config.json, parsed and checked, and its safetensors, opened.
fn open_model_dir(dir: &Path) -> Result<(ModelConfig, Checkpoint)> {
    if !dir.is_dir() {
        return Err(Error::MissingFile { path: dir.to_path_buf(), hint: " (expected a model folder)".into() });
    }
    Ok((ModelConfig::load(&dir.join("config.json"))?, Checkpoint::open_dir(dir)?))
}

/// How [`Model::load_with`] loads a model ([`Model::load`]: the defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Quantize the language decoder's Linear weights at load (weight-only int8 or int4, see
    /// [`crate::quant`]); None keeps every weight fp16. CPU executor only for now.
    pub quantize: Option<crate::quant::Quantize>,
}

impl Model {
    /// Loads an HF model folder (`config.json`, safetensors, tokenizer, preprocessor config).
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        Self::load_with(dir, device, LoadOptions::default())
    }

    /// [`Model::load`] with options (quantization at load).
    pub fn load_with(dir: impl AsRef<Path>, device: Device, options: LoadOptions) -> Result<Self> {
        let start = Instant::now();
        let dir = dir.as_ref();
        let (cfg, ckpt) = open_model_dir(dir)?;
        let mut family = crate::models::load(&cfg, &ckpt)?;
        if let Some(format) = options.quantize {
            crate::backend::check_quantized_device(device, format)?;
            crate::models::quantize::quantize_family(family.as_mut(), format)?;
        }
        let tokenizer = Tokenizer::from_dir(dir)?;
        family.bind_tokenizer(&tokenizer)?;
        let image_processor = family.image_processor(dir)?;
        let generation_path = dir.join("generation_config.json");
        let generation = GenerationConfig::load_or_default(&generation_path)?;
        cfg.family().check_generation_config(&generation, &generation_path)?;
        let chat = if family.chat() { Some(crate::chat::ChatProcessor::load_from_dir(dir)?) } else { None };
        let backend = Backend::new(device, family.weights())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            family,
            tokenizer,
            image_processor,
            generation,
            chat,
            load_seconds: start.elapsed().as_secs_f64(),
            backend,
            gpu: Mutex::new(None),
        })
    }

    /// Default generation settings, as transformers 5.17's `generate()` resolves them for this
    /// family (BLIP-2: EOS and length from `text_config`, not generation_config.json).
    pub fn default_options(&self) -> GenerateOptions {
        let mut o = self.family.default_options();
        // Chat families (LLaVA) generate with their generation_config.json when it is there
        // (eos 2), and then the generation fields config.json's text_config keeps
        // (max_new_tokens, min_new_tokens, min_p) do not apply; without the file, transformers
        // builds the generation config from config.json, text_config's fields included.
        if self.chat.is_some() && self.generation.from_file {
            o = GenerateOptions { eos_token_ids: o.eos_token_ids, ..GenerateOptions::default() };
            GenerationOverrides::from_generation_config(&self.generation).apply(&mut o);
        }
        o
    }

    /// [`Model::default_options`] with `overrides` applied, validated: the settings a request
    /// runs with (the CLI's flags and Python's keyword arguments both come through here).
    pub fn options(&self, overrides: &GenerationOverrides) -> Result<GenerateOptions> {
        let mut o = self.default_options();
        overrides.apply(&mut o);
        o.validate()?;
        o.check_available()?;
        Ok(o)
    }

    /// The family's question template applied to `question` (BLIP-2: `"Question: {q} Answer:"`).
    pub fn question_prompt(&self, question: &str) -> String {
        self.family.question_prompt(question)
    }

    /// Decoder input ids for a text prompt (`None`: captioning, the tokenizer's BOS only). For
    /// chat families the prompt is raw text whose image placeholders are expanded (`None`: the
    /// caption instruction through the chat template with one image).
    pub fn input_ids(&self, prompt: Option<&str>) -> Result<Vec<u32>> {
        self.prompt_ids(prompt, &[])
    }

    /// [`Model::input_ids`] for a request's `images`, which a family that expands each image
    /// by its own size (SmolVLM's tile grids) needs; the others ignore them.
    pub fn input_ids_for(&self, prompt: Option<&str>, images: &[PixelValues]) -> Result<Vec<u32>> {
        self.prompt_ids(prompt, images)
    }

    fn prompt_ids(&self, prompt: Option<&str>, images: &[PixelValues]) -> Result<Vec<u32>> {
        let text = prompt.map_or(PromptText::Caption, PromptText::Raw);
        let shown = if prompt.is_none() { 1 } else { images.len().max(1) };
        if let Some(text) = self.family.processor_prompt(text, shown) {
            return self.tokenizer.encode_plain(&text?);
        }
        if let Some(chat) = &self.chat {
            let text = match prompt {
                Some(p) => p.to_string(),
                None => chat.user_prompt(1, crate::chat::CAPTION_INSTRUCTION)?,
            };
            return self.chat_ids(chat, &text, images);
        }
        let ids = self.tokenizer.encode(prompt.unwrap_or(""))?;
        Ok(self.family.input_ids(&ids))
    }

    /// Whether the family's processor builds the whole prompt around any number of images
    /// (IDEFICS), as chat templates do for chat families.
    pub fn interleaves_images(&self) -> bool {
        self.family.processor_prompt(PromptText::Caption, 1).is_some()
    }

    /// Decoder input ids of `question` about `images` images as [`Prompt::Question`] builds
    /// them for a family without a chat template: its question template, or the prompt its
    /// processor builds around the images (IDEFICS).
    pub fn question_ids(&self, question: &str, images: usize) -> Result<Vec<u32>> {
        match self.family.processor_prompt(PromptText::Question(question), images) {
            Some(text) => self.tokenizer.encode_plain(&text?),
            None => self.input_ids(Some(&self.question_prompt(question))),
        }
    }

    /// Decoder input ids of a chat request: `images` images then `text` in one user message.
    pub fn chat_input_ids(&self, images: usize, text: &str) -> Result<Vec<u32>> {
        let chat = self.chat.as_ref().ok_or_else(|| {
            Error::InvalidInput("this model has no chat template: ask about one image at a time".into())
        })?;
        self.chat_ids(chat, &chat.user_prompt(images, text)?, &[])
    }

    /// Expands image placeholders for the model's image size and tokenizes as the processor does
    /// (special tokens added unless the text already starts with BOS, as apply_chat_template).
    fn chat_ids(&self, chat: &crate::chat::ChatProcessor, text: &str, images: &[PixelValues]) -> Result<Vec<u32>> {
        chat_prompt_ids(chat, &self.tokenizer, self.family.as_ref(), text, images)
    }

    pub fn preprocess(&self, image: &Path) -> Result<PixelValues> {
        self.image_processor.preprocess_file(image)
    }

    /// Pixel values of a file, encoded bytes or decoded pixels (the same pixels for each).
    pub fn preprocess_input(&self, image: &ImageInput<'_>) -> Result<PixelValues> {
        self.image_processor.preprocess_input(image)
    }

    /// The one entry point: runs `request` and returns one output per decoder sequence (per
    /// image, or one for a chat prompt holding every image); `on_token` sees each token as it is
    /// produced. The methods below are conveniences over it.
    pub fn generate(&self, request: &Request<'_>, on_token: &mut dyn FnMut(&TokenEvent)) -> Result<Vec<Output>> {
        let opts = request.options;
        opts.validate()?;
        if let Some(f) = request.features.filter(|f| f.len() != request.images.len()) {
            return Err(Error::InvalidInput(format!(
                "the request has {} images but features of {}: give one ImageFeatures per image",
                request.images.len(),
                f.len()
            )));
        }
        let images = Images { pixels: request.images, features: request.features };
        let processor_text = match request.prompt {
            Prompt::Caption | Prompt::Raw(None) => Some(PromptText::Caption),
            Prompt::Question(q) => Some(PromptText::Question(q)),
            Prompt::Raw(Some(p)) => Some(PromptText::Raw(p)),
            Prompt::PerImage(_) => None,
        };
        // Families whose processor builds the whole prompt (IDEFICS): a caption is each image
        // alone, one sequence per image; a question or raw text holds every image.
        let shown = if processor_text == Some(PromptText::Caption) { 1 } else { images.len() };
        if let Some(text) = processor_text.and_then(|p| self.family.processor_prompt(p, shown)) {
            let ids = self.tokenizer.encode_plain(&text?)?;
            return self.outputs(self.run_image_ids(images, &ids, opts, on_token)?);
        }
        match request.prompt {
            // Chat families caption through their chat template with the caption instruction.
            Prompt::Caption if self.chat.is_some() => self.generate(
                &Request { prompt: Prompt::Question(crate::chat::CAPTION_INSTRUCTION), ..*request },
                on_token,
            ),
            Prompt::Caption => self.run_text(images, None, opts, on_token),
            Prompt::Question(question) => match &self.chat {
                None if images.len() != 1 => Err(one_image_only(images.len())),
                None => self.run_text(images, Some(&self.question_prompt(question)), opts, on_token),
                Some(chat) => {
                    let ids = self.chat_ids(chat, &chat.user_prompt(images.len(), question)?, images.pixels)?;
                    self.outputs(self.run_image_ids(images, &ids, opts, on_token)?)
                }
            },
            Prompt::PerImage(questions) => self.run_per_image(images, questions, opts, on_token),
            Prompt::Raw(prompt) => self.run_text(images, prompt, opts, on_token),
        }
    }

    /// Captions an image file.
    pub fn caption(&self, image: &Path, opts: &GenerateOptions) -> Result<Output> {
        opts.validate()?;
        self.caption_pixels(&self.preprocess(image)?, opts, &mut |_| {})
    }

    /// Captions a preprocessed image; `on_token` sees each token as it is produced.
    pub fn caption_pixels(
        &self,
        pixels: &PixelValues,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Output> {
        let request = Request::new(std::slice::from_ref(pixels), Prompt::Caption, opts);
        self.generate(&request, on_token).map(|mut v| v.remove(0))
    }

    /// Answers a question about an image with the family's question template.
    pub fn ask(&self, image: &Path, question: &str, opts: &GenerateOptions) -> Result<Output> {
        opts.validate()?;
        self.ask_pixels(&[self.preprocess(image)?], question, opts, &mut |_| {})
    }

    /// [`Model::ask_images`] on preprocessed images: chat families put every image in one user
    /// message; other families take exactly one image and the family's question template.
    pub fn ask_pixels(
        &self,
        pixels: &[PixelValues],
        question: &str,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Output> {
        let request = Request::new(pixels, Prompt::Question(question), opts);
        self.generate(&request, on_token).map(|mut v| v.remove(0))
    }

    /// Asks one question about several images (chat families: one user message holding every
    /// image, then the question; a single image on other families).
    pub fn ask_images(&self, images: &[&Path], question: &str, opts: &GenerateOptions) -> Result<Output> {
        opts.validate()?;
        let several = self.chat.is_some() || self.interleaves_images();
        if !several && images.len() != 1 {
            // Refused before any image is read: the count alone decides it.
            return Err(one_image_only(images.len()));
        }
        let pixels = images.iter().map(|p| self.preprocess(p)).collect::<Result<Vec<_>>>()?;
        self.ask_pixels(&pixels, question, opts, &mut |_| {})
    }

    /// Asks a different question about each image, in one batch: the prompts run left-padded
    /// to the longest (transformers' `padding_side="left"` with the tokenizer's pad token), so
    /// each answer is the one its question gets alone. One image per question; not for chat
    /// families.
    pub fn ask_batch(&self, images: &[&Path], questions: &[&str], opts: &GenerateOptions) -> Result<Vec<Output>> {
        opts.validate()?;
        if self.chat.is_some() {
            return Err(Error::Unsupported(
                "ask_batch runs one question per image on non-chat families (BLIP-2); for a chat model, ask each question with ask_images".into(),
            ));
        }
        check_per_image(images.len(), questions.len())?;
        let pixels = images.iter().map(|p| self.preprocess(p)).collect::<Result<Vec<_>>>()?;
        self.ask_batch_pixels(&pixels, questions, opts)
    }

    /// [`Model::ask_batch`] on preprocessed images, one question each. Chat families run each
    /// stretch of equal consecutive questions as one batch (their prompts are never padded).
    pub fn ask_batch_pixels(
        &self,
        pixels: &[PixelValues],
        questions: &[&str],
        opts: &GenerateOptions,
    ) -> Result<Vec<Output>> {
        self.generate(&Request::new(pixels, Prompt::PerImage(questions), opts), &mut |_| {})
    }

    /// Runs preprocessed images as one batch with one raw prompt (no template); `on_token` sees
    /// each token as it is produced.
    pub fn run(
        &self,
        images: &[PixelValues],
        prompt: Option<&str>,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Vec<Output>> {
        self.generate(&Request::new(images, Prompt::Raw(prompt), opts), on_token)
    }

    /// [`Prompt::PerImage`]: one question per image (see [`Model::ask_batch_pixels`]).
    fn run_per_image(
        &self,
        pixels: Images<'_>,
        questions: &[&str],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Vec<Output>> {
        check_per_image(pixels.len(), questions.len())?;
        if self.interleaves_images() {
            // A processor-built prompt per image: each image with its question, in order.
            let mut out = Vec::with_capacity(pixels.len());
            for (i, question) in questions.iter().enumerate() {
                let one = Images { pixels: &pixels.pixels[i..i + 1], features: pixels.features.map(|f| &f[i..i + 1]) };
                let request = Request {
                    images: one.pixels,
                    prompt: Prompt::Question(question),
                    options: opts,
                    features: one.features,
                };
                out.extend(self.generate(&request, &mut offset_events(on_token, i))?);
            }
            return Ok(out);
        }
        if let Some(chat) = &self.chat {
            let mut out = Vec::with_capacity(pixels.len());
            let mut start = 0;
            while start < questions.len() {
                // Equal questions share one prompt, unless each image expands to its own.
                let split = pixels.pixels.iter().any(|p| p.tiles.is_some());
                let same = questions[start..].iter().take_while(|q| **q == questions[start]).count();
                let end = start + if split { 1 } else { same };
                let first = &pixels.pixels[start..start + 1];
                let ids = self.chat_ids(chat, &chat.user_prompt(1, questions[start])?, first)?;
                let mut shifted = offset_events(on_token, start);
                out.extend(self.outputs(self.run_image_ids(pixels.range(start..end), &ids, opts, &mut shifted)?)?);
                start = end;
            }
            return Ok(out);
        }
        let pad_id = self.tokenizer.pad_token_id().ok_or_else(|| {
            Error::InvalidInput(format!(
                "the tokenizer in {} has no pad_token, needed to batch questions of different lengths: set pad_token in tokenizer_config.json or ask one question at a time",
                self.dir.display()
            ))
        })?;
        let texts: Vec<String> = questions.iter().map(|q| self.question_prompt(q)).collect();
        let ids = texts.iter().map(|t| self.input_ids(Some(t))).collect::<Result<Vec<_>>>()?;
        let prompts = Prompts::left_padded(&ids, pad_id)?;
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        self.outputs(self.run_request(pixels, &prompts, &texts, opts, on_token)?)
    }

    /// [`Prompt::Raw`] and the non-chat templates: the images as one batch with one prompt text,
    /// which the encoders read too where the family does (InstructBLIP's Q-Former).
    fn run_text(
        &self,
        images: Images<'_>,
        prompt: Option<&str>,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Vec<Output>> {
        // Images that expand to prompts of their own (SmolVLM's tile grids) under a one-image
        // prompt: one sequence each, as transformers' processor gives each its own text.
        let per_image = self.chat.as_ref().is_some_and(|chat| {
            images.len() > 1
                && images.pixels.iter().any(|p| p.tiles.is_some())
                && prompt.is_none_or(|p| p.matches(chat.image_token.as_str()).count() == 1)
        });
        if per_image {
            let mut out = Vec::with_capacity(images.len());
            for i in 0..images.len() {
                out.extend(self.run_text(images.range(i..i + 1), prompt, opts, &mut offset_events(on_token, i))?);
            }
            return Ok(out);
        }
        let input_ids = self.prompt_ids(prompt, images.pixels)?;
        let sequences = self.family.sequences_for(images.frames(), &input_ids)?;
        let texts = vec![prompt.unwrap_or(""); sequences];
        let prompts = Prompts::shared(&input_ids, sequences);
        self.outputs(self.run_request(images, &prompts, &texts, opts, on_token)?)
    }

    /// Every sequence of a run as the caller sees it ([`Model::output`]).
    fn outputs(&self, (seqs, timings, device): (Vec<Sequence>, Timings, String)) -> Result<Vec<Output>> {
        seqs.into_iter().map(|s| self.output(s, &timings, &device)).collect()
    }

    /// One generated sequence as the caller sees it: decoded text, ids, log-probs, beam score
    /// and the other returned hypotheses.
    fn output(&self, s: Sequence, timings: &Timings, device: &str) -> Result<Output> {
        let alternatives = s
            .alternatives
            .iter()
            .map(|a| {
                Ok(Hypothesis {
                    text: self.tokenizer.decode_text(&a.tokens)?,
                    tokens: a.tokens.clone(),
                    score: a.score,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Output {
            text: self.tokenizer.decode_text(&s.tokens)?,
            tokens: s.tokens,
            logprobs: s.logprobs,
            score: s.score,
            alternatives,
            timings: timings.clone(),
            device: device.to_string(),
        })
    }

    /// The core request: pixel values and decoder input ids in, one sequence per image out. Beam
    /// search runs each image `num_beams` times through the encoders (the plan's batch is
    /// images x beams; the encoders' rows are independent, so each copy is the same).
    pub fn run_ids(
        &self,
        images: &[PixelValues],
        input_ids: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<(Vec<Sequence>, Timings, String)> {
        self.run_image_ids(Images::pixels(images), input_ids, opts, on_token)
    }

    /// [`Model::run_ids`] on a request's images.
    fn run_image_ids(
        &self,
        images: Images<'_>,
        input_ids: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<(Vec<Sequence>, Timings, String)> {
        let sequences = self.family.sequences_for(images.frames(), input_ids)?;
        self.run_request(images, &Prompts::shared(input_ids, sequences), &[], opts, on_token)
    }

    /// [`Model::run_ids`] with a decoder input per sequence (left-padded to one length).
    pub fn run_prompts(
        &self,
        images: &[PixelValues],
        prompts: &Prompts,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<(Vec<Sequence>, Timings, String)> {
        self.run_request(Images::pixels(images), prompts, &[], opts, on_token)
    }

    /// [`Model::run_prompts`] with each sequence's prompt text for families whose encoders read
    /// it ([`Family::text_inputs`]; empty: token ids only).
    fn run_request(
        &self,
        images: Images<'_>,
        prompts: &Prompts,
        texts: &[&str],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<(Vec<Sequence>, Timings, String)> {
        // The pixels, or the image stage's features in their place.
        let (image_input, image_data) = match images.features {
            None => ("pixels", stack_pixels(images.pixels, self.family.image_size())?),
            Some(features) => (crate::generate::IMAGE_FEATURES, stack_features(features, images.pixels)?),
        };
        opts.check_available()?;
        let new_tokens = opts.new_tokens(prompts.len(), self.family.max_positions())?;
        let sequences = prompts.batch();
        // Beam search: each sequence's images repeated per beam, as one block (all of a chat
        // prompt's images stay together), and its prompt with them.
        let image_data = expand_for_beams(&image_data, sequences, opts);
        let prompts = prompts.repeat_each(opts.expansion());
        let text = self.family.text_inputs(texts)?;
        let text_data: Vec<(&str, Vec<f32>)> = text
            .iter()
            .flat_map(|t| t.inputs.iter().map(|(name, data)| (*name, expand_for_beams(data, sequences, opts))))
            .collect();
        let inputs: Vec<(&str, &[f32])> = std::iter::once((image_input, image_data.as_slice()))
            .chain(text_data.iter().map(|(n, d)| (*n, d.as_slice())))
            .collect();
        let text_rows = text.as_ref().map_or(0, |t| t.rows);
        // Stop strings are matched on this tokenizer's token strings.
        let stop = match opts.stop_strings.is_empty() {
            true => None,
            false => Some(crate::generate::StopStrings::new(&opts.stop_strings, &self.tokenizer)?),
        };
        let mut hooks = crate::generate::Hooks { on_token, on_phase: None };
        let key = PlanShape {
            images: beam_rows(images.frames(), opts),
            sequences: beam_rows(sequences, opts),
            prompt_len: prompts.len(),
            max_new_tokens: new_tokens,
            text_rows,
            all_prefill_logits: false,
        };
        if !self.backend.is_cuda() {
            // CPU requests run in parallel, each with its own buffers.
            let plan = self.family.plan_for(&key)?;
            let mut exec = self.backend.executor(self.family.weights(), &plan.graph)?;
            let (seqs, timings) =
                generate_prompts(&plan, exec.as_mut(), &inputs, &prompts, opts, stop.as_ref(), &mut hooks)?;
            return Ok((seqs, timings, exec.device_name()));
        }
        let mut slot = self.gpu.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|(k, _, _)| *k != key) {
            *slot = None; // free the old buffers before allocating new ones
            let plan = self.family.plan_for(&key)?;
            let exec = self.backend.executor(self.family.weights(), &plan.graph)?;
            *slot = Some((key, plan, exec));
        }
        let (_, plan, exec) = slot.as_mut().expect("filled above");
        let (seqs, timings) =
            generate_prompts(plan, exec.as_mut(), &inputs, &prompts, opts, stop.as_ref(), &mut hooks)?;
        Ok((seqs, timings, exec.device_name()))
    }

    /// Each image's output of the family's image stage (what it computes from the pixels alone,
    /// [`ImageFeatures`]), computed as one batch: give them back in [`Request::features`] to
    /// answer about the same image again without running that stage (an image cache). An
    /// error for a family without an image stage.
    pub fn encode_images(&self, images: &[PixelValues]) -> Result<Vec<ImageFeatures>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pixels = stack_pixels(images, self.family.image_size())?;
        let frames: usize = images.iter().map(PixelValues::frames).sum();
        let plan = self
            .family
            .image_plan(frames)?
            .ok_or_else(|| Error::Unsupported("this model has no image stage to compute image features with".into()))?;
        let run = |exec: &mut dyn Executor| -> Result<Vec<f32>> {
            exec.write(plan.pixels, &pixels)?;
            exec.set_left_padding(&[]);
            exec.set_position(0);
            for phase in &plan.phases {
                exec.run(phase)?;
            }
            exec.read(plan.features, frames * plan.rows_per_image)
        };
        let data = if self.backend.is_cuda() {
            // One request at a time on the device, as generate.
            let _device = self.gpu.lock().unwrap_or_else(|p| p.into_inner());
            run(self.backend.executor(self.family.weights(), &plan.graph)?.as_mut())?
        } else {
            run(self.backend.executor(self.family.weights(), &plan.graph)?.as_mut())?
        };
        // Each image's block: its frames' rows.
        let per_frame = data.len() / frames.max(1);
        let mut rest = data.as_slice();
        Ok(images
            .iter()
            .map(|img| {
                let (mine, tail) = rest.split_at(per_frame * img.frames());
                rest = tail;
                ImageFeatures(mine.into())
            })
            .collect())
    }

    /// An executor for `graph` on this model's backend (for stage-by-stage use and tests).
    pub fn executor(&self, graph: &crate::graph::Graph) -> Result<Box<dyn Executor>> {
        self.backend.executor(self.family.weights(), graph)
    }

    /// The backend this model runs on ("cpu" or "cuda:<name>").
    pub fn backend_name(&self) -> String {
        self.backend.name()
    }
}

/// `on_token` for a run over inputs `first..` of a larger request: each event's sequence
/// counted from the request's first input (a request split into several runs streams as one).
fn offset_events<'a>(on_token: &'a mut dyn FnMut(&TokenEvent), first: usize) -> impl FnMut(&TokenEvent) + 'a {
    move |ev: &TokenEvent| on_token(&TokenEvent { sequence: ev.sequence + first, ..*ev })
}

/// The error of a question about several images on a family that takes one.
/// `ask_batch`'s shape: one question per image, at least one.
fn check_per_image(images: usize, questions: usize) -> Result<()> {
    if images != questions || images == 0 {
        return Err(Error::InvalidInput(format!(
            "ask_batch takes one question per image; got {images} images and {questions} questions"
        )));
    }
    Ok(())
}

fn one_image_only(images: usize) -> Error {
    Error::InvalidInput(format!(
        "this model answers about one image at a time; got {images} images (several images need a chat model such as LLaVA)"
    ))
}

/// A model folder that embeds images and texts (CLIP: `CLIPModel`, `CLIPTextModelWithProjection`,
/// `CLIPVisionModelWithProjection`), loaded once for any number of requests.
///
/// Features are the projected pooled outputs (`get_image_features` / `get_text_features`
/// `.pooler_output`); embeddings are their unit vectors (`CLIPModel`'s `image_embeds`), L2
/// normalised on the device (`Op::L2Normalize`, fp32 out). `exp(logit_scale)`, similarities and
/// softmax run on the host in f64 (inputs and results f32): a few hundred values per input.
pub struct EmbedModel {
    pub dir: PathBuf,
    pub family: Box<dyn crate::models::Embedder>,
    /// Present when the model has a text tower.
    pub tokenizer: Option<Tokenizer>,
    /// Present when the model has a vision tower.
    pub image_processor: Option<ImageProcessor>,
    pub load_seconds: f64,
    backend: Backend,
}

impl EmbedModel {
    /// Loads a CLIP folder: config.json, safetensors, and the tokenizer / image processor of the
    /// towers it has. A generating model (BLIP-2) is an error that names `caption` and `ask`.
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let start = Instant::now();
        let dir = dir.as_ref();
        let (cfg, ckpt) = open_model_dir(dir)?;
        let family = crate::models::load_embedder(&cfg, &ckpt)?;
        let tokenizer = match family.text_positions() {
            Some(_) => Some(Tokenizer::from_dir(dir)?),
            None => None,
        };
        let image_processor = match family.image_size() {
            Some(_) => {
                let (pre, pre_path) = PreprocessorConfig::load_from_dir(dir)?;
                family.check_preprocessor(&pre, &pre_path)?;
                Some(ImageProcessor::new(pre))
            }
            None => None,
        };
        let backend = Backend::new(device, &family.core().weights)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            family,
            tokenizer,
            image_processor,
            load_seconds: start.elapsed().as_secs_f64(),
            backend,
        })
    }

    /// The backend this model runs on ("cpu" or "cuda:<name>").
    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// An executor for `graph` on this model's backend (for tests).
    pub fn executor(&self, graph: &crate::graph::Graph) -> Result<Box<dyn Executor>> {
        self.backend.executor(&self.family.core().weights, graph)
    }

    pub fn preprocess(&self, image: &Path) -> Result<PixelValues> {
        self.processor()?.preprocess_file(image)
    }

    /// Pixel values of a file, encoded bytes or decoded pixels (the same pixels for each).
    pub fn preprocess_input(&self, image: &ImageInput<'_>) -> Result<PixelValues> {
        self.processor()?.preprocess_input(image)
    }

    fn processor(&self) -> Result<&ImageProcessor> {
        self.image_processor.as_ref().ok_or_else(|| {
            Error::InvalidInput(format!("{} has no vision tower: it embeds texts only", self.dir.display()))
        })
    }

    /// Token ids of `text` as `CLIPProcessor(text=...)` gives them (`<|startoftext|>`, the text,
    /// `<|endoftext|>`; lower-cased, no truncation). A text longer than the model's positions is
    /// an error, as transformers' model raises for it.
    pub fn text_ids(&self, text: &str) -> Result<Vec<u32>> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            Error::InvalidInput(format!("{} has no text tower: it embeds images only", self.dir.display()))
        })?;
        let ids = tok.encode(text)?;
        let max = self.family.text_positions().unwrap_or(0);
        if ids.len() > max {
            return Err(Error::InvalidInput(format!(
                "the text is {} tokens, the text model takes at most {max} (max_position_embeddings; transformers raises too, CLIPProcessor does not truncate): shorten it",
                ids.len()
            )));
        }
        Ok(ids)
    }

    /// Projected, un-normalized embeddings of preprocessed images, run as one batch.
    pub fn image_features(&self, images: &[PixelValues]) -> Result<Vec<Vec<f32>>> {
        self.run_images(images, EmbedOutput::Features)
    }

    fn run_images(&self, images: &[PixelValues], which: EmbedOutput) -> Result<Vec<Vec<f32>>> {
        let pixels = stack_pixels(images, self.family.image_size().unwrap_or(0))?;
        let plan = self.family.image_plan(images.len())?;
        let mut exec = self.executor(&plan.graph)?;
        exec.write(input(&plan, "pixels")?, &pixels)?;
        self.finish(&plan, exec.as_mut(), which)
    }

    /// Projected, un-normalized embeddings of token id sequences (each as [`EmbedModel::text_ids`]
    /// gives them), run as one batch padded to the longest with the pad token and masked, as
    /// `CLIPProcessor(padding=True)` feeds the model.
    pub fn text_id_features(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.run_texts(ids, EmbedOutput::Features)
    }

    fn run_texts(&self, ids: &[Vec<u32>], which: EmbedOutput) -> Result<Vec<Vec<f32>>> {
        let len = ids.iter().map(Vec::len).max().unwrap_or(0);
        let pad = self.tokenizer.as_ref().and_then(Tokenizer::pad_token_id).unwrap_or(0);
        let padded: Vec<Vec<u32>> =
            ids.iter().map(|s| s.iter().copied().chain(std::iter::repeat(pad)).take(len).collect()).collect();
        let mask: Vec<f32> =
            ids.iter().flat_map(|s| (0..len).map(move |j| if j < s.len() { 0.0 } else { f32::MIN })).collect();
        let plan = self.family.text_plan(ids.len(), len)?;
        let mut exec = self.executor(&plan.graph)?;
        exec.write(input(&plan, "key_mask")?, &mask)?;
        exec.set_tokens(&padded.concat());
        exec.set_position(0);
        exec.set_row_indices(&self.family.pool_rows(&padded));
        self.finish(&plan, exec.as_mut(), which)
    }

    /// Projected, un-normalized embeddings of texts, run as one batch.
    pub fn text_features(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = texts.iter().map(|t| self.text_ids(t)).collect::<Result<Vec<_>>>()?;
        self.text_id_features(&ids)
    }

    /// Unit-length image embeddings (`CLIPModel`'s `image_embeds`), one batch.
    pub fn embed_images(&self, images: &[PixelValues]) -> Result<Vec<Vec<f32>>> {
        self.run_images(images, EmbedOutput::Normalized)
    }

    /// Unit-length text embeddings (`CLIPModel`'s `text_embeds`), one batch.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = texts.iter().map(|t| self.text_ids(t)).collect::<Result<Vec<_>>>()?;
        self.embed_text_ids(&ids)
    }

    /// Unit-length text embeddings of token id sequences (as [`EmbedModel::text_ids`] gives them).
    pub fn embed_text_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.run_texts(ids, EmbedOutput::Normalized)
    }

    /// `logits_per_image` `[images][texts]` of unit embeddings: `exp(logit_scale) * (t · i)`.
    pub fn logits(&self, image_embeds: &[Vec<f32>], text_embeds: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let scale = self.family.logit_scale().ok_or_else(|| {
            Error::InvalidInput(format!(
                "{} has one tower and no logit_scale: classify needs a CLIPModel checkpoint",
                self.dir.display()
            ))
        })?;
        Ok(image_embeds
            .iter()
            .map(|i| {
                text_embeds
                    .iter()
                    .map(|t| (t.iter().zip(i).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() as f32) * scale)
                    .collect()
            })
            .collect())
    }

    /// Zero-shot classification: for each image, the softmax over `labels` (used verbatim as the
    /// texts; add a template such as "a photo of a {}." yourself) of `logits_per_image`.
    pub fn classify(&self, images: &[PixelValues], labels: &[&str]) -> Result<Vec<Vec<f32>>> {
        if labels.is_empty() {
            return Err(Error::InvalidInput("no labels given: pass at least one".into()));
        }
        let texts = self.embed_texts(labels)?;
        let logits = self.logits(&self.embed_images(images)?, &texts)?;
        Ok(logits.iter().map(|row| softmax(row)).collect())
    }

    /// Runs the plan's phase and reads one of its `[batch, dim]` outputs.
    fn finish(
        &self,
        plan: &crate::models::EmbedPlan,
        exec: &mut dyn Executor,
        which: EmbedOutput,
    ) -> Result<Vec<Vec<f32>>> {
        exec.run(&plan.phase)?;
        let buf = match which {
            EmbedOutput::Features => plan.output,
            EmbedOutput::Normalized => plan.normalized,
        };
        let out = exec.read(buf, plan.batch)?;
        let dim = self.family.embed_dim();
        Ok(out.chunks(dim).map(<[f32]>::to_vec).collect())
    }
}

/// Which output of an embedding plan a request reads.
#[derive(Clone, Copy)]
enum EmbedOutput {
    Features,
    Normalized,
}

fn input(plan: &crate::models::EmbedPlan, name: &str) -> Result<crate::graph::Buf> {
    plan.inputs
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, b)| b)
        .ok_or_else(|| Error::InvalidInput(format!("the embedding plan has no input `{name}`")))
}

/// `x / ||x||` (transformers' `_get_vector_norm`: no epsilon; a zero vector stays NaN as there).
pub fn normalize(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    crate::backend::cpu::ops::l2_normalize(x, 1, x.len(), &mut out);
    out
}

/// Softmax of one row (max-subtracted, in f64).
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = row.iter().map(|&v| (f64::from(v) - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}
