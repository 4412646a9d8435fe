//! `glimpse info`: what a model folder holds, once it has passed every check a load makes.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use crate::api::{Device, Model};
use crate::error::{Error, Result};
use crate::weights::{Checkpoint, NonFinite};

/// A human-readable description of a model folder. The folder is first loaded (on the CPU) by
/// the same [`Model::load`] that `caption` uses, so a model `info` describes is one that loads.
pub fn describe(dir: &Path) -> Result<String> {
    describe_with(dir, false).map(|(text, _)| text)
}

/// [`describe`], and with `check_weights` every weight read for NaN and infinite values
/// ([`Checkpoint::non_finite`]): the description then ends with a `weights:` line (and one line
/// per such tensor), and they are returned.
pub fn describe_with(dir: &Path, check_weights: bool) -> Result<(String, Vec<NonFinite>)> {
    let config = crate::models::ModelConfig::load(&dir.join("config.json"))?;
    let family_lines = if config.embeds() {
        crate::api::EmbedModel::load(dir, Device::Cpu)?.family.describe()
    } else {
        Model::load(dir, Device::Cpu)?.family.describe()
    };
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
    let mut s = String::new();
    let _ = writeln!(s, "model:      {}", dir.display());
    for line in family_lines {
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(s, "parameters: {} ({:.2} B)", params, params as f64 / 1e9);
    let dtypes: Vec<String> = by_dtype.iter().map(|(d, n)| format!("{d} {n}")).collect();
    let _ = writeln!(s, "dtypes:     {}", dtypes.join(", "));
    let _ = write!(
        s,
        "on disk:    {:.1} MB ({} tensors in {})",
        disk as f64 / 1e6,
        ckpt.names().count(),
        ckpt.origin().display()
    );
    if !check_weights {
        return Ok((s, Vec::new()));
    }
    let start = std::time::Instant::now();
    let found = ckpt.non_finite();
    let (secs, gb) = (start.elapsed().as_secs_f64(), ckpt.data_bytes() as f64 / 1e9);
    let checked = format!("{} tensors ({gb:.2} GB) read in {secs:.1} s", ckpt.names().count());
    if found.is_empty() {
        let _ = write!(s, "\nweights:    all finite ({checked})");
    } else {
        let plural = if found.len() == 1 { "" } else { "s" };
        let _ = write!(s, "\nweights:    NaN or infinite values in {} tensor{plural} ({checked}):", found.len());
        for t in &found {
            let _ = write!(s, "\n            {t}");
        }
    }
    Ok((s, found))
}
