//! SmolVLM and Idefics3 (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`;
//! issue 31). So far the processor: image tiling and pixel values bit for bit as transformers
//! 5.17, and the prompt each `<image>` expands to. The model (vision transformer, pixel-shuffle
//! connector, LLaMA decoder) and its registry entry come next; until then no checkpoint loads as
//! this family.

pub mod processor;
