//! The library's front door: load a model folder once, then caption images, answer questions
//! or run raw prompts. A [`Model`] is `Send + Sync`; each request gets its own executor state.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

pub use crate::backend::Device;
use crate::backend::{Backend, Executor};
use crate::config::{GenerationConfig, ModelConfig, PreprocessorConfig};
use crate::error::{Error, Result};
use crate::generate::{beam_rows, expand_for_beams, generate, GenerateOptions, Plan, Sequence, Timings, TokenEvent};
use crate::image::{ImageProcessor, PixelValues};
use crate::models::Family;
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
type CachedRun = (PlanKey, Plan, Box<dyn Executor>);

/// (images, sequences, decoder input length, max new tokens): what a plan's buffers depend on.
type PlanKey = (usize, usize, usize, usize);

impl Model {
    /// Loads an HF model folder (`config.json`, safetensors, tokenizer, preprocessor config).
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let start = Instant::now();
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::MissingFile { path: dir.to_path_buf(), hint: " (expected a model folder)".into() });
        }
        let cfg = ModelConfig::load(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open_dir(dir)?;
        let family = crate::models::load(&cfg, &ckpt)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let (pre, pre_path) = PreprocessorConfig::load_from_dir(dir)?;
        family.check_preprocessor(&pre, &pre_path)?;
        let generation = GenerationConfig::load_or_default(&dir.join("generation_config.json"))?;
        let chat = if family.chat() { Some(crate::chat::ChatProcessor::load_from_dir(dir)?) } else { None };
        let backend = Backend::new(device, family.weights())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            family,
            tokenizer,
            image_processor: ImageProcessor::new(pre),
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
        // Chat families generate with their own generation_config.json (LLaVA: eos 2).
        if self.chat.is_some() {
            if let Some(eos) = &self.generation.eos_token_id {
                o.eos_token_ids = eos.to_vec();
            }
            o.max_new_tokens = self.generation.max_new_tokens.or(o.max_new_tokens);
        }
        o
    }

    /// The family's question template applied to `question` (BLIP-2: `"Question: {q} Answer:"`).
    pub fn question_prompt(&self, question: &str) -> String {
        self.family.question_prompt(question)
    }

    /// Decoder input ids for a text prompt (`None`: captioning, the tokenizer's BOS only). For
    /// chat families the prompt is raw text whose image placeholders are expanded (`None`: the
    /// caption instruction through the chat template with one image).
    pub fn input_ids(&self, prompt: Option<&str>) -> Result<Vec<u32>> {
        if let Some(chat) = &self.chat {
            let text = match prompt {
                Some(p) => p.to_string(),
                None => chat.user_prompt(1, crate::chat::CAPTION_INSTRUCTION)?,
            };
            return self.chat_ids(chat, &text);
        }
        let ids = self.tokenizer.encode(prompt.unwrap_or(""))?;
        Ok(self.family.input_ids(&ids))
    }

    /// Decoder input ids of a chat request: `images` images then `text` in one user message.
    pub fn chat_input_ids(&self, images: usize, text: &str) -> Result<Vec<u32>> {
        let chat = self.chat.as_ref().ok_or_else(|| {
            Error::InvalidInput("this model has no chat template: ask about one image at a time".into())
        })?;
        self.chat_ids(chat, &chat.user_prompt(images, text)?)
    }

    /// Expands image placeholders for the model's image size and tokenizes as the processor does
    /// (special tokens added unless the text already starts with BOS, as apply_chat_template).
    fn chat_ids(&self, chat: &crate::chat::ChatProcessor, text: &str) -> Result<Vec<u32>> {
        let size = self.family.image_size();
        let expanded = chat.expand(text, chat.tokens_per_image(size, size)?);
        let ids = if chat.bos_token().is_some_and(|b| expanded.starts_with(b)) {
            self.tokenizer.encode_plain(&expanded)?
        } else {
            self.tokenizer.encode(&expanded)?
        };
        Ok(self.family.input_ids(&ids))
    }

    pub fn preprocess(&self, image: &Path) -> Result<PixelValues> {
        self.image_processor.preprocess_file(image)
    }

    /// Captions an image file.
    pub fn caption(&self, image: &Path, opts: &GenerateOptions) -> Result<Output> {
        opts.validate()?;
        if self.chat.is_some() {
            return self.ask_images(&[image], crate::chat::CAPTION_INSTRUCTION, opts);
        }
        self.run(&[self.preprocess(image)?], None, opts, &mut |_| {}).map(|mut v| v.remove(0))
    }

    /// Answers a question about an image with the family's question template.
    pub fn ask(&self, image: &Path, question: &str, opts: &GenerateOptions) -> Result<Output> {
        opts.validate()?;
        if self.chat.is_some() {
            return self.ask_images(&[image], question, opts);
        }
        let prompt = self.question_prompt(question);
        self.run(&[self.preprocess(image)?], Some(&prompt), opts, &mut |_| {}).map(|mut v| v.remove(0))
    }

    /// Asks one question about several images (chat families: one user message holding every
    /// image, then the question; a single image on other families).
    pub fn ask_images(&self, images: &[&Path], question: &str, opts: &GenerateOptions) -> Result<Output> {
        opts.validate()?;
        if self.chat.is_none() {
            return match images {
                [one] => self.ask(one, question, opts),
                _ => Err(Error::InvalidInput(format!(
                    "this model answers about one image at a time; got {} images (several images need a chat model such as LLaVA)",
                    images.len()
                ))),
            };
        }
        let pixels = images.iter().map(|p| self.preprocess(p)).collect::<Result<Vec<_>>>()?;
        let ids = self.chat_input_ids(images.len(), question)?;
        let (mut seqs, timings, device) = self.run_ids(&pixels, &ids, opts, &mut |_| {})?;
        self.output(seqs.remove(0), &timings, &device)
    }

    /// Runs preprocessed images as one batch with one raw prompt; `on_token` sees each token
    /// as it is produced.
    pub fn run(
        &self,
        images: &[PixelValues],
        prompt: Option<&str>,
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Vec<Output>> {
        let input_ids = self.input_ids(prompt)?;
        let (seqs, timings, device) = self.run_ids(images, &input_ids, opts, on_token)?;
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
        let size = self.family.image_size();
        let mut pixels = Vec::with_capacity(images.len() * 3 * size * size);
        for img in images {
            if (img.height, img.width) != (size, size) {
                return Err(Error::InvalidInput(format!(
                    "pixel values are {}x{}, the vision model takes {size}x{size}",
                    img.height, img.width
                )));
            }
            pixels.extend_from_slice(&img.data);
        }
        opts.check_available()?;
        let new_tokens = opts.new_tokens(input_ids.len(), self.family.max_positions())?;
        let sequences = self.family.sequences_for(images.len(), input_ids)?;
        // Beam search: each sequence's images repeated per beam, as one block (all of a chat
        // prompt's images stay together).
        let pixels = expand_for_beams(&pixels, sequences, opts);
        let key = (beam_rows(images.len(), opts), beam_rows(sequences, opts), input_ids.len(), new_tokens);
        if !self.backend.is_cuda() {
            // CPU requests run in parallel, each with its own buffers.
            let plan = self.family.plan_images(key.0, key.1, key.2, key.3, false)?;
            let mut exec = self.backend.executor(self.family.weights(), &plan.graph)?;
            let (seqs, timings) = generate(&plan, exec.as_mut(), &[("pixels", &pixels)], input_ids, opts, on_token)?;
            return Ok((seqs, timings, exec.device_name()));
        }
        let mut slot = self.gpu.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|(k, _, _)| *k != key) {
            *slot = None; // free the old buffers before allocating new ones
            let plan = self.family.plan_images(key.0, key.1, key.2, key.3, false)?;
            let exec = self.backend.executor(self.family.weights(), &plan.graph)?;
            *slot = Some((key, plan, exec));
        }
        let (_, plan, exec) = slot.as_mut().expect("filled above");
        let (seqs, timings) = generate(plan, exec.as_mut(), &[("pixels", &pixels)], input_ids, opts, on_token)?;
        Ok((seqs, timings, exec.device_name()))
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
