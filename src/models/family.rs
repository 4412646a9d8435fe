//! What every family implements and what the rest of glimpse sees of a model: the parsed
//! config ([`ModelConfig`] over a family's [`FamilyConfig`]), the loaded model ([`Family`] for
//! generating, [`Embedder`] for embedding) and the helpers families load with. The registry
//! ([`super::FAMILIES`]) is the only place that names families.

use std::any::Any;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::config::{GenerationConfig, PreprocessorConfig};
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, Plan, PlanShape};
use crate::graph::{Linear, Norm, WeightTable, W};
use crate::weights::Checkpoint;

/// A family's parsed, validated config.json: what glimpse asks of a checkpoint before reading a
/// weight (loading it, messages) and what `glimpse synth` needs to write one.
pub trait FamilyConfig: AsAny + fmt::Debug + Send + Sync {
    /// The transformers class the checkpoint loads as, for messages.
    fn architecture(&self) -> &str;
    /// Whether the family embeds (CLIP) rather than generates text (BLIP-2, LLaVA, ...).
    fn embeds(&self) -> bool {
        false
    }
    /// Loads the weights of this config's model from `ckpt`.
    fn load(&self, ckpt: &Checkpoint) -> Result<Loaded>;
    /// Checks generation_config.json's token ids against the model (chat families generate with
    /// them; the others take their ids from config.json).
    fn check_generation_config(&self, _generation: &GenerationConfig, _path: &Path) -> Result<()> {
        Ok(())
    }

    // `glimpse synth`: what a random checkpoint of this config holds besides its config.json.

    /// Reads every tensor a checkpoint of this config stores from `recorder` (a recording
    /// checkpoint): the model's own loader, plus any tensor transformers stores that glimpse does
    /// not read. Tensors a loader only reads when present are declared before it runs.
    fn record_tensors(&self, recorder: &Checkpoint) -> Result<()> {
        self.load(recorder).map(drop)
    }
    /// (EOS, image token) of the decoder: the embedding rows synth scales; (2, 0) without one.
    fn synth_token_ids(&self) -> (u32, u32) {
        (2, 0)
    }
    /// The family's `tokenizer.json` for this config.
    fn synth_tokenizer(&self) -> Result<Value>;
    /// Every JSON file of a synth folder besides config.json (tokenizer, processor, generation
    /// config), as (file name, contents).
    fn synth_files(&self) -> Result<Vec<(&'static str, Value)>>;
    /// The `chat_template.jinja` a chat family's folder holds.
    fn synth_chat_template(&self) -> Option<&'static str> {
        None
    }
}

/// `&dyn Any` of any type, so [`ModelConfig::get`] can downcast a family's config.
pub trait AsAny: Any {
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The parsed config.json of any family (cheap to clone). [`ModelConfig::load`] parses it
/// through the registry; [`ModelConfig::get`] gives the family's own config type.
#[derive(Clone)]
pub struct ModelConfig(Arc<dyn FamilyConfig>);

impl ModelConfig {
    pub fn new(config: impl FamilyConfig) -> Self {
        Self(Arc::new(config))
    }
    /// The family's config, when it is a `T`.
    pub fn get<T: FamilyConfig>(&self) -> Option<&T> {
        // `(*self.0)`: the blanket `AsAny` impl would otherwise answer for the `Arc` itself.
        (*self.0).as_any().downcast_ref()
    }
    /// Whether the family embeds (CLIP) rather than generates text (BLIP-2, LLaVA, ...).
    pub fn embeds(&self) -> bool {
        self.0.embeds()
    }
    /// The transformers class the checkpoint loads as, for messages.
    pub fn architecture(&self) -> &str {
        self.0.architecture()
    }
    pub fn family(&self) -> &dyn FamilyConfig {
        &*self.0
    }
}

impl fmt::Debug for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What every loaded model holds, whatever its family: the parsed config.json and every weight
/// (uploaded once per backend).
#[derive(Debug)]
pub struct ModelCore {
    pub config: ModelConfig,
    pub weights: Arc<WeightTable>,
}

impl ModelCore {
    pub fn new(config: impl FamilyConfig, weights: WeightTable) -> Self {
        Self { config: ModelConfig::new(config), weights: Arc::new(weights) }
    }
}

/// [`Family::core`] and [`Family::core_mut`] for a family that keeps its [`ModelCore`] in a
/// field named `core`: `impl Family for X { core_accessors!(); ... }`.
macro_rules! core_accessors {
    () => {
        fn core(&self) -> &$crate::models::family::ModelCore {
            &self.core
        }
        fn core_mut(&mut self) -> &mut $crate::models::family::ModelCore {
            &mut self.core
        }
    };
}
pub(crate) use core_accessors;

/// A loaded model of one family: everything above the graph that differs between families.
pub trait Family: Send + Sync {
    fn core(&self) -> &ModelCore;
    /// The same, to change the weights after loading (`crate::models::quantize::quantize_family`).
    fn core_mut(&mut self) -> &mut ModelCore;
    /// The parsed config.json.
    fn config(&self) -> &ModelConfig {
        &self.core().config
    }
    /// Every weight, uploaded once per backend.
    fn weights(&self) -> &Arc<WeightTable> {
        &self.core().weights
    }
    /// Checks the image processor's output against what the vision tower takes (`path` names
    /// the preprocessor file in errors): by default the square [`Family::image_size`].
    fn check_preprocessor(&self, pre: &PreprocessorConfig, path: &Path) -> Result<()> {
        check_square_input(pre, path, self.image_size())
    }
    /// The image processor of checkpoint folder `dir`: by default preprocessor_config.json (or
    /// processor_config.json's `image_processor`) as the resize-and-crop processors read it,
    /// checked by [`Family::check_preprocessor`]; a family that splits images supplies its own.
    fn image_processor(&self, dir: &Path) -> Result<crate::image::ImageProcessor> {
        let (pre, pre_path) = PreprocessorConfig::load_from_dir(dir)?;
        self.check_preprocessor(&pre, &pre_path)?;
        Ok(crate::image::ImageProcessor::new(pre))
    }
    /// The prompt text with each image placeholder replaced by what its image expands to, for
    /// families whose expansion depends on the image (SmolVLM's tile grid); None (the default)
    /// for a fixed count per image (the chat processor's `expand`).
    fn expand_image_prompt(&self, _text: &str, _images: &[crate::image::PixelValues]) -> Result<Option<String>> {
        Ok(None)
    }
    /// Side of the square pixel input of the plan's `pixels` input (one frame).
    fn image_size(&self) -> usize;
    /// Decoder positions (`text_config.max_position_embeddings`): bounds prompt + new tokens.
    fn max_positions(&self) -> usize;
    /// The decoder input for tokenized prompt `prompt_ids` (image placeholders, then the
    /// prompt); by default the prompt as it is (chat families: the template and the processor
    /// already placed the image tokens).
    fn input_ids(&self, prompt_ids: &[u32]) -> Vec<u32> {
        prompt_ids.to_vec()
    }
    /// The family's question-answering prompt template applied to `question`; by default the
    /// question itself (chat families ask through their chat template instead).
    fn question_prompt(&self, question: &str) -> String {
        question.to_string()
    }
    /// Generation settings as transformers' `generate()` resolves them for this family.
    fn default_options(&self) -> GenerateOptions;
    /// The phases for a request of `shape`, which [`Family::plan_for`] has checked.
    fn build_plan(&self, shape: &PlanShape) -> Result<Plan>;
    /// The plan for a request of `shape`: the checks every family shares, then the family's own
    /// [`Family::build_plan`]. The one entry point; [`Family::plan`] is a shorthand.
    fn plan_for(&self, shape: &PlanShape) -> Result<Plan> {
        shape.check()?;
        self.build_plan(shape)
    }
    /// [`Family::plan_for`] for `batch` one-image sequences of `prompt_len` decoder input tokens
    /// and up to `max_new_tokens` new tokens; `all_prefill_logits` keeps every prefill row's logits.
    fn plan(&self, batch: usize, prompt_len: usize, max_new_tokens: usize, all_prefill_logits: bool) -> Result<Plan> {
        self.plan_for(&PlanShape { all_prefill_logits, ..PlanShape::new(batch, prompt_len, max_new_tokens) })
    }
    /// `info` lines after the model path: family, towers, decoder (label padded to 12 columns).
    fn describe(&self) -> Vec<String>;
    /// Decoder sequences for `images` images and one decoder input `input_ids` (default: one
    /// sequence per image, as BLIP-2 batches).
    fn sequences_for(&self, images: usize, _input_ids: &[u32]) -> Result<usize> {
        Ok(images)
    }
    /// Host inputs the encoders read from each sequence's prompt text besides the image
    /// (InstructBLIP: the Q-Former's instruction), one text per sequence; None (the default)
    /// when the encoders see the image only.
    fn text_inputs(&self, _texts: &[&str]) -> Result<Option<TextInputs>> {
        Ok(None)
    }
    /// The phases that compute a plan's [`crate::generate::ImageStage`] features from the
    /// pixels alone, for `images` images, in a graph of their own (the server's image cache
    /// runs them for the images it has not seen); None when the family has no such stage.
    fn image_plan(&self, _images: usize) -> Result<Option<crate::generate::ImagePlan>> {
        Ok(None)
    }
    /// True for chat models: prompts come from the checkpoint's chat template and processor
    /// (`crate::chat`), generation settings from generation_config.json.
    fn chat(&self) -> bool {
        false
    }
    /// The decoder input text the family's own processor builds for `prompt` over `images`
    /// images, tokenized without added special tokens, for families whose processor interleaves
    /// images and text itself (IDEFICS); None (the default): the question or chat template.
    fn processor_prompt(&self, _prompt: PromptText<'_>, _images: usize) -> Option<Result<String>> {
        None
    }
    /// Reads what the family needs of the checkpoint's tokenizer (IDEFICS: the ids of its image
    /// and end-of-sequence tokens), once at load, before any plan is built.
    fn bind_tokenizer(&mut self, _tokenizer: &crate::tokenizer::Tokenizer) -> Result<()> {
        Ok(())
    }
}

/// What a request asks, as a family whose processor builds the whole prompt sees it
/// ([`Family::processor_prompt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptText<'a> {
    /// A caption of one image: the prompt of the image alone.
    Caption,
    /// One question about every image of the request.
    Question(&'a str),
    /// The processor's own text with one image placeholder per image, in order.
    Raw(&'a str),
}

/// What [`Family::text_inputs`] gives the encoders: named host data (each `[sequences * ..]`,
/// sequence-major, so beam search can repeat each sequence's block) and the text rows per
/// sequence the plan is built for ([`PlanShape::text_rows`]).
#[derive(Debug)]
pub struct TextInputs {
    pub rows: usize,
    pub inputs: Vec<(&'static str, Vec<f32>)>,
}

/// A loaded model that embeds images and texts into one space instead of generating (CLIP):
/// the family builds one graph per request shape and says how its text inputs are padded and
/// pooled; `api::Embedder` runs them.
pub trait Embedder: Send + Sync {
    /// The parsed config.json and every weight.
    fn core(&self) -> &ModelCore;
    /// Checks the image processor's output against the vision tower (vision models only).
    fn check_preprocessor(&self, pre: &PreprocessorConfig, path: &Path) -> Result<()>;
    /// Side of the square pixel input; None when the model has no vision tower.
    fn image_size(&self) -> Option<usize>;
    /// Token positions of the text tower; None when the model has no text tower.
    fn text_positions(&self) -> Option<usize>;
    /// Width of the embeddings both towers produce.
    fn embed_dim(&self) -> usize;
    /// `exp(logit_scale)`, the factor of image-text similarities (None: single-tower model).
    fn logit_scale(&self) -> Option<f32>;
    /// The graph for `batch` images: input `pixels` `[batch, 3*S*S]`, outputs `[batch, embed_dim]`
    /// embeddings and their unit vectors.
    fn image_plan(&self, batch: usize) -> Result<EmbedPlan>;
    /// The graph for `batch` texts of `len` tokens (padded): tokens through `set_tokens`, input
    /// `key_mask` `[batch, len]` (0 or `f32::MIN` per key), pooling rows through
    /// `set_row_indices` ([`Embedder::pool_rows`]); output `[batch, embed_dim]`.
    fn text_plan(&self, batch: usize, len: usize) -> Result<EmbedPlan>;
    /// The text tower's vocabulary size and `eos_token_id` (None: no text tower).
    fn text_vocab(&self) -> Option<(usize, Option<u32>)>;
    /// The row each padded id sequence is pooled at.
    fn pool_rows(&self, ids: &[Vec<u32>]) -> Vec<usize>;
    /// `info` lines after the model path.
    fn describe(&self) -> Vec<String>;
}

/// One embedding request shape: a graph, its single phase, named host inputs and the output.
pub struct EmbedPlan {
    pub graph: crate::graph::Graph,
    pub phase: crate::graph::Phase,
    pub batch: usize,
    pub inputs: Vec<(&'static str, crate::graph::Buf)>,
    /// `[batch, embed_dim]`: the projected embeddings (`get_image_features` / `get_text_features`).
    pub output: crate::graph::Buf,
    /// `[batch, embed_dim]` fp32: the same rows L2-normalised on the device (`CLIPModel`'s
    /// `image_embeds` / `text_embeds`).
    pub normalized: crate::graph::Buf,
}

/// The decoder sequences a prompt `input_ids` makes of `images` images (or frames: `unit`),
/// when each fills `per` tokens holding `token` and every sequence holds the prompt's images
/// (transformers' "Image features and image tokens do not match" check); `fix` says what to
/// check when they do not divide.
pub fn image_token_sequences(
    input_ids: &[u32],
    token: u32,
    per: usize,
    images: usize,
    unit: &str,
    fix: &str,
) -> Result<usize> {
    let held = input_ids.iter().filter(|&&t| t == token).count();
    let per_seq = held / per.max(1);
    if per == 0 || held % per != 0 || per_seq == 0 || images % per_seq != 0 {
        return Err(Error::InvalidInput(format!(
            "Image features and image tokens do not match: the prompt holds {held} image tokens (id {token}), each {unit} fills {per}, and {images} {unit}s were given; {fix}"
        )));
    }
    Ok(images / per_seq)
}

/// What a loaded checkpoint does.
pub enum Loaded {
    /// Generates text from images and prompts (BLIP-2, InstructBLIP, LLaVA): `caption`, `ask`.
    Generates(Box<dyn Family>),
    /// Embeds images and texts (CLIP): `embed`, `classify`.
    Embeds(Box<dyn Embedder>),
}

/// Checks that the image processor's output (`crop_size` when it center-crops, else `size`) is
/// the `expected` x `expected` input the vision tower takes (`path` names the file in errors).
pub fn check_square_input(pre: &PreprocessorConfig, path: &Path, expected: usize) -> Result<()> {
    let out = pre.crop_size.as_ref().filter(|_| pre.do_center_crop).unwrap_or(&pre.size);
    if (out.height, out.width) != (Some(expected), Some(expected)) {
        let field = if pre.do_center_crop { "crop_size" } else { "size" };
        return Err(Error::config(
            path,
            format!(
                "`{field}` is {}, but the vision model takes {expected}x{expected} images (vision_config.image_size in config.json): set {field} to {{\"height\": {expected}, \"width\": {expected}}}",
                out.describe()
            ),
        ));
    }
    Ok(())
}

/// Reads named tensors of a checkpoint into a weight table, checking every shape.
pub struct Loader<'a> {
    pub ckpt: &'a Checkpoint,
    pub table: &'a mut WeightTable,
}

impl Loader<'_> {
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<W> {
        let w = self.ckpt.f16(name, shape)?;
        Ok(self.table.add(name, w))
    }

    /// `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias` `[out]`.
    pub fn linear(&mut self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let weight = self.tensor(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias { Some(self.tensor(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
        Ok(Linear { weight, bias, in_dim, out_dim })
    }

    /// `{prefix}.weight` and `{prefix}.bias`, both `[dim]`.
    pub fn norm(&mut self, prefix: &str, dim: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: self.tensor(&format!("{prefix}.weight"), &[dim])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }
}
