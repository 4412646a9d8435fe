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
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    let local = Path::new(arg);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    let looks_like_id = arg.split('/').count() == 2 && !arg.starts_with('.') && !arg.starts_with('/');
    if looks_like_id {
        if let Some(cache) = cache_dir() {
            let repo = cache.join(format!("models--{}", arg.replace('/', "--")));
            if let Some(snapshot) = snapshot_of(&repo) {
                return Ok(snapshot);
            }
            return Err(Error::MissingFile {
                path: local.to_path_buf(),
                hint: format!(
                    ": not a folder, and `{arg}` is not in the Hugging Face cache ({}); download it first, e.g. `huggingface-cli download {arg}`",
                    cache.display()
                ),
            });
        }
    }
    Err(Error::MissingFile { path: local.to_path_buf(), hint: " (expected a model folder or a cached hub id)".into() })
}

fn snapshot_of(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(hash) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(hash.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots).ok()?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    (dirs.len() == 1).then(|| dirs.remove(0))
}
