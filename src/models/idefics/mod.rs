//! IDEFICS (`IdeficsForVisionText2Text`, docs/models/idefics.md): Flamingo's architecture. Each
//! image -> IDEFICS' vision transformer (CLIP's, every token kept, no post layer norm) -> the
//! Perceiver Resampler's latents ([`perceiver`]) or the tokens themselves -> keys and values of
//! gated cross-attention blocks that run before every `cross_layer_interval`-th layer of a
//! LLaMA decoder. Each text token attends only the image the processor assigns it
//! ([`processor::image_index`]); a token with none gets no cross-attention output, while the
//! block's gated MLP applies to every token.
//!
//! A plan's images are all sequences' images in order, the same count per sequence; their
//! cross-attention keys and values are computed once per request (`cross_kv`), and the masks
//! are written from the prompt tokens before the prefill (the decode steps reuse each
//! sequence's last prompt row, as transformers' generate does).

pub mod config;
mod perceiver;
pub mod processor;
mod synth;

use std::path::Path;

use half::f16;
use serde_json::Value;

use super::clip_vision::{ClipVision, VisionRequest};
use super::decoder::{CausalDecoder, DecoderPass, PassSpec, PrefillSpec};
use super::family::{
    core_accessors, image_token_sequences, Family, FamilyConfig, Loaded, Loader, ModelConfig, ModelCore, PromptText,
};
use super::layers::{
    linear, load_attention, AttentionLayer, AttnCall, AttnScratch, AttnSpec, GatedMlp, GatedScratch, HeadNorms, Keys,
    KvCache, NormLayer,
};
use super::llama::{LayerHook, LayerInput, LlamaDecoder};
use super::{FamilyEntry, ModelType};
use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::generate::{kv_capacity, Encoders, GenerateOptions, ImagePlan, ImageStage, Plan, PlanShape, PromptInput};
use crate::graph::{Activation, Buf, Graph, Op, Phase, WeightTable, W};
use crate::weights::{Checkpoint, Weight};
use config::{AlphaType, IdeficsConfig};
use perceiver::Resampler;
use processor::Item;

pub const FAMILY: FamilyEntry = FamilyEntry {
    model_types: &[ModelType {
        name: "idefics",
        architectures: &["IdeficsForVisionText2Text"],
        label: "idefics (IDEFICS, Flamingo-style)",
        parse: |v, p| Ok(ModelConfig::new(IdeficsConfig::from_value(v, p)?)),
    }],
    presets: &["idefics-9b", "idefics-tiny"],
    preset_config: synth::idefics_json,
};

impl FamilyConfig for IdeficsConfig {
    fn architecture(&self) -> &str {
        "IdeficsForVisionText2Text"
    }
    fn load(&self, ckpt: &Checkpoint) -> Result<Loaded> {
        Ok(Loaded::Generates(Box::new(Idefics::load(self, ckpt)?)))
    }
    fn check_generation_config(&self, generation: &GenerationConfig, path: &Path) -> Result<()> {
        generation.check_tokens(self.total_vocab(), path)
    }
    /// The model's tensors plus the vision tower's `post_layernorm`, which IDEFICS never runs
    /// but transformers' model holds.
    fn record_tensors(&self, recorder: &Checkpoint) -> Result<()> {
        Idefics::load(self, recorder)?;
        let d = self.vision_config.embed_dim;
        let mut table = WeightTable::default();
        Loader { ckpt: recorder, table: &mut table }.norm("model.vision_model.post_layernorm", d, 1e-5)?;
        Ok(())
    }
    /// EOS and `<image>` (the synthetic tokenizer's second additional id).
    fn synth_token_ids(&self) -> (u32, u32) {
        (2, self.text.vocab_size as u32 + 1)
    }
    fn synth_tokenizer(&self) -> Result<Value> {
        synth::tokenizer(self)
    }
    fn synth_files(&self) -> Result<Vec<(&'static str, Value)>> {
        synth::files(self)
    }
}

/// Key prefixes: `IdeficsForVisionText2Text`'s `model.` and a bare `IdeficsModel`'s none.
const PREFIXES: [&str; 2] = ["model.", ""];

/// One `IdeficsGatedCrossAttentionLayer`.
struct GatedCrossLayer {
    input_layernorm: NormLayer,
    /// q from the decoder's width, k/v from the vision width; per-head RMSNorm with `qk_layer_norms`.
    cross_attn: AttentionLayer,
    alpha_cross_attn: W,
    post_attention_layernorm: NormLayer,
    mlp: GatedMlp,
    alpha_dense: W,
}

/// The token ids the processor's rules need, from the checkpoint's tokenizer.
#[derive(Debug, Clone)]
struct Tokens {
    bos: String,
    image: u32,
    eos: Option<u32>,
}

/// A loaded IDEFICS model.
pub struct Idefics {
    pub cfg: IdeficsConfig,
    core: ModelCore,
    vision: ClipVision,
    resampler: Option<Resampler>,
    cross: Vec<GatedCrossLayer>,
    decoder: LlamaDecoder,
    tokens: Option<Tokens>,
}

/// `a` becomes `[a; b]` along the rows of two `[_, width]` weights (`IdeficsDecoupledEmbedding`
/// / `IdeficsDecoupledLinear`: ids past `vocab_size` use the additional rows), in place, so the
/// table holds each parameter once. The join is a copy (the embedding and head are not
/// zero-copy); a recording checkpoint (`glimpse synth`) only needs the tensors asked for.
fn join_rows(ld: &mut Loader, a: W, b: Option<W>, width: usize) -> W {
    let Some(b) = b.filter(|_| !ld.ckpt.is_recording()) else { return a };
    let data: Vec<f16> = [a, b].iter().flat_map(|&w| ld.table.get(w).as_slice().to_vec()).collect();
    let rows = data.len() / width.max(1);
    ld.table.weights[a.0] = Weight::from_vec(vec![rows, width], data);
    a
}

impl Idefics {
    pub fn load(cfg: &IdeficsConfig, ckpt: &Checkpoint) -> Result<Self> {
        let mut table = WeightTable::default();
        let mut ld = Loader { ckpt, table: &mut table };
        let p =
            PREFIXES.iter().copied().find(|p| ckpt.contains(&format!("{p}embed_tokens.weight"))).unwrap_or(PREFIXES[0]);
        let t = &cfg.text;
        let (h, v, add) = (t.hidden_size, t.vocab_size, cfg.additional_vocab_size);
        let vc = cfg.vision_config.clip();
        let vision = ClipVision::load(&vc, &mut ld, &format!("{p}vision_model."), vc.num_hidden_layers, false)?;
        let resampler = cfg
            .use_resampler
            .then(|| Resampler::load(cfg, &mut ld, &format!("{p}perceiver_resampler.")))
            .transpose()?;
        let cross = (0..cfg.cross_layers())
            .map(|c| load_cross_layer(cfg, &mut ld, &format!("{p}gated_cross_attn_layers.{c}")))
            .collect::<Result<Vec<_>>>()?;

        // Decoupled embedding and head: the additional rows follow the main ones.
        let embed_main = ld.tensor(&format!("{p}embed_tokens.weight"), &[v, h])?;
        let embed_add = (add > 0)
            .then(|| ld.tensor(&format!("{p}embed_tokens.additional_embedding.weight"), &[add, h]))
            .transpose()?;
        let embed = join_rows(&mut ld, embed_main, embed_add, h);
        // Tied (transformers' `_tied_weights_keys`): the head is the whole joined embedding.
        let tied = t.tie_word_embeddings;
        let decoder = LlamaDecoder::load_with(t, &mut ld, p, embed, |ld| {
            if tied && !ld.ckpt.contains("lm_head.weight") {
                return Ok(embed);
            }
            let main = ld.tensor("lm_head.weight", &[v, h])?;
            let extra = (add > 0).then(|| ld.tensor("lm_head.additional_fc.weight", &[add, h])).transpose()?;
            Ok(join_rows(ld, main, extra, h))
        })?;
        Ok(Self {
            cfg: cfg.clone(),
            core: ModelCore::new(cfg.clone(), table),
            vision,
            resampler,
            cross,
            decoder,
            tokens: None,
        })
    }

    /// The image side for `images` images: `vision` (every token of the last layer) and, with
    /// the resampler, `perceiver`; `features` `[images * image_rows, vision width]`.
    fn image_phases(&self, g: &mut Graph, images: usize) -> Result<ImagePhases> {
        let vc = self.cfg.vision_config.clip();
        let pixels = g.buffer("pixels", images, 3 * vc.image_size * vc.image_size);

        // Vision: pixels -> last_hidden_state (CLS and patches)      [I*T, D]
        let req = VisionRequest { hidden_states: vec![vc.num_hidden_layers], skip_rows: 0, pooled: false };
        let hidden = self.vision.emit(g, "vision", pixels, images, &req)?.hidden_states[0];
        let mut phases = vec![g.take_phase("vision")];

        // Perceiver: latents attend over [tokens; latents] per image  [I*n, D]
        let features = match &self.resampler {
            Some(r) => {
                let out = r.emit(g, hidden, images, vc.num_positions());
                phases.push(g.take_phase("perceiver"));
                out
            }
            None => hidden,
        };
        Ok(ImagePhases { pixels, hidden, features, phases })
    }
}

fn load_cross_layer(cfg: &IdeficsConfig, ld: &mut Loader, l: &str) -> Result<GatedCrossLayer> {
    let t = &cfg.text;
    let (h, heads, inter) = (t.hidden_size, t.num_attention_heads, t.intermediate_size);
    let head_dim = h / heads;
    let eps = t.rms_norm_eps as f32;
    let rms = |ld: &mut Loader, name: String, dim: usize| -> Result<NormLayer> {
        Ok(NormLayer::RmsNorm { weight: ld.tensor(&name, &[dim])?, eps })
    };
    let names = ["q_proj", "k_proj", "v_proj", "o_proj"].map(|n| format!("{l}.cross_attn.{n}"));
    // IdeficsAttention.scaling = head_dim ** -0.5 (a Python float): `mha`'s.
    let spec = AttnSpec {
        kv_in: cfg.vision_config.embed_dim,
        ..AttnSpec::mha(names.each_ref().map(String::as_str), h, heads, head_dim)
    };
    let mut cross_attn = load_attention(ld, &spec)?;
    if cfg.qk_layer_norms {
        cross_attn.qk_norm = Some(HeadNorms {
            q: rms(ld, format!("{l}.cross_attn.q_layer_norm.weight"), head_dim)?,
            k: rms(ld, format!("{l}.cross_attn.k_layer_norm.weight"), head_dim)?,
        });
    }
    let alpha_shape: &[usize] = match cfg.alpha_type {
        AlphaType::Float => &[1],
        AlphaType::Vector => &[1, 1, h],
    };
    let mlp = |ld: &mut Loader, name: &str, din, dout| ld.linear(&format!("{l}.mlp.{name}"), din, dout, false);
    Ok(GatedCrossLayer {
        input_layernorm: rms(ld, format!("{l}.input_layernorm.weight"), h)?,
        cross_attn,
        alpha_cross_attn: ld.tensor(&format!("{l}.alpha_cross_attn"), alpha_shape)?,
        post_attention_layernorm: rms(ld, format!("{l}.post_attention_layernorm.weight"), h)?,
        mlp: GatedMlp {
            gate: mlp(ld, "gate_proj", h, inter)?,
            up: mlp(ld, "up_proj", h, inter)?,
            down: mlp(ld, "down_proj", inter, h)?,
            act: Activation::Silu,
        },
        alpha_dense: ld.tensor(&format!("{l}.alpha_dense"), alpha_shape)?,
    })
}

/// The image side in a graph.
struct ImagePhases {
    pixels: Buf,
    /// The vision tower's last hidden state (a plan output for tests).
    hidden: Buf,
    /// What the cross-attention reads: the resampler's output or `hidden`.
    features: Buf,
    phases: Vec<Phase>,
}

/// Buffers one pass's gated cross-attention blocks share.
struct CrossScratch {
    attn: AttnScratch,
    out: Buf,
    gated: GatedScratch,
}

/// The gated cross-attention blocks of one decoder pass, emitted before every
/// `interval`-th LLaMA layer ([`LayerHook`]).
struct CrossBlocks<'a> {
    layers: &'a [GatedCrossLayer],
    interval: usize,
    /// Per block: the images' keys and values, `kv_len` rows per sequence.
    kv: &'a [(Buf, Buf)],
    kv_len: usize,
    /// `[rows, kv_len]`: each token's row of the additive image mask.
    mask: Buf,
    scratch: CrossScratch,
}

impl LayerHook for CrossBlocks<'_> {
    fn before_layer(&self, g: &mut Graph, at: &LayerInput<'_>) {
        if at.layer % self.interval != 0 {
            return;
        }
        let (l, (k, v)) = (&self.layers[at.layer / self.interval], self.kv[at.layer / self.interval]);
        let (x, normed, rows, seq) = (at.x, at.normed, at.rows, at.pass.seq);
        let s = &self.scratch;
        // x += tanh(alpha_cross_attn) * o_proj(attn(q(RMS(x)), K, V)), on rows that see an image
        l.input_layernorm.emit(g, x, None, normed, rows);
        let keys = Keys::Projected { k, v, kv_len: self.kv_len };
        let call = AttnCall { key_mask: Some(self.mask), mask_per_query: true, ..AttnCall::new(rows / seq, seq, keys) };
        l.cross_attn.attend(g, &s.attn, normed, &call);
        linear(g, &l.cross_attn.out, s.attn.ctx, Activation::None, None, s.out, rows);
        g.push(Op::GatedAdd { x: s.out, alpha: l.alpha_cross_attn, mask: Some(self.mask), out: x, rows });
        // x += tanh(alpha_dense) * down(silu(gate(RMS(x))) * up(RMS(x))), on every row
        l.post_attention_layernorm.emit(g, x, None, normed, rows);
        l.mlp.project(g, normed, &s.gated, s.out, rows);
        g.push(Op::GatedAdd { x: s.out, alpha: l.alpha_dense, mask: None, out: x, rows });
    }
}

/// The LLaMA decoder with the cross-attention blocks of its prefill and decode passes.
struct IdeficsDecoder<'a> {
    llama: &'a LlamaDecoder,
    prefill: CrossBlocks<'a>,
    decode: CrossBlocks<'a>,
}

impl CausalDecoder for IdeficsDecoder<'_> {
    fn kv_cache(&self, g: &mut Graph, batch: usize, capacity: usize) -> KvCache {
        self.llama.kv_cache(g, batch, capacity)
    }
    fn build(&self, g: &mut Graph, cache: &KvCache, pass: &PassSpec<'_>) -> DecoderPass {
        let blocks = if pass.tag == PassSpec::decode(None).tag { &self.decode } else { &self.prefill };
        self.llama.build_with(g, cache, pass, Some(blocks))
    }
    fn max_positions(&self) -> usize {
        self.llama.max_positions()
    }
}

impl Family for Idefics {
    core_accessors!();

    fn image_size(&self) -> usize {
        self.cfg.vision_config.image_size
    }

    fn max_positions(&self) -> usize {
        self.decoder.max_positions()
    }

    fn default_options(&self) -> GenerateOptions {
        self.cfg.text.generate_options()
    }

    fn bind_tokenizer(&mut self, tokenizer: &crate::tokenizer::Tokenizer) -> Result<()> {
        let total = self.cfg.total_vocab();
        let id = |token: &str| -> Result<u32> {
            match tokenizer.token_to_id(token) {
                Some(id) if (id as usize) < total => Ok(id),
                Some(id) => Err(Error::InvalidInput(format!(
                    "the tokenizer's `{token}` is id {id}, past the model's {total} ids (vocab_size + additional_vocab_size in config.json): use the checkpoint's own tokenizer"
                ))),
                None => Err(Error::InvalidInput(format!(
                    "the tokenizer has no `{token}` token, which IDEFICS prompts put around each image: use the checkpoint's own tokenizer"
                ))),
            }
        };
        id(processor::FAKE_TOKEN)?;
        let bos = tokenizer.bos_token().ok_or_else(|| {
            Error::InvalidInput(
                "the tokenizer has no bos_token (tokenizer_config.json), which IdeficsProcessor writes at the start of every prompt"
                    .into(),
            )
        })?;
        self.tokens =
            Some(Tokens { bos: bos.to_string(), image: id(processor::IMAGE_TOKEN)?, eos: tokenizer.eos_token_id() });
        Ok(())
    }

    fn processor_prompt(&self, prompt: PromptText<'_>, images: usize) -> Option<Result<String>> {
        let Some(t) = &self.tokens else {
            return Some(Err(Error::InvalidInput(
                "IDEFICS prompts need the model's tokenizer: load the model folder".into(),
            )));
        };
        let items = match prompt {
            PromptText::Caption => vec![Item::Image],
            PromptText::Question(q) => processor::question_items(q, images),
            PromptText::Raw(text) => processor::split_prompt(text),
        };
        Some(Ok(processor::prompt_text(&t.bos, &items)))
    }

    fn image_plan(&self, images: usize) -> Result<Option<ImagePlan>> {
        let mut g = Graph::new();
        let img = self.image_phases(&mut g, images)?;
        let stage = ImageStage::new(&img.phases, img.pixels, img.features, self.cfg.image_rows());
        Ok(Some(stage.into_plan(g, images, img.phases)))
    }

    /// `shape.images` counts every sequence's images, the same number per sequence.
    fn build_plan(&self, shape: &PlanShape) -> Result<Plan> {
        shape.image_only()?;
        let (images, sequences) = (shape.images, shape.sequences);
        if images == 0 || sequences == 0 || images % sequences != 0 {
            return Err(Error::InvalidInput(format!(
                "IDEFICS plans take the same number of images (at least one) per sequence: {images} images for {sequences} sequences"
            )));
        }
        let tokens = self.tokens.clone().ok_or_else(|| {
            Error::InvalidInput(
                "IDEFICS plans need the model's tokenizer (its <image> id): load the model folder".into(),
            )
        })?;
        let (per_seq, rows) = (images / sequences, self.cfg.image_rows());
        let (kv_len, h) = (per_seq * rows, self.cfg.text.hidden_size);
        let capacity = kv_capacity(
            shape.prompt_len,
            shape.max_new_tokens,
            self.decoder.max_positions(),
            "the prompt",
            "use a shorter prompt or fewer new tokens",
        )?;
        let mut g = Graph::new();
        let img = self.image_phases(&mut g, images)?;
        let stage = ImageStage::new(&img.phases, img.pixels, img.features, rows);

        // Cross-attention keys and values of every image, once per request    [S*kv_len, H] per block
        let kv: Vec<(Buf, Buf)> = self
            .cross
            .iter()
            .enumerate()
            .map(|(c, l)| {
                let (k, v) = (
                    g.buffer(format!("cross.{c}.k"), images * rows, h),
                    g.buffer(format!("cross.{c}.v"), images * rows, h),
                );
                l.cross_attn.project_kv(&mut g, img.features, k, v, images * rows);
                (k, v)
            })
            .collect();
        let mut phases = img.phases;
        phases.push(g.take_phase("cross_kv"));

        let prefill_rows = sequences * shape.prompt_len;
        let masks =
            [g.buffer("cross.prefill_mask", prefill_rows, kv_len), g.buffer("cross.decode_mask", sequences, kv_len)];
        let inter = self.cfg.text.intermediate_size;
        let blocks = |g: &mut Graph, tag: &str, rows: usize, mask: Buf| {
            let scratch = CrossScratch {
                attn: self.cross[0].cross_attn.scratch(g, &format!("{tag}.cross"), rows, 1),
                out: g.buffer(format!("{tag}.cross.out"), rows, h),
                gated: GatedScratch {
                    gate: g.buffer(format!("{tag}.cross.gate"), rows, inter),
                    up: g.buffer(format!("{tag}.cross.up"), rows, inter),
                    hidden: g.buffer(format!("{tag}.cross.mlp"), rows, inter),
                },
            };
            CrossBlocks { layers: &self.cross, interval: self.cfg.cross_layer_interval, kv: &kv, kv_len, mask, scratch }
        };
        let decoder = IdeficsDecoder {
            llama: &self.decoder,
            prefill: blocks(&mut g, "prefill", prefill_rows, masks[0]),
            decode: blocks(&mut g, "decode", sequences, masks[1]),
        };
        let prompt = PrefillSpec {
            prompt_len: shape.prompt_len,
            image: None,
            padded: true,
            all_logits: shape.all_prefill_logits,
        };
        let mut outputs = vec![("vision", img.hidden)];
        if self.resampler.is_some() {
            outputs.push(("resampler", img.features));
        }
        let encoders = Encoders { inputs: vec![("pixels", img.pixels)], phases, outputs, image_stage: Some(stage) };
        let mut plan = decoder.plan(g, sequences, capacity, shape.max_new_tokens, prompt, encoders);

        // The masks, from each sequence's prompt tokens: a row per prompt token, and the last
        // one again for the decode steps.
        let index = move |seq: &[u32]| processor::image_index(seq, tokens.image, tokens.eos, per_seq);
        let prefill = index;
        plan.prompt_inputs = vec![
            PromptInput {
                buf: masks[0],
                fill: Box::new(move |ids: &[u32], len: usize| {
                    ids.chunks(len.max(1))
                        .flat_map(prefill)
                        .flat_map(|i| processor::mask_row(i, per_seq, rows))
                        .collect()
                }),
            },
            PromptInput {
                buf: masks[1],
                fill: Box::new(move |ids: &[u32], len: usize| {
                    ids.chunks(len.max(1))
                        .map(|seq| index(seq).last().copied().unwrap_or(-1))
                        .flat_map(|i| processor::mask_row(i, per_seq, rows))
                        .collect()
                }),
            },
        ];
        Ok(plan)
    }

    /// Every image fills one `<image>` token of its sequence's prompt.
    fn sequences_for(&self, images: usize, input_ids: &[u32]) -> Result<usize> {
        let image = self.tokens.as_ref().map_or(u32::MAX, |t| t.image);
        let fix = "give one image per <image> of the prompt";
        image_token_sequences(input_ids, image, 1, images, "image", fix)
    }

    fn describe(&self) -> Vec<String> {
        let c = &self.cfg;
        let resampler = if c.use_resampler {
            let p = &c.perceiver_config;
            format!(
                "resampler:  {} latents, depth {}, {} heads x {}{}",
                p.resampler_n_latents,
                p.resampler_depth,
                p.resampler_n_heads,
                p.resampler_head_dim,
                if p.qk_layer_norms_perceiver { ", qk layer norms" } else { "" }
            )
        } else {
            format!("resampler:  none ({} vision tokens per image)", c.image_rows())
        };
        vec![
            "family:     IdeficsForVisionText2Text (Flamingo-style gated cross-attention)".into(),
            format!("vision:     {}", c.vision_config.clip().describe_sizes()),
            resampler,
            format!(
                "cross:      {} gated blocks (every {} layers), alpha {:?}{}, {} additional ids",
                c.cross_layers(),
                c.cross_layer_interval,
                c.alpha_type,
                if c.qk_layer_norms { ", qk layer norms" } else { "" },
                c.additional_vocab_size
            ),
            self.decoder.describe(),
        ]
    }
}
