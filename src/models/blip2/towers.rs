//! BLIP-2's image side, the same for its OPT and T5 language models: the vision encoder, the
//! Q-Former and `language_projection` into the language model's width, and the phases they run.

use super::config::Blip2Config;
use crate::error::Result;
use crate::generate::{Encoders, ImagePlan, ImageStage};
use crate::graph::{Buf, Fused, Graph, Linear, Phase};
use crate::models::family::Loader;
use crate::models::qformer::QFormer;
use crate::models::vit::VisionModel;

/// The three weights-holding towers between the pixels and the language model.
pub struct BlipTowers {
    pub vision: VisionModel,
    pub qformer: QFormer,
    pub language_projection: Linear,
}

/// The image side shared by BLIP-2's OPT and T5 variants: pixels -> vision encoder -> Q-Former
/// -> `language_projection`, as the phases `vision` and `qformer`.
pub struct ImagePhases {
    /// `[batch, 3*S*S]` host input.
    pub pixels: Buf,
    /// `[batch*positions, vision hidden]`.
    pub vision_out: Buf,
    /// `[batch*queries, qformer hidden]`.
    pub qformer_out: Buf,
    /// `[batch*queries, text hidden]`: what replaces the image tokens' embeddings.
    pub image_embeds: Buf,
    pub phases: Vec<Phase>,
    /// Query tokens per image: rows of `image_embeds` per image.
    pub queries: usize,
}

impl ImagePhases {
    /// The plan's encoders: the pixels in, the two phases, the outputs tests read.
    pub fn encoders(self) -> Encoders {
        let image_stage = Some(self.stage());
        Encoders {
            image_stage,
            inputs: vec![("pixels", self.pixels)],
            phases: self.phases,
            outputs: vec![
                ("vision_out", self.vision_out),
                ("qformer_out", self.qformer_out),
                ("image_embeds", self.image_embeds),
            ],
        }
    }

    /// Both phases read the pixels alone: `image_embeds` is what an image cache keeps.
    pub fn stage(&self) -> ImageStage {
        ImageStage::new(&self.phases, self.pixels, self.image_embeds, self.queries)
    }

    /// The phases alone, in their graph `g`.
    pub fn into_image_plan(self, g: Graph, images: usize) -> ImagePlan {
        self.stage().into_plan(g, images, self.phases)
    }
}

impl BlipTowers {
    /// Loads the three from `vision_model.*`, `qformer.*` and `language_projection.*`;
    /// `text_hidden` is the language model's width the projection maps to.
    pub fn load(cfg: &Blip2Config, ld: &mut Loader, text_hidden: usize) -> Result<Self> {
        Ok(Self {
            vision: VisionModel::load(&cfg.vision_config, ld, "vision_model")?,
            qformer: QFormer::load(&cfg.qformer_config, cfg.num_query_tokens, ld, "qformer")?,
            language_projection: ld.linear("language_projection", cfg.qformer_config.hidden_size, text_hidden, true)?,
        })
    }

    /// The phases `vision` and `qformer` of `batch` images.
    pub fn build(&self, g: &mut Graph, cfg: &Blip2Config, batch: usize) -> ImagePhases {
        let (vision, qformer, projection) = (&self.vision, &self.qformer, &self.language_projection);
        let v = &cfg.vision_config;
        let pixels = g.buffer("pixels", batch, 3 * v.image_size * v.image_size);

        // Vision: pixels -> [B*257, Dv].
        let vision_out = vision.build(g, pixels, batch);
        let vision_phase = g.take_phase("vision");

        // Q-Former + projection: [B*257, Dv] -> [B*32, Dq] -> [B*32, Dt].
        let qformer_out = qformer.build(g, vision_out, batch, v.num_positions());
        let rows = batch * cfg.num_query_tokens;
        let image_embeds = g.buffer("image_embeds", rows, cfg.text_config.hidden_size());
        g.linear(qformer_out, projection.weight, projection.bias, Fused::NONE, image_embeds, rows);
        let qformer_phase = g.take_phase("qformer");
        ImagePhases {
            pixels,
            vision_out,
            qformer_out,
            image_embeds,
            phases: vec![vision_phase, qformer_phase],
            queries: cfg.num_query_tokens,
        }
    }

    /// The image phases of `images` images in a graph of their own (the image cache's).
    pub fn image_plan(&self, cfg: &Blip2Config, images: usize) -> ImagePlan {
        let mut g = Graph::new();
        let img = self.build(&mut g, cfg, images);
        img.into_image_plan(g, images)
    }
}
