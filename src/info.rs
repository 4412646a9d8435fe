//! `glimpse info`: what a model folder holds, once it has passed every check a load makes.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use crate::api::{Device, Model};
use crate::error::{Error, Result};
use crate::weights::Checkpoint;

/// A human-readable description of a model folder. The folder is first loaded (on the CPU) by
/// the same [`Model::load`] that `caption` uses, so a model `info` describes is one that loads.
pub fn describe(dir: &Path) -> Result<String> {
    let model = Model::load(dir, Device::Cpu)?;
    let cfg = &model.blip2.cfg;
    let ckpt = Checkpoint::open_dir(dir)?;
    let mut params = 0usize;
    let mut by_dtype: BTreeMap<&str, usize> = BTreeMap::new();
    for name in ckpt.names() {
        let Some(info) = ckpt.info(name) else { continue };
        params += info.numel();
        *by_dtype.entry(info.dtype.name()).or_default() += info.numel();
    }
    let mut disk = 0u64;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        disk += std::fs::metadata(entry.path()).map(|m| if m.is_file() { m.len() } else { 0 }).unwrap_or(0);
    }
    let (v, q, t) = (&cfg.vision_config, &cfg.qformer_config, &cfg.text_config);
    let mut s = String::new();
    let _ = writeln!(s, "model:      {}", dir.display());
    let _ = writeln!(s, "family:     BLIP-2 (Blip2ForConditionalGeneration) with an OPT decoder");
    let _ = writeln!(
        s,
        "vision:     {} layers, hidden {}, {} heads x {}, mlp {}, {}px / patch {} -> {} tokens",
        v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.head_dim(), v.intermediate_size, v.image_size, v.patch_size, v.num_positions()
    );
    let _ = writeln!(
        s,
        "q-former:   {} layers, hidden {}, {} heads x {}, cross-attention every {} layers, {} queries",
        q.num_hidden_layers, q.hidden_size, q.num_attention_heads, q.head_dim(), q.cross_attention_frequency, cfg.num_query_tokens
    );
    let _ = writeln!(
        s,
        "decoder:    OPT, {} layers, hidden {}, {} heads x {}, ffn {}, vocab {}, {} positions",
        t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.head_dim(), t.ffn_dim, t.vocab_size, t.max_position_embeddings
    );
    let _ = writeln!(s, "parameters: {} ({:.2} B)", params, params as f64 / 1e9);
    let dtypes: Vec<String> = by_dtype.iter().map(|(d, n)| format!("{d} {n}")).collect();
    let _ = writeln!(s, "dtypes:     {}", dtypes.join(", "));
    let _ = write!(s, "on disk:    {:.1} MB ({} tensors in {})", disk as f64 / 1e6, ckpt.names().count(), ckpt.origin().display());
    Ok(s)
}
