//! CLIP's vision tower (`CLIPVisionTransformer`, transformers 5.17): bias-free patch embedding,
//! class + learned position embeddings, `pre_layrnorm`, pre-norm encoder layers (separate
//! q/k/v/out projections with bias, quick_gelu MLP) and `post_layernorm` on the pooled CLS row.
//! Shared by LLaVA (which reads an intermediate hidden state) and CLIPModel (pooled output).

use half::f16;

use super::family::Loader;
use super::layers::{
    load_attention, load_mlp, pre_norm, AttentionLayer, AttnCall, AttnScratch, AttnSpec, Keys, Mlp, NormLayer,
};
use serde::Deserialize;

use crate::config::{check_activation, check_eps, check_heads, check_patches, check_positive};
use crate::error::{Error, Result};
use crate::graph::{Buf, Graph, Op, RowSelect, W};
use crate::weights::{Checkpoint, Weight};

/// `vision_config` of a CLIP vision tower (`CLIPVisionConfig`, 5.17 defaults: ViT-B/32).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    pub projection_dim: usize,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 224,
            patch_size: 32,
            num_channels: 3,
            layer_norm_eps: 1e-5,
            hidden_act: "quick_gelu".into(),
            projection_dim: 512,
        }
    }
}

impl ClipVisionConfig {
    /// LlavaConfig's vision tower when config.json has no `vision_config` (CLIP ViT-L/14-336).
    pub fn llava_default() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            image_size: 336,
            patch_size: 14,
            projection_dim: 768,
            ..Self::default()
        }
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Patches plus the class token.
    pub fn num_positions(&self) -> usize {
        self.patches_per_side() * self.patches_per_side() + 1
    }

    /// The tower's sizes for `describe` lines (CLIP and LLaVA print the same).
    pub fn describe_sizes(&self) -> String {
        let layers = self.layer_dims().describe(self.num_hidden_layers);
        format!("{layers}, {}px / patch {} -> {} tokens", self.image_size, self.patch_size, self.num_positions())
    }

    /// The encoder layers' shapes.
    pub(crate) fn layer_dims(&self) -> ClipLayerDims {
        let (h, heads) = (self.hidden_size, self.num_attention_heads);
        ClipLayerDims::new(h, heads, self.intermediate_size, self.layer_norm_eps, self.activation())
    }

    /// Checks every field the tower reads; `section` prefixes field names (`vision_config`).
    pub fn check(&self, section: &str) -> Result<(), String> {
        check_heads(section, self.hidden_size, self.num_attention_heads)?;
        check_positive(&format!("{section}.intermediate_size"), self.intermediate_size)?;
        check_positive(&format!("{section}.num_hidden_layers"), self.num_hidden_layers)?;
        check_patches(section, self.image_size, self.patch_size, self.num_channels)?;
        check_eps(&format!("{section}.layer_norm_eps"), self.layer_norm_eps)?;
        check_activation(&format!("{section}.hidden_act"), &self.hidden_act, &["quick_gelu", "gelu", "gelu_python"])
    }

    /// The MLP activation (`check` has accepted the name).
    pub fn activation(&self) -> crate::graph::Activation {
        if self.hidden_act == "quick_gelu" {
            crate::graph::Activation::QuickGelu
        } else {
            crate::graph::Activation::Gelu
        }
    }
}

/// One `CLIPEncoderLayer` (both CLIP towers): pre-norm self-attention with separate biased
/// q/k/v/out projections, then a pre-norm MLP.
pub(crate) struct ClipLayer {
    layer_norm1: NormLayer,
    self_attn: AttentionLayer,
    layer_norm2: NormLayer,
    mlp: Mlp,
}

/// The shapes of a CLIP tower's encoder layers.
pub(crate) struct ClipLayerDims {
    pub hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub eps: f64,
    pub act: crate::graph::Activation,
}

impl ClipLayerDims {
    /// Layers `hidden` wide, split into `heads` heads of `hidden / heads`.
    pub fn new(hidden: usize, heads: usize, intermediate: usize, eps: f64, act: crate::graph::Activation) -> Self {
        Self { hidden, heads, head_dim: hidden / heads, intermediate, eps, act }
    }

    /// `{layers} layers, hidden .., .. heads x .., mlp ..`, the start of a tower's `describe` line.
    pub fn describe(&self, layers: usize) -> String {
        format!(
            "{layers} layers, hidden {}, {} heads x {}, mlp {}",
            self.hidden, self.heads, self.head_dim, self.intermediate
        )
    }
}

/// Loads `{prefix}encoder.layers.{0..count}`.
pub(crate) fn load_layers(ld: &mut Loader, prefix: &str, count: usize, c: &ClipLayerDims) -> Result<Vec<ClipLayer>> {
    (0..count)
        .map(|i| {
            let l = format!("{prefix}encoder.layers.{i}");
            let names = ["q_proj", "k_proj", "v_proj", "out_proj"].map(|n| format!("{l}.self_attn.{n}"));
            let spec = AttnSpec {
                bias: true,
                scale: (c.head_dim as f32).powf(-0.5),
                ..AttnSpec::mha(names.each_ref().map(String::as_str), c.hidden, c.heads, c.head_dim)
            };
            let (fc1, fc2) = (format!("{l}.mlp.fc1"), format!("{l}.mlp.fc2"));
            Ok(ClipLayer {
                layer_norm1: ld.norm(&format!("{l}.layer_norm1"), c.hidden, c.eps)?.into(),
                self_attn: load_attention(ld, &spec)?,
                layer_norm2: ld.norm(&format!("{l}.layer_norm2"), c.hidden, c.eps)?.into(),
                mlp: load_mlp(ld, &fc1, &fc2, c.hidden, c.intermediate, true, c.act)?,
            })
        })
        .collect()
}

/// The residual stream `x` and the scratch one tower's layers share.
pub(crate) struct LayerBufs {
    pub x: Buf,
    pub normed: Buf,
    pub mlp: Buf,
    pub rows: usize,
}

impl ClipLayer {
    /// Attention scratch for `rows` rows attending over themselves (tagged `{tag}.`).
    pub(crate) fn scratch(&self, g: &mut Graph, tag: &str, rows: usize) -> AttnScratch {
        self.self_attn.scratch(g, tag, rows, rows)
    }

    /// `x += out_proj(attn(LN1(x)))`, then `x += fc2(act(fc1(LN2(x))))`.
    pub(crate) fn emit(&self, g: &mut Graph, s: &AttnScratch, b: &LayerBufs, call: &AttnCall) {
        pre_norm(g, &self.layer_norm1, b.x, b.normed, b.rows, |g, h, r| self.self_attn.emit(g, s, h, call, r));
        pre_norm(g, &self.layer_norm2, b.x, b.normed, b.rows, |g, h, r| self.mlp.emit(g, h, b.mlp, r, b.rows));
    }
}

/// A loaded CLIP vision tower (possibly only its first layers, see [`ClipVision::load`]).
pub struct ClipVision {
    pub cfg: ClipVisionConfig,
    patch_weight: W,
    /// Zeros: the graph's patch embedding always adds a bias, CLIP's conv has none.
    patch_bias: W,
    class_embedding: W,
    position_embedding: W,
    pre_layrnorm: NormLayer,
    layers: Vec<ClipLayer>,
    post_layernorm: Option<NormLayer>,
}

/// What [`ClipVision::emit`] computes.
#[derive(Debug, Clone, Default)]
pub struct VisionRequest {
    /// `hidden_states` indices to return (0 = embeddings after `pre_layrnorm`, i = output of
    /// layer i; see [`resolve_layer`]). Layers past the largest index (and past the pooled
    /// output's need) are not run.
    pub hidden_states: Vec<usize>,
    /// Rows dropped at the start of every image in the returned hidden states (1 drops CLS:
    /// LLaVA's "default" feature strategy).
    pub skip_rows: usize,
    /// Also compute `pooler_output` = `post_layernorm(last_hidden_state[:, 0])` (runs all layers).
    pub pooled: bool,
}

/// Buffers [`ClipVision::emit`] leaves its results in.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// One `[batch * (tokens - skip_rows), hidden]` buffer per requested hidden state, in order.
    pub hidden_states: Vec<Buf>,
    /// `[batch, hidden]` pooled output, when requested.
    pub pooled: Option<Buf>,
}

/// transformers' indexing of `hidden_states` (`num_layers + 1` entries): a negative index counts
/// from the end (-1 = last layer's output). `field` names the config field in errors.
pub fn resolve_layer(index: i64, num_layers: usize, field: &str) -> Result<usize, String> {
    let n = num_layers as i64 + 1;
    let i = if index < 0 { n + index } else { index };
    if !(0..n).contains(&i) {
        return Err(format!(
            "`{field}` is {index}: the vision tower has {num_layers} layers, so hidden states run from {} to {num_layers} (-1 is the last layer)",
            -n
        ));
    }
    Ok(i as usize)
}

/// The first of `candidates` (key prefixes ending in `.`, or "") under which `ckpt` holds a CLIP
/// vision tower (`{prefix}embeddings.class_embedding`).
pub fn find_prefix<'a>(ckpt: &Checkpoint, candidates: &[&'a str]) -> Option<&'a str> {
    candidates.iter().copied().find(|p| ckpt.contains(&format!("{p}embeddings.class_embedding")))
}

impl ClipVision {
    /// Loads the tower under `prefix` (e.g. `vision_tower.vision_model.`, `vision_model.`, or ""
    /// for a standalone `CLIPVisionModel` saved by 5.17). Only the first `layers` encoder layers
    /// are loaded (what the caller will run), and `post_layernorm` only with `post_layernorm`.
    pub fn load(
        cfg: &ClipVisionConfig,
        ld: &mut Loader,
        prefix: &str,
        layers: usize,
        post_layernorm: bool,
    ) -> Result<Self> {
        let (d, p) = (cfg.hidden_size, cfg.patch_size);
        let e = format!("{prefix}embeddings");
        let patch_weight = ld.tensor(&format!("{e}.patch_embedding.weight"), &[d, cfg.num_channels, p, p])?;
        let patch_bias =
            ld.table.add(format!("{e}.patch_embedding.bias (zeros)"), Weight::from_vec(vec![d], vec![f16::ZERO; d]));
        let class_embedding = ld.tensor(&format!("{e}.class_embedding"), &[d])?;
        let position_embedding = ld.tensor(&format!("{e}.position_embedding.weight"), &[cfg.num_positions(), d])?;
        let eps = cfg.layer_norm_eps;
        let pre_layrnorm = ld.norm(&format!("{prefix}pre_layrnorm"), d, eps)?.into();
        let layers = load_layers(ld, prefix, layers.min(cfg.num_hidden_layers), &cfg.layer_dims())?;
        let post_layernorm =
            if post_layernorm { Some(ld.norm(&format!("{prefix}post_layernorm"), d, eps)?.into()) } else { None };
        Ok(Self {
            cfg: cfg.clone(),
            patch_weight,
            patch_bias,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            post_layernorm,
        })
    }

    /// Tokens per image (patches + CLS).
    pub fn tokens(&self) -> usize {
        self.cfg.num_positions()
    }

    /// Emits the tower for `batch` images in `pixels` (`[batch, 3*S*S]`), buffers tagged `{tag}.`.
    /// Errors when the request needs a layer or the post layer norm that was not loaded.
    pub fn emit(
        &self,
        g: &mut Graph,
        tag: &str,
        pixels: Buf,
        batch: usize,
        req: &VisionRequest,
    ) -> Result<VisionOutput> {
        let c = &self.cfg;
        let (d, tokens) = (c.hidden_size, self.tokens());
        let rows = batch * tokens;
        let run = if req.pooled { c.num_hidden_layers } else { req.hidden_states.iter().copied().max().unwrap_or(0) };
        if run > self.layers.len() || (req.pooled && self.post_layernorm.is_none()) {
            return Err(Error::InvalidInput(format!(
                "the CLIP vision tower was loaded with {} of {} layers{}, but the request needs {run}{}",
                self.layers.len(),
                c.num_hidden_layers,
                if self.post_layernorm.is_some() { "" } else { " and no post_layernorm" },
                if req.pooled { " and the pooled output" } else { "" }
            )));
        }
        if req.skip_rows >= tokens {
            return Err(Error::InvalidInput(format!("skip_rows {} leaves none of {tokens} tokens", req.skip_rows)));
        }
        let embeds = g.buffer(format!("{tag}.embeds"), rows, d);
        let x = g.buffer(format!("{tag}.residual"), rows, d);
        let h = g.buffer(format!("{tag}.normed"), rows, d);
        let mlp = g.buffer(format!("{tag}.mlp"), rows, c.intermediate_size);
        let mut taps: Vec<Option<Buf>> = vec![None; req.hidden_states.len()];
        let tap = |g: &mut Graph, taps: &mut Vec<Option<Buf>>, index: usize| {
            for (slot, _) in req.hidden_states.iter().enumerate().filter(|&(_, &i)| i == index) {
                let out = g.buffer(format!("{tag}.hidden_states.{index}"), batch * (tokens - req.skip_rows), d);
                g.push(Op::SelectRows {
                    x,
                    out,
                    batch,
                    rows_per_batch: tokens,
                    select: RowSelect::Skip(req.skip_rows),
                });
                taps[slot] = Some(out);
            }
        };

        // x = pre_layrnorm([cls; conv(pixels)] + positions)     [B*T, D]
        g.push(Op::PatchEmbed {
            pixels,
            weight: self.patch_weight,
            bias: self.patch_bias,
            class: Some(self.class_embedding),
            positions: self.position_embedding,
            out: embeds,
            batch,
            image_size: c.image_size,
            patch: c.patch_size,
        });
        self.pre_layrnorm.emit(g, embeds, None, x, rows);
        tap(g, &mut taps, 0);
        let call = AttnCall::new(batch, tokens, Keys::Same);
        let bufs = LayerBufs { x, normed: h, mlp, rows };
        let mut scratch = None;
        for (i, l) in self.layers[..run].iter().enumerate() {
            let s = *scratch.get_or_insert_with(|| l.scratch(g, tag, rows));
            // x += out_proj(attention(LN1(x))); x += fc2(quick_gelu(fc1(LN2(x))))
            l.emit(g, &s, &bufs, &call);
            tap(g, &mut taps, i + 1);
        }
        let pooled = match (&self.post_layernorm, req.pooled) {
            (Some(norm), true) => {
                let cls = g.buffer(format!("{tag}.cls"), batch, d);
                g.push(Op::SelectRows { x, out: cls, batch, rows_per_batch: tokens, select: RowSelect::Row(0) });
                let pooled = g.buffer(format!("{tag}.pooled"), batch, d);
                norm.emit(g, cls, None, pooled, batch);
                Some(pooled)
            }
            _ => None,
        };
        Ok(VisionOutput {
            hidden_states: taps.into_iter().map(|t| t.expect("every index <= run is tapped")).collect(),
            pooled,
        })
    }
}
