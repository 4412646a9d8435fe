//! `InstructBlipForConditionalGeneration` (docs/models/instructblip.md): BLIP-2's vision encoder, a
//! Q-Former that reads the instruction besides its query tokens ([`QFormer::build_instruct`]),
//! `language_projection`, and a language model whose input starts with `num_query_tokens`
//! `<image>` placeholders that the projected queries replace (5.17's `masked_scatter`).
//!
//! The prompt is what `InstructBlipProcessor` builds: the LLM tokenizer's ids of the raw
//! instruction (BOS first; Vicuna's BOS is `</s>`) after the placeholders, and the same text
//! through the Q-Former's own BERT tokenizer (`qformer_tokenizer/`, `[CLS] .. [SEP]`). transformers
//! 5.17 cannot generate without a text, so captioning is the empty instruction.
//!
//! The language model is a [`LanguageModel`]: Vicuna (a LLaMA causal LM whose prompt the
//! placeholders prefix) or Flan-T5 (an encoder-decoder: the placeholders, the prompt and `</s>`
//! are the encoder's input, no BOS; the decoder generates from `decoder_start_token_id`).

use std::ops::Deref;
use std::path::{Path, PathBuf};

use super::decoder::{CausalDecoder, PrefillSpec};
use super::family::{core_accessors, Family, Loader, TextInputs};
use super::llama::LlamaDecoder;
use super::qformer::{InstructInputs, Instruction, QFormer};
use super::t5::T5;
use super::vit::VisionModel;
use serde_json::{json, Value};

use super::blip2::config::{check_blip_towers, check_t5_language_model, BlipConfig};
use super::family::{FamilyConfig, Loaded, ModelConfig, ModelCore};
use super::language_model::TextConfig;
use super::llama::LlamaConfig;
use super::preset_tokenizers::{
    added_token, bert_tokenizer_json, llama_generation_config, llama_special_tokens, llama_tokenizer_json,
    t5_tokenizer_json,
};
use super::presets::{blip_image_processor, llama_text_json, not_a_preset, t5_language_files, t5_text_json, Widths};
use super::{FamilyEntry, ModelType};
use crate::config::{check_positive, field_error};
use crate::error::{Error, Result};
use crate::generate::{kv_capacity, Encoders, GenerateOptions, ImagePlan, ImageStage, Plan, PlanShape};
use crate::graph::{DType, Fused, Graph, Linear, Phase, WeightTable};
use crate::tokenizer::Tokenizer;
use crate::weights::Checkpoint;

/// `config.json` of an `InstructBlipForConditionalGeneration` checkpoint (transformers 5.17
/// `InstructBlipConfig`, docs/models/instructblip.md#config): BLIP-2's towers, a Q-Former that also reads the
/// instruction, and a language model (a LLaMA/Vicuna decoder; Flan-T5 is another `text_config`).
#[derive(Debug, Clone)]
pub struct InstructBlipConfig(pub BlipConfig);

impl Deref for InstructBlipConfig {
    type Target = BlipConfig;
    fn deref(&self) -> &BlipConfig {
        &self.0
    }
}

impl InstructBlipConfig {
    /// Parses as `InstructBlipConfig.__init__` does (a missing `text_config` is OPT's, which glimpse
    /// refuses with the decoders it runs), then validates.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let cfg = InstructBlipConfig(BlipConfig::parse(value, path)?);
        cfg.check().map_err(|m| Error::config(path, m))?;
        Ok(cfg)
    }

    /// The LLaMA decoder's config (Vicuna checkpoints).
    pub fn llama(&self) -> Result<&LlamaConfig> {
        match &self.text_config {
            TextConfig::Llama(t) => Ok(t),
            other => Err(Error::Unsupported(format!(
                "InstructBLIP with text_config.model_type `{}` has no LLaMA decoder (glimpse runs InstructBLIP with LLaMA (Vicuna) or T5 (Flan-T5))",
                other.model_type()
            ))),
        }
    }

    /// `<image>`'s id (`check` guarantees it is set).
    pub fn image_token(&self) -> u32 {
        self.image_token_index.unwrap_or(0)
    }

    fn check(&self) -> Result<(), String> {
        let (v, q) = (&self.vision_config, &self.qformer_config);
        check_blip_towers(v, q, self.num_query_tokens)?;
        check_positive("qformer_config.vocab_size", q.vocab_size)?;
        check_positive("qformer_config.max_position_embeddings", q.max_position_embeddings)?;
        let t = match &self.text_config {
            TextConfig::Llama(t) => t,
            TextConfig::T5(t) => {
                return check_t5_language_model(
                    t,
                    self.use_decoder_only_language_model,
                    self.image_token_index,
                    "without it transformers ignores the image; add \"image_token_index\": <id of <image>> to config.json (32100 in Salesforce/instructblip-flan-t5-xl)",
                )
            }
            other => return Err(TextConfig::unsupported_by_family(
                other.model_type(),
                "glimpse runs InstructBLIP with a LLaMA (Vicuna) or T5 (Flan-T5) language model; set text_config.model_type to \"llama\" for a Vicuna checkpoint or \"t5\" for a Flan-T5 one",
            )),
        };
        if self.use_decoder_only_language_model == Some(false) {
            return Err(field_error(
                "use_decoder_only_language_model",
                false,
                "a LLaMA language model is decoder-only: set it to true or remove it",
            ));
        }
        t.check()?;
        if self.image_token_index.is_none() {
            // transformers would silently drop the image (no placeholder matches).
            return Err("no `image_token_index`: without it transformers ignores the image; add \"image_token_index\": <id of <image>> to config.json (32001 in Salesforce/instructblip-vicuna-7b)".into());
        }
        t.check_token_ids(&[
            ("image_token_index", self.image_token_index),
            ("text_config.bos_token_id", t.bos_token_id),
        ])
    }
}

pub const FAMILY: FamilyEntry = FamilyEntry {
    model_types: &[ModelType {
        name: "instructblip",
        architectures: &["InstructBlipForConditionalGeneration"],
        label: "instructblip (LLaMA/Vicuna)",
        parse: |v, p| Ok(ModelConfig::new(InstructBlipConfig::from_value(v, p)?)),
    }],
    presets: &["instructblip-vicuna-7b", "instructblip-tiny", "instructblip-flan-t5-xl", "instructblip-flan-t5-tiny"],
    preset_config: |name| match name {
        n if n.starts_with("instructblip-flan-t5-") => instructblip_t5_json(n),
        n => instructblip_json(n),
    },
};

impl FamilyConfig for InstructBlipConfig {
    fn architecture(&self) -> &str {
        "InstructBlipForConditionalGeneration"
    }
    fn load(&self, ckpt: &Checkpoint) -> Result<Loaded> {
        Ok(Loaded::Generates(Box::new(InstructBlip::load(self, ckpt)?)))
    }
    fn record_tensors(&self, recorder: &Checkpoint) -> Result<()> {
        self.text_config.record_untied_head(recorder)?;
        self.load(recorder).map(drop)
    }
    fn synth_token_ids(&self) -> (u32, u32) {
        (self.text_config.first_eos().unwrap_or(2), self.image_token())
    }
    fn synth_tokenizer(&self) -> Result<Value> {
        if self.text_config.is_t5() {
            return Ok(t5_tokenizer_json(self.image_token()));
        }
        // Vicuna's conversion makes `</s>` the BOS the template inserts.
        let mut t = llama_tokenizer_json(self.image_token())?;
        let bos = json!({"SpecialToken": {"id": "</s>", "type_id": 0}});
        t["post_processor"]["single"][0] = bos.clone();
        t["post_processor"]["pair"][0] = bos;
        t["post_processor"]["pair"][2] = json!({"SpecialToken": {"id": "</s>", "type_id": 1}});
        t["post_processor"]["special_tokens"] = json!({"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}});
        Ok(t)
    }
    fn synth_files(&self) -> Result<Vec<(&'static str, Value)>> {
        let image = self.image_token();
        let mut files = if self.text_config.is_t5() {
            t5_language_files(image, "InstructBlipProcessor")
        } else {
            let added: serde_json::Map<String, Value> =
                llama_special_tokens(image).into_iter().map(|(id, t)| (id.to_string(), added_token(id, t))).collect();
            vec![
                ("generation_config.json", llama_generation_config(image)),
                ("tokenizer.json", self.synth_tokenizer()?),
                (
                    "tokenizer_config.json",
                    json!({
                    "add_bos_token": true, "add_eos_token": false, "added_tokens_decoder": added,
                    "bos_token": "</s>", "clean_up_tokenization_spaces": false, "eos_token": "</s>", "legacy": false,
                    "model_max_length": 2048, "pad_token": "<pad>", "padding_side": "left",
                    "processor_class": "InstructBlipProcessor", "tokenizer_class": "LlamaTokenizer",
                    "truncation_side": "left", "unk_token": "</s>"}),
                ),
            ]
        };
        files.extend([
            (
                "processor_config.json",
                json!({"image_processor": blip_image_processor(self.vision_config.image_size),
                "num_query_tokens": self.num_query_tokens, "processor_class": "InstructBlipProcessor"}),
            ),
            ("qformer_tokenizer/tokenizer.json", bert_tokenizer_json(self.qformer_config.vocab_size)?),
            (
                "qformer_tokenizer/tokenizer_config.json",
                json!({
                "backend": "tokenizers", "bos_token": "[DEC]", "cls_token": "[CLS]", "do_lower_case": true,
                "mask_token": "[MASK]", "model_max_length": 512, "pad_token": "[PAD]",
                "processor_class": "InstructBlipProcessor", "sep_token": "[SEP]", "strip_accents": null,
                "tokenize_chinese_chars": true, "tokenizer_class": "BertTokenizer", "truncation_side": "left",
                "unk_token": "[UNK]"}),
            ),
        ]);
        Ok(files)
    }
}

/// Where `InstructBlipProcessor.save_pretrained` puts the Q-Former's tokenizer.
pub const QFORMER_TOKENIZER_DIR: &str = "qformer_tokenizer";

/// The language model the projected queries prefix.
pub enum LanguageModel {
    /// Vicuna: a LLaMA causal LM (`language_model.model.*`, `language_model.lm_head.weight`).
    Llama(LlamaDecoder),
    /// Flan-T5: `T5ForConditionalGeneration` (`language_model.shared.weight`,
    /// `language_model.{encoder,decoder}.*`, `language_model.lm_head.weight`).
    T5(T5),
}

pub struct InstructBlip {
    pub cfg: InstructBlipConfig,
    pub core: ModelCore,
    vision: VisionModel,
    qformer: QFormer,
    instruction: Instruction,
    /// None when the checkpoint folder has no `qformer_tokenizer/` (in-memory checkpoints).
    qformer_tokenizer: Option<Tokenizer>,
    qformer_tokenizer_dir: PathBuf,
    /// The side the processor pads a batch's instructions on ([`instruction_padding_left`]).
    instruction_pad_left: bool,
    language_projection: Linear,
    pub lm: LanguageModel,
}

impl InstructBlip {
    pub fn load(cfg: &InstructBlipConfig, ckpt: &Checkpoint) -> Result<Self> {
        let mut table = WeightTable::default();
        let mut ld = Loader { ckpt, table: &mut table };
        let vision = VisionModel::load(&cfg.vision_config, &mut ld, "vision_model")?;
        let q = &cfg.qformer_config;
        let qformer = QFormer::load_instruct(q, cfg.num_query_tokens, &mut ld, "qformer")?;
        let instruction = Instruction::load(q, cfg.num_query_tokens, ckpt, "qformer")?;
        let language_projection =
            ld.linear("language_projection", q.hidden_size, cfg.text_config.hidden_size(), true)?;
        let lm = match &cfg.text_config {
            TextConfig::T5(t) => LanguageModel::T5(T5::load(t, &mut ld, "language_model")?),
            _ => {
                let text = cfg.llama()?;
                LanguageModel::Llama(LlamaDecoder::load(
                    text,
                    &mut ld,
                    "language_model.model.",
                    "language_model.lm_head.weight",
                    text.tie_word_embeddings,
                )?)
            }
        };
        // The folder's files; an in-memory checkpoint (no folder) has none, and the working
        // directory is never consulted in its place.
        let folder = ckpt.origin().parent().filter(|p| !p.as_os_str().is_empty() && p.is_dir());
        let qformer_tokenizer_dir = folder.unwrap_or(Path::new("<model folder>")).join(QFORMER_TOKENIZER_DIR);
        let qformer_tokenizer = match folder {
            Some(_) if qformer_tokenizer_dir.is_dir() => Some(Tokenizer::from_dir(&qformer_tokenizer_dir)?),
            _ => None,
        };
        let instruction_pad_left = match folder {
            Some(dir) => instruction_padding_left(dir)?,
            None => false,
        };
        Ok(Self {
            cfg: cfg.clone(),
            core: ModelCore::new(cfg.clone(), table),
            vision,
            qformer,
            instruction,
            qformer_tokenizer,
            qformer_tokenizer_dir,
            instruction_pad_left,
            language_projection,
            lm,
        })
    }

    /// The Q-Former's token ids of `text` (`[CLS] .. [SEP]`, as the processor's qformer_tokenizer).
    pub fn qformer_ids(&self, text: &str) -> Result<Vec<u32>> {
        let tok = self.qformer_tokenizer.as_ref().ok_or_else(|| {
            Error::MissingFile {
                path: self.qformer_tokenizer_dir.clone(),
                hint: " (InstructBLIP's Q-Former tokenizer, which InstructBlipProcessor.save_pretrained writes there; copy it from the hub repo)".into(),
            }
        })?;
        tok.encode(text)
    }

    /// The host inputs of the Q-Former for tokenized instructions (one per sequence):
    /// `qformer_embeds` and `qformer_mask`, and the instruction rows the plan takes.
    pub fn instruction_inputs(&self, ids: &[Vec<u32>]) -> Result<TextInputs> {
        let (embeds, mask) = self.instruction.embed(ids, self.instruction_pad_left)?;
        let rows = ids.iter().map(Vec::len).max().unwrap_or(0);
        Ok(TextInputs { rows, inputs: vec![("qformer_embeds", embeds), ("qformer_mask", mask)] })
    }

    fn max_positions(&self) -> usize {
        // T5's relative positions: no table bounds the length.
        self.cfg.text_config.max_position_embeddings()
    }

    /// The `vision` phase of `batch` images (pixels -> `[B*T, Dv]`): what InstructBLIP computes
    /// from the pixels alone (its Q-Former reads the instruction too). Returns the pixels,
    /// the vision output and the phase.
    fn vision_phase(&self, g: &mut Graph, batch: usize) -> (crate::graph::Buf, crate::graph::Buf, Phase) {
        let v = &self.cfg.vision_config;
        let pixels = g.buffer("pixels", batch, 3 * v.image_size * v.image_size);
        let vision_out = self.vision.build(g, pixels, batch);
        (pixels, vision_out, g.take_phase("vision"))
    }

    /// The phases for `batch` images with one instruction of `text_rows` Q-Former tokens
    /// (padded) each, a decoder input of `prompt_len` tokens and up to `max_new_tokens` new ones.
    fn plan_instructed(
        &self,
        batch: usize,
        prompt_len: usize,
        max_new_tokens: usize,
        all_prefill_logits: bool,
        text_rows: usize,
    ) -> Result<Plan> {
        if batch == 0 {
            return Err(Error::InvalidInput("no images given".into()));
        }
        let (v, q) = (&self.cfg.vision_config, &self.cfg.qformer_config);
        let nq = self.cfg.num_query_tokens;
        let mut g = Graph::new();
        let (pixels, vision_out, vision) = self.vision_phase(&mut g, batch);
        let image_stage = ImageStage { phases: 1, pixels, features: vision_out, rows_per_image: v.num_positions() };

        // Q-Former over [queries ; instruction] + projection -> [B*Nq, H]. The embeddings stay
        // fp32 up to their LayerNorm (transformers keeps query_tokens fp32 under fp16).
        let rows_per_seq = self.instruction.rows_per_seq(text_rows);
        let inp = InstructInputs {
            embeds: g.typed_buffer("qformer_embeds", batch * rows_per_seq, q.hidden_size, DType::F32),
            key_mask: g.buffer("qformer_mask", batch, rows_per_seq),
            rows_per_seq,
        };
        let qformer_out = self.qformer.build_instruct(&mut g, vision_out, batch, v.num_positions(), &inp);
        let image_embeds = g.buffer("image_embeds", batch * nq, self.language_projection.out_dim);
        let p = &self.language_projection;
        g.linear(qformer_out, p.weight, p.bias, Fused::NONE, image_embeds, batch * nq);
        let qformer = g.take_phase("qformer");

        let encoders = Encoders {
            inputs: vec![("pixels", pixels), ("qformer_embeds", inp.embeds), ("qformer_mask", inp.key_mask)],
            phases: vec![vision, qformer],
            outputs: vec![("vision_out", vision_out), ("qformer_out", qformer_out), ("image_embeds", image_embeds)],
            image_stage: Some(image_stage),
        };
        let image = (image_embeds, self.cfg.image_token());
        match &self.lm {
            LanguageModel::Llama(dec) => {
                let capacity = self.check_capacity(prompt_len, max_new_tokens)?;
                // Left-padded batches (instructions of different lengths): pad keys masked out.
                let prompt =
                    PrefillSpec { prompt_len, image: Some(image), padded: true, all_logits: all_prefill_logits };
                Ok(dec.plan(g, batch, capacity, max_new_tokens, prompt, encoders))
            }
            // The prompt feeds the encoder; the decoder starts from one token.
            LanguageModel::T5(t5) => {
                let t5 = t5.build_phases(&mut g, batch, prompt_len, max_new_tokens, image)?;
                Ok(t5.into_plan(g, batch, max_new_tokens, encoders))
            }
        }
    }

    /// The decoder-only cache rows for a prompt and `max_new_tokens`, within the positions.
    fn check_capacity(&self, prompt_len: usize, max_new_tokens: usize) -> Result<usize> {
        let max_pos = self.max_positions();
        let holds = format!("{} of them image queries", self.cfg.num_query_tokens);
        kv_capacity(prompt_len, max_new_tokens, max_pos, &holds, "shorten the prompt")
    }
}

/// Whether InstructBlipProcessor left-pads a batch's Q-Former instructions: it calls the
/// Q-Former tokenizer with the LLM tokenizer's init kwargs, so the LLM tokenizer_config.json's
/// `padding_side` wins when it is written (Vicuna: "left"); else the Q-Former tokenizer's own
/// (its tokenizer_config.json, BERT's default "right"; a Flan-T5 tokenizer writes none).
fn instruction_padding_left(model_dir: &Path) -> Result<bool> {
    for dir in [model_dir.to_path_buf(), model_dir.join(QFORMER_TOKENIZER_DIR)] {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            continue;
        }
        let config: serde_json::Value = crate::json::read_json(&path)?;
        match config.get("padding_side") {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::String(s)) if s == "left" => return Ok(true),
            Some(serde_json::Value::String(s)) if s == "right" => return Ok(false),
            Some(other) => {
                return Err(Error::config(
                    &path,
                    format!(
                        "`padding_side` is {other}: it must be \"left\" or \"right\" (transformers refuses it too)"
                    ),
                ))
            }
        }
    }
    Ok(false)
}

impl Family for InstructBlip {
    core_accessors!();

    fn image_size(&self) -> usize {
        self.cfg.vision_config.image_size
    }

    fn max_positions(&self) -> usize {
        InstructBlip::max_positions(self)
    }

    /// `num_query_tokens` `<image>` ids, then the LLM tokenizer's ids of the prompt (BOS first):
    /// the processor puts the placeholders before BOS.
    fn input_ids(&self, prompt_ids: &[u32]) -> Vec<u32> {
        self.cfg.query_placeholders_then(self.cfg.image_token(), prompt_ids)
    }

    /// The instruction verbatim: InstructBLIP has no template (the same text feeds the Q-Former).
    fn question_prompt(&self, question: &str) -> String {
        question.to_string()
    }

    /// As BLIP-2: transformers 5.17's `generate()` hands over to the language model, whose
    /// generation config comes from `text_config` (generation_config.json is not consulted): EOS
    /// `text_config.eos_token_id`, 20 new tokens unless `text_config.max_new_tokens` says more,
    /// `text_config.min_new_tokens` and `min_p` when set, greedy.
    fn default_options(&self) -> GenerateOptions {
        match &self.lm {
            LanguageModel::Llama(d) => d.cfg.generate_options(),
            LanguageModel::T5(t5) => t5.default_options(),
        }
    }

    /// A shape without text rows (bench, parity) gets the empty instruction's `[CLS] [SEP]`.
    fn build_plan(&self, shape: &PlanShape) -> Result<Plan> {
        if shape.images != shape.sequences {
            return Err(Error::InvalidInput(format!(
                "InstructBLIP takes one image per prompt; got {} images for {} prompts",
                shape.images, shape.sequences
            )));
        }
        let text_rows = if shape.text_rows == 0 { 2 } else { shape.text_rows };
        self.plan_instructed(
            shape.sequences,
            shape.prompt_len,
            shape.max_new_tokens,
            shape.all_prefill_logits,
            text_rows,
        )
    }

    fn image_plan(&self, images: usize) -> Result<Option<ImagePlan>> {
        let mut g = Graph::new();
        let (pixels, features, vision) = self.vision_phase(&mut g, images);
        let rows_per_image = self.cfg.vision_config.num_positions();
        Ok(Some(ImagePlan { graph: g, images, pixels, phases: vec![vision], features, rows_per_image }))
    }

    fn text_inputs(&self, texts: &[&str]) -> Result<Option<TextInputs>> {
        if texts.is_empty() {
            return Err(Error::InvalidInput(
                "InstructBLIP's Q-Former reads the prompt text, not only its token ids: run it through caption, ask, ask_batch or Model::run".into(),
            ));
        }
        let ids = texts.iter().map(|t| self.qformer_ids(t)).collect::<Result<Vec<_>>>()?;
        self.instruction_inputs(&ids).map(Some)
    }

    fn describe(&self) -> Vec<String> {
        let cfg = &self.cfg;
        let q = &cfg.qformer_config;
        let language_model = match &self.lm {
            LanguageModel::Llama(d) => d.describe(),
            LanguageModel::T5(t5) => t5.describe(),
        };
        vec![
            format!(
                "family:     InstructBLIP (InstructBlipForConditionalGeneration) with {}",
                match self.lm {
                    LanguageModel::Llama(_) => "a LLaMA (Vicuna) decoder",
                    LanguageModel::T5(_) => "a T5 encoder-decoder",
                }
            ),
            self.vision.describe(),
            format!(
                "q-former:   {} layers, hidden {}, {} heads x {}, cross-attention every {} layers, {} queries + instruction (vocab {}, {} positions)",
                q.num_hidden_layers,
                q.hidden_size,
                q.num_attention_heads,
                q.head_dim(),
                q.cross_attention_frequency,
                cfg.num_query_tokens,
                q.vocab_size,
                q.max_position_embeddings
            ),
            language_model,
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// `glimpse synth` presets.

/// `config.json` of an InstructBLIP preset, as transformers 5.17 writes
/// Salesforce/instructblip-vicuna-7b: BLIP-2's EVA ViT-g and Q-Former (with the instruction's
/// embeddings and text FFN, vocabulary 30523 with `[DEC]`), a Vicuna-7B (LLaMA) decoder. The
/// synthetic LLM tokenizer puts `<image>` at 32000 and `<pad>` at 32001 (the hub's are `[PAD]`
/// 32000, `<image>` 32001): same shapes, so the parameter count is the checkpoint's.
fn instructblip_json(name: &str) -> Result<Value> {
    // vision (hidden, intermediate, layers, heads, image, patch), qformer (hidden, intermediate,
    // layers, heads, vocab, positions), text (hidden, intermediate, layers, heads, kv heads,
    // vocab, image token, positions), query tokens
    let ((vh, vi, vl, vn, vs, vp), (qh, qi, ql, qn, qv, qp), (th, ti, tl, tn, tk, vocab, image, positions), nq) =
        match name {
            "instructblip-vicuna-7b" => (
                (1408, 6144, 39, 16, 224, 14),
                (768, 3072, 12, 12, 30523, 512),
                (4096, 11008, 32, 32, 32, 32002, 32000, 2048),
                32,
            ),
            // tests/fixtures/instructblip-tiny's towers; room for the synthetic tokenizers.
            "instructblip-tiny" => {
                ((32, 48, 2, 4, 24, 6), (32, 48, 3, 4, 400, 48), (32, 48, 2, 4, 2, 1024, 1000, 512), 4)
            }
            _ => return Err(not_a_preset(name)),
        };
    Ok(json!({
        "architectures": ["InstructBlipForConditionalGeneration"],
        "dtype": "float16",
        "glimpse_synth": { "preset": name, "note": "random weights made by `glimpse synth`; not a trained model" },
        "image_token_index": image,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "model_type": "instructblip",
        "num_query_tokens": nq,
        "qformer_config": {
            "attention_probs_dropout_prob": 0.1,
            "cross_attention_frequency": 2,
            "encoder_hidden_size": vh,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": qh,
            "initializer_range": 0.02,
            "intermediate_size": qi,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": qp,
            "model_type": "instructblip_qformer",
            "num_attention_heads": qn,
            "num_hidden_layers": ql,
            "pad_token_id": 0,
            "vocab_size": qv
        },
        "text_config": llama_text_json(Widths { hidden: th, intermediate: ti, layers: tl, heads: tn }, tk, positions, vocab, image + 1, 1e-06),
        "transformers_version": "5.17.0",
        "use_decoder_only_language_model": true,
        "vision_config": {
            "attention_dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": vh,
            "image_size": vs,
            "initializer_range": 1e-10,
            "intermediate_size": vi,
            "layer_norm_eps": 1e-06,
            "model_type": "instructblip_vision_model",
            "num_attention_heads": vn,
            "num_hidden_layers": vl,
            "patch_size": vp,
            "qkv_bias": true
        }
    }))
}

/// `config.json` of an InstructBLIP Flan-T5 preset, as transformers 5.17 writes
/// Salesforce/instructblip-flan-t5-xl: InstructBLIP's vision encoder and Q-Former (the Vicuna
/// preset's, or the tiny one's), a Flan-T5-XL language model (blip2-flan-t5-xl's), `<image>` at
/// 32100 of the T5 tokenizer.
fn instructblip_t5_json(name: &str) -> Result<Value> {
    let (base, (dm, dkv, dff, tl, tn)) = match name {
        "instructblip-flan-t5-xl" => ("instructblip-vicuna-7b", (2048, 64, 5120, 24, 32)),
        "instructblip-flan-t5-tiny" => ("instructblip-tiny", (32, 16, 48, 2, 3)),
        _ => return Err(not_a_preset(name)),
    };
    let mut v = instructblip_json(base)?;
    v["glimpse_synth"]["preset"] = json!(name);
    v["image_token_index"] = json!(32100);
    v["use_decoder_only_language_model"] = json!(false);
    v["text_config"] = t5_text_json(dm, dkv, dff, tl, tn, 32128);
    Ok(v)
}
