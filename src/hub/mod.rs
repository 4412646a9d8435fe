//! Resolving a model argument: a local folder, or a hub id (`Salesforce/blip2-opt-2.7b`) that is
//! downloaded on first use into the shared Hugging Face cache, laid out exactly as huggingface_hub
//! lays it out (`models--org--name/{blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/<rev>}`)
//! so Python tools and glimpse share one copy.
//!
//! The download client is written here on top of `ureq` rather than taken from the `hf-hub` crate:
//! hf-hub's sync API verifies neither sizes nor the sha256 the hub publishes, reports 401/403/404
//! as bare HTTP errors, and its resume and locking differ from huggingface_hub's (`.incomplete`
//! blobs, `.locks/<repo>/<etag>.lock`), all of which the cache contract below needs.

mod download;
mod progress;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub use download::Fetched;

/// The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    hf_home().map(|h| h.join("hub"))
}

/// `$HF_HOME`, else `~/.cache/huggingface`.
fn hf_home() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface"))
}

/// How a hub id is resolved. `HubOptions::from_env()` reads the environment as huggingface_hub
/// does; the CLI then applies its flags on top.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// Branch, tag or commit hash.
    pub revision: String,
    /// Cache only: never touch the network (`HF_HUB_OFFLINE=1`, `--offline`).
    pub offline: bool,
    /// Progress bars on stderr (drawn only when stderr is a terminal).
    pub progress: bool,
    /// `$HF_ENDPOINT`, else `https://huggingface.co`, without a trailing slash.
    pub endpoint: String,
    /// `$HF_TOKEN`, else the token file (`$HF_TOKEN_PATH`, else `$HF_HOME/token`).
    pub token: Option<String>,
    /// The cache folder (see [`cache_dir`]); `None` when no folder can be named.
    pub cache: Option<PathBuf>,
    /// How long the revision listing may take when a cached snapshot can serve instead
    /// (`$HF_HUB_ETAG_TIMEOUT` seconds, default 10, as huggingface_hub's metadata requests): an
    /// unresponsive hub then delays a cached model by that long, not by the read timeout.
    pub metadata_timeout: std::time::Duration,
}

impl HubOptions {
    pub fn from_env() -> Self {
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.trim().is_empty());
        HubOptions {
            revision: "main".to_string(),
            offline: std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| is_true(&v)),
            progress: true,
            endpoint: endpoint
                .unwrap_or_else(|| "https://huggingface.co".to_string())
                .trim()
                .trim_end_matches('/')
                .to_string(),
            token: token_from_env(),
            cache: cache_dir(),
            metadata_timeout: std::time::Duration::from_secs_f64(
                std::env::var("HF_HUB_ETAG_TIMEOUT")
                    .ok()
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .unwrap_or(10.0)
                    .min(3600.0),
            ),
        }
    }
}

/// huggingface_hub's truthy environment values.
fn is_true(v: &str) -> bool {
    matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

fn token_from_env() -> Option<String> {
    if let Some(t) = std::env::var("HF_TOKEN").ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
        return Some(t);
    }
    let file = std::env::var_os("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| hf_home().map(|h| h.join("token")))?;
    crate::files::read_to_string(&file, 1 << 20).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// A folder as given, or the snapshot of a hub id, downloaded on first use unless offline
/// (`HF_HUB_OFFLINE`); all settings from the environment.
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    resolve_model_with(arg, &HubOptions::from_env())
}

/// As [`resolve_model`], with explicit options. Every failure says what was given, what was found
/// and what to do instead.
pub fn resolve_model_with(arg: &str, opts: &HubOptions) -> Result<PathBuf> {
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
    if !looks_like_id(arg) {
        return Err(Error::InvalidInput(format!(
            "model `{arg}`: no such folder, and not a hub id (org/name); pass a model folder (holding config.json and the weights) or a hub id such as Salesforce/blip2-opt-2.7b"
        )));
    }
    let Some(cache) = &opts.cache else {
        return Err(Error::InvalidInput(format!(
            "model `{arg}`: no folder for the Hugging Face cache (HOME is not set): set HF_HUB_CACHE or HF_HOME, or pass a model folder"
        )));
    };
    if opts.offline {
        return cached_snapshot(arg, &opts.revision, cache, true);
    }
    download::fetch(arg, opts, cache).map(|f| f.snapshot)
}

/// Downloads (or finds complete in the cache) what hub id `id` needs at `opts.revision`, for
/// `glimpse download`. Offline, a complete cached snapshot is the answer (as huggingface_hub's
/// `snapshot_download` offline); anything else fails.
pub fn download(id: &str, opts: &HubOptions) -> Result<Fetched> {
    if !looks_like_id(id) {
        return Err(Error::InvalidInput(format!(
            "`{id}` is not a hub id: pass org/name, e.g. Salesforce/blip2-opt-2.7b"
        )));
    }
    let cache = opts.cache.as_deref().ok_or_else(|| {
        Error::InvalidInput(
            "no folder for the Hugging Face cache (HOME is not set): set HF_HUB_CACHE or HF_HOME".to_string(),
        )
    })?;
    if opts.offline {
        let snapshot = cached_snapshot(id, &opts.revision, cache, true).ok().filter(|d| download::snapshot_complete(d));
        let Some(snapshot) = snapshot else {
            return Err(Error::InvalidInput(format!(
                "cannot download `{id}` while offline (HF_HUB_OFFLINE or --offline is set), and the cache holds no complete snapshot of it: unset it to download"
            )));
        };
        let commit = snapshot.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        return Ok(Fetched { snapshot, commit, downloaded: vec![], bytes: 0 });
    }
    download::fetch(id, opts, cache)
}

/// `org/name` with the hub's characters: letters, digits, `-`, `_`, `.`; no `..`, no leading `.`/`-`.
fn looks_like_id(arg: &str) -> bool {
    let parts: Vec<&str> = arg.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && !p.contains("..")
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// `models--org--name` under the cache.
fn repo_folder(id: &str, cache: &Path) -> PathBuf {
    cache.join(format!("models--{}", id.replace('/', "--")))
}

/// A 40-hex git commit hash.
fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached snapshot of `id` at `revision` (`refs/<revision>`, or the commit itself; for `main`
/// without a ref, the only snapshot), laid out as huggingface_hub does. `offline` says why the
/// network was not asked, for the error.
fn cached_snapshot(id: &str, revision: &str, cache: &Path, offline: bool) -> Result<PathBuf> {
    let repo = repo_folder(id, cache);
    let rev_flag = if revision == "main" { String::new() } else { format!(" --revision {revision}") };
    let get = if offline {
        format!("it is not downloaded and glimpse is offline (HF_HUB_OFFLINE or --offline): run `glimpse download {id}{rev_flag}` where the hub is reachable, or pass a model folder")
    } else {
        format!("run `glimpse download {id}{rev_flag}` where the hub is reachable, or pass a model folder")
    };
    if !repo.is_dir() {
        return Err(Error::InvalidInput(format!(
            "model `{id}`: not a folder, and not in the Hugging Face cache ({}); {get}",
            cache.display()
        )));
    }
    let snapshots = repo.join("snapshots");
    if is_commit(revision) {
        let dir = snapshots.join(revision);
        return if dir.is_dir() {
            Ok(dir)
        } else {
            Err(Error::InvalidInput(format!(
                "model `{id}`: commit {revision} is not in the Hugging Face cache ({}); {get}",
                snapshots.display()
            )))
        };
    }
    let ref_path = repo.join("refs").join(revision);
    let named = crate::files::read_to_string(&ref_path, 4096).ok().map(|h| h.trim().to_string());
    if let Some(hash) = &named {
        // Trusted only as a commit: a ref is a 40-hex hash naming a folder of `snapshots`, never
        // a path (`../../outside`) that would load a model from outside the cache.
        if !is_commit(hash) {
            return Err(Error::InvalidInput(format!(
                "model `{id}`: {} holds `{}`, not a 40-hex commit: the cache entry is damaged; run `glimpse download {id}{rev_flag}` to repair it, or pass a model folder",
                ref_path.display(),
                hash.escape_debug()
            )));
        }
        let dir = snapshots.join(hash);
        if dir.is_dir() {
            return Ok(dir);
        }
        return Err(Error::InvalidInput(format!(
            "model `{id}`: refs/{revision} names snapshot {hash}, which is not in {}; {get}",
            snapshots.display()
        )));
    }
    if revision != "main" {
        return Err(Error::InvalidInput(format!(
            "model `{id}`: revision `{revision}` is not in the Hugging Face cache ({} has no refs/{revision}); {get}",
            repo.display(),
        )));
    }
    let mut found: Vec<String> = std::fs::read_dir(&snapshots)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    let main_note = "there is no refs/main to pick one";
    match found.len() {
        1 => Ok(snapshots.join(&found[0])),
        0 => Err(Error::InvalidInput(format!("model `{id}`: the Hugging Face cache has {} but no snapshot in it; {get}", repo.display()))),
        n => Err(Error::InvalidInput(format!(
            "model `{id}`: the Hugging Face cache holds {n} snapshots in {} ({}) and {main_note}; pass the snapshot folder you want instead, e.g. `{}`",
            snapshots.display(),
            found.join(", "),
            snapshots.join(&found[0]).display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        for ok in ["Salesforce/blip2-opt-2.7b", "a/b", "org_1/name.v2"] {
            assert!(looks_like_id(ok), "{ok}");
        }
        for bad in ["a", "a/b/c", "/abs", "./x", "../x/y", "a/..", "a/.git", "a b/c", "-a/b", "a/", "org/na%2fme"] {
            assert!(!looks_like_id(bad), "{bad}");
        }
    }

    #[test]
    fn truthy_offline_values() {
        for v in ["1", "on", "YES", "true "] {
            assert!(is_true(v), "{v}");
        }
        for v in ["0", "", "off", "no"] {
            assert!(!is_true(v), "{v}");
        }
    }
}
