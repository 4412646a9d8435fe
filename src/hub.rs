//! Resolving a model argument: a local folder, or a hub id (`Salesforce/blip2-opt-2.7b`) already
//! downloaded into the local Hugging Face cache. glimpse never downloads.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// A folder as given, or the cached snapshot of a hub id (`refs/main`, else the only snapshot).
/// Every failure says what was given, what was found and what to pass instead.
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    let local = Path::new(arg);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    if local.exists() {
        let folder = local.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        return Err(Error::InvalidInput(format!(
            "model `{arg}` is a file, not a folder: pass the model folder that holds config.json and the weights (e.g. `{}`)",
            folder.display()
        )));
    }
    let looks_like_id = arg.split('/').count() == 2 && !arg.starts_with('.') && !arg.starts_with('/');
    if looks_like_id {
        if let Some(cache) = cache_dir() {
            return cached_snapshot(arg, &cache);
        }
    }
    Err(Error::InvalidInput(format!(
        "model `{arg}`: no such folder; pass a model folder (holding config.json and the weights) or a hub id (org/name) already downloaded into the Hugging Face cache{}",
        if looks_like_id { " (no cache folder: set HF_HUB_CACHE or HF_HOME)" } else { "" }
    )))
}

/// The snapshot folder of hub id `id` in `cache`, laid out as huggingface_hub does:
/// `models--org--name/{refs/main, snapshots/<commit>/}`.
fn cached_snapshot(id: &str, cache: &Path) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let download = format!("download it with `hf download {id}` (huggingface_hub's CLI), or pass a model folder");
    if !repo.is_dir() {
        return Err(Error::InvalidInput(format!(
            "model `{id}`: not a folder, and not in the Hugging Face cache ({}); {download}",
            cache.display()
        )));
    }
    let snapshots = repo.join("snapshots");
    let main = std::fs::read_to_string(repo.join("refs/main")).ok().map(|h| h.trim().to_string());
    if let Some(hash) = &main {
        let dir = snapshots.join(hash);
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let mut found: Vec<String> = std::fs::read_dir(&snapshots)
        .map(|rd| rd.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    found.sort();
    let main_note = match &main {
        Some(hash) => format!("refs/main names snapshot {hash}, which is missing"),
        None => "there is no refs/main to pick one".to_string(),
    };
    match found.len() {
        1 => Ok(snapshots.join(&found[0])),
        0 => Err(Error::InvalidInput(format!(
            "model `{id}`: the Hugging Face cache has {} but no snapshot in it; {download}",
            repo.display()
        ))),
        n => Err(Error::InvalidInput(format!(
            "model `{id}`: the Hugging Face cache holds {n} snapshots in {} ({}) and {main_note}; pass the snapshot folder you want instead, e.g. `{}`",
            snapshots.display(),
            found.join(", "),
            snapshots.join(&found[0]).display()
        ))),
    }
}
