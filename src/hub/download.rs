//! The hub protocol, as huggingface_hub speaks it: one listing
//! (`/api/models/{id}/revision/{rev}?blobs=true`: the commit, and each file's size, git blob id and
//! LFS sha256), then `/{id}/resolve/{commit}/{file}` per missing file (302 to a CDN for LFS files,
//! followed without the token unless on the same host). Each blob is fetched under
//! `.locks/models--org--name/<etag>.lock` into `blobs/<etag>.incomplete` (resumed with a Range
//! request), verified (size, then sha256 for LFS files or the git blob id for others), renamed to
//! `blobs/<etag>`, and only then linked into `snapshots/<commit>/`; `refs/<revision>` is written
//! last. huggingface_hub takes the same locks (flock), so Python and glimpse can fetch at once.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::progress::{format_bytes, Bar};
use super::{cached_snapshot, is_commit, repo_folder, HubOptions};
use crate::error::{Error, Result};

/// A snapshot ready on disk.
#[derive(Debug)]
pub struct Fetched {
    pub snapshot: PathBuf,
    pub commit: String,
    /// Files transferred by this call (empty on a cache hit), and their bytes.
    pub downloaded: Vec<String>,
    pub bytes: u64,
}

/// What the hub lists for one revision.
#[derive(Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize, Clone)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize, Clone)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// Why a request failed: the network (worth a retry, or falling back to the cache), or an answer
/// that retrying will not change.
enum Failure {
    Unreachable(String),
    Fatal(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Fatal(e)
    }
}

fn hub_error(msg: String) -> Error {
    Error::InvalidInput(msg)
}

/// Weights glimpse reads; everything else it needs is small metadata at the repo root.
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";
/// Root files worth fetching besides weights: configs, processor and tokenizer files.
fn is_metadata(name: &str) -> bool {
    !name.contains('/')
        && name != INDEX
        && (name.ends_with(".json") || name.ends_with(".txt") || name.ends_with(".model") || name.ends_with(".jinja"))
}

/// Downloads what `id` at `opts.revision` needs into `cache`; a cached copy serves when the hub
/// cannot be reached.
pub(super) fn fetch(id: &str, opts: &HubOptions, cache: &Path) -> Result<Fetched> {
    let rev = &opts.revision;
    if rev.is_empty() || rev.contains("..") || rev.starts_with('/') || rev.contains('\\') {
        return Err(hub_error(format!(
            "revision `{rev}` is not a branch, tag or commit name: pass e.g. main, v1.0 or a 40-hex commit"
        )));
    }
    let repo = repo_folder(id, cache);
    // A commit is immutable: a complete snapshot of it needs no network.
    if is_commit(rev) && snapshot_complete(&repo.join("snapshots").join(rev)) {
        return Ok(Fetched {
            snapshot: repo.join("snapshots").join(rev),
            commit: rev.clone(),
            downloaded: vec![],
            bytes: 0,
        });
    }
    let client = Client::new(opts)?;
    let cached = cached_snapshot(id, rev, cache, false).is_ok();
    let info = match client.repo_info(id, rev, cached.then_some(opts.metadata_timeout)) {
        Ok(info) => info,
        Err(Failure::Fatal(e)) => return Err(e),
        Err(Failure::Unreachable(cause)) => {
            return match cached_snapshot(id, rev, cache, false) {
                Ok(dir) => {
                    note(&format!("cannot reach the hub at {} ({cause}); using the cached snapshot {}", opts.endpoint, dir.display()));
                    let commit = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    Ok(Fetched { snapshot: dir, commit, downloaded: vec![], bytes: 0 })
                }
                Err(_) => Err(hub_error(format!(
                    "cannot reach the Hugging Face Hub at {} ({cause}), and model `{id}` is not in the cache ({}): connect to the network (check proxy settings and HF_ENDPOINT) and try again, or pass a model folder",
                    opts.endpoint,
                    cache.display()
                ))),
            };
        }
    };
    if !is_commit(&info.sha) {
        return Err(hub_error(format!(
            "{}: the listing of `{id}` names commit `{}`, not a 40-hex hash: is HF_ENDPOINT a Hugging Face Hub?",
            opts.endpoint, info.sha
        )));
    }
    let job = Job { client: &client, id, commit: &info.sha, repo: &repo, cache, progress: opts.progress, info: &info };
    let mut fetched = Fetched {
        snapshot: repo.join("snapshots").join(&info.sha),
        commit: info.sha.clone(),
        downloaded: vec![],
        bytes: 0,
    };

    let names: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let weights: Vec<&str> = if names.contains(INDEX) {
        vec![INDEX]
    } else if names.contains(SINGLE) {
        vec![SINGLE]
    } else {
        let pickles = names.iter().any(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth"));
        return Err(hub_error(format!(
            "model `{id}` at {rev} has no {SINGLE} nor {INDEX}{}: glimpse reads safetensors only; pick a repo or revision with safetensors weights",
            if pickles { " (only PyTorch pickles, which glimpse never loads)" } else { "" }
        )));
    };
    for name in names.iter().copied().filter(|n| is_metadata(n)).chain(weights) {
        job.ensure(name, &mut fetched)?;
    }
    if names.contains(INDEX) {
        for shard in shards(&fetched.snapshot.join(INDEX))? {
            if !names.contains(shard.as_str()) {
                return Err(hub_error(format!(
                    "model `{id}` at {}: {INDEX} names shard `{shard}`, which the repo does not hold",
                    info.sha
                )));
            }
            job.ensure(&shard, &mut fetched)?;
        }
    }
    if rev != &info.sha {
        write_atomic(&repo.join("refs").join(rev), info.sha.as_bytes())?;
    }
    Ok(fetched)
}

/// A note for people on stderr; a stderr that cannot be written is no failure.
fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "note: {msg}");
}

/// The shard files an index names, checked to be plain names at the snapshot root.
fn shards(index: &Path) -> Result<BTreeSet<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index =
        serde_json::from_str(&text).map_err(|e| Error::Json { path: index.to_path_buf(), msg: e.to_string() })?;
    let files: BTreeSet<String> = parsed.weight_map.into_values().collect();
    if let Some(bad) =
        files.iter().find(|f| f.contains('/') || f.contains('\\') || f.starts_with('.') || !f.ends_with(".safetensors"))
    {
        return Err(Error::config(
            index,
            format!("weight_map names `{bad}`, not a .safetensors file beside the index"),
        ));
    }
    Ok(files)
}

/// config.json and every weight file present: what a snapshot needs to load.
pub(super) fn snapshot_complete(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() {
        return false;
    }
    if dir.join(SINGLE).is_file() {
        return true;
    }
    shards(&dir.join(INDEX)).is_ok_and(|s| s.iter().all(|f| dir.join(f).is_file()))
}

/// One model's download: where it goes and what the hub listed.
struct Job<'a> {
    client: &'a Client,
    id: &'a str,
    commit: &'a str,
    repo: &'a Path,
    cache: &'a Path,
    progress: bool,
    info: &'a RepoInfo,
}

/// How a blob is checked before it becomes visible.
enum Check {
    Sha256(String),
    GitBlob(String),
}

impl Job<'_> {
    /// `name` present in the snapshot: linked from a verified blob, downloaded when missing.
    fn ensure(&self, name: &str, fetched: &mut Fetched) -> Result<()> {
        let Some(sib) = self.info.siblings.iter().find(|s| s.rfilename == name) else {
            return Err(hub_error(format!("model `{}`: the hub does not list `{name}` at {}", self.id, self.commit)));
        };
        let (etag, size, check) = match (&sib.lfs, &sib.blob_id, sib.size) {
            (Some(lfs), _, _) => (lfs.sha256.to_ascii_lowercase(), lfs.size, Check::Sha256(lfs.sha256.to_ascii_lowercase())),
            (None, Some(blob), Some(size)) => (blob.to_ascii_lowercase(), size, Check::GitBlob(blob.to_ascii_lowercase())),
            _ => {
                return Err(hub_error(format!(
                    "{}: the listing of `{}` gives no size or blob id for `{name}` (asked with ?blobs=true): HF_ENDPOINT must be a Hugging Face Hub or a full mirror of its API",
                    self.client.endpoint, self.id
                )))
            }
        };
        if !etag.bytes().all(|b| b.is_ascii_hexdigit()) || etag.len() < 40 {
            return Err(hub_error(format!("model `{}`: `{name}` has blob id `{etag}`, not a hex hash", self.id)));
        }
        let link = self.repo.join("snapshots").join(self.commit).join(name);
        if fs::metadata(&link).is_ok_and(|m| m.len() == size) {
            return Ok(());
        }
        let blob = self.repo.join("blobs").join(&etag);
        if !fs::metadata(&blob).is_ok_and(|m| m.len() == size) {
            fetched.bytes += self.download_blob(name, &etag, size, &check, &blob)?;
            fetched.downloaded.push(name.to_string());
        }
        link_into_snapshot(&etag, &blob, &link)
    }

    /// Fetches, verifies and renames one blob into place under its lock; returns bytes transferred.
    fn download_blob(&self, name: &str, etag: &str, size: u64, check: &Check, blob: &Path) -> Result<u64> {
        let blobs = blob.parent().unwrap_or(self.repo);
        fs::create_dir_all(blobs).map_err(|e| Error::io(blobs, e))?;
        let locks = self.cache.join(".locks").join(self.repo.file_name().unwrap_or_default());
        fs::create_dir_all(&locks).map_err(|e| Error::io(&locks, e))?;
        let lock_path = locks.join(format!("{etag}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        // Another process (glimpse or huggingface_hub) may hold it: wait, then see what it left.
        lock_exclusive(&lock).map_err(|e| Error::io(&lock_path, e))?;
        if fs::metadata(blob).is_ok_and(|m| m.len() == size) {
            return Ok(0);
        }
        let part = blobs.join(format!("{etag}.incomplete"));
        let url = format!("{}/{}/resolve/{}/{}", self.client.endpoint, self.id, self.commit, quote(name, true));
        let mut sent = 0;
        const TRIES: usize = 4;
        for attempt in 1..=TRIES {
            match self.transfer(&url, name, size, &part) {
                Ok(n) => {
                    sent += n;
                    break;
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Unreachable(cause)) if attempt < TRIES => {
                    note(&format!("download of {name} interrupted ({cause}); resuming ({attempt}/{})", TRIES - 1));
                    std::thread::sleep(Duration::from_millis(200 * attempt as u64));
                }
                Err(Failure::Unreachable(cause)) => {
                    let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                    return Err(hub_error(format!(
                        "downloading `{name}` of model `{}` failed after {TRIES} tries ({cause}); {} of {} are kept in {} and the next run resumes from there",
                        self.id,
                        format_bytes(have),
                        format_bytes(size),
                        part.display()
                    )));
                }
            }
        }
        verify(&part, name, size, check).inspect_err(|_| {
            let _ = fs::remove_file(&part);
        })?;
        fs::rename(&part, blob).map_err(|e| Error::io(blob, e))?;
        sync_dir(blobs);
        Ok(sent)
    }

    /// One GET of `url` into `part`, resuming from its length; returns bytes received.
    fn transfer(&self, url: &str, name: &str, size: u64, part: &Path) -> Result<u64, Failure> {
        let mut have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if have > size {
            have = 0;
        }
        if have == size && size > 0 {
            return Ok(0);
        }
        let resp = self.client.get(url, (have > 0).then_some(have))?;
        let status = resp.status().as_u16();
        match status {
            206 => {
                let range = header(&resp, "content-range").unwrap_or_default();
                if !range.starts_with(&format!("bytes {have}-")) {
                    return Err(Failure::Unreachable(format!(
                        "the server answered range `{range}` to a resume from byte {have}"
                    )));
                }
            }
            200 => have = 0,
            // The part is stale (the file changed under its etag?): start over.
            416 => {
                let _ = fs::remove_file(part);
                return Err(Failure::Unreachable("the server refused to resume (416)".to_string()));
            }
            _ => {
                return Err(Failure::Fatal(self.client.status_error(
                    &resp,
                    &format!("file `{name}` of model `{}` at {}", self.id, self.commit),
                    self.id,
                )))
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(part)
            .map_err(|e| write_error(e, part, name, size, have))?;
        // Only truncate when needed: a part may be a special file (tests point one at /dev/full).
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len != have {
            file.set_len(have).map_err(|e| write_error(e, part, name, size, have))?;
        }
        file.seek(SeekFrom::Start(have)).map_err(|e| write_error(e, part, name, size, have))?;
        let mut body = resp.into_body().into_with_config().reader();
        let mut bar = Bar::new(name, size, have, self.progress);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = have;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    file.sync_all().ok();
                    return Err(Failure::Unreachable(format!(
                        "connection lost after {} of {}: {e}",
                        format_bytes(got),
                        format_bytes(size)
                    )));
                }
            };
            if got + n as u64 > size {
                return Err(Failure::Fatal(hub_error(format!("the hub sent more than the {size} bytes it lists for `{name}` of model `{}`: run again; if it persists, the listing and the file disagree", self.id))));
            }
            file.write_all(&buf[..n]).map_err(|e| write_error(e, part, name, size, got))?;
            got += n as u64;
            bar.add(n as u64);
        }
        bar.finish();
        file.sync_all().map_err(|e| write_error(e, part, name, size, got))?;
        if got < size {
            return Err(Failure::Unreachable(format!(
                "connection closed after {} of {}",
                format_bytes(got),
                format_bytes(size)
            )));
        }
        Ok(got - have)
    }
}

/// Blocks until this process holds an exclusive flock on `file`, released when it is closed.
/// huggingface_hub's filelock takes the same lock, so Python and glimpse exclude each other too.
#[cfg(unix)]
fn lock_exclusive(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor `file` owns for the whole call; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// glimpse targets Linux; elsewhere concurrent downloads of one model are not excluded.
#[cfg(not(unix))]
fn lock_exclusive(_: &File) -> std::io::Result<()> {
    Ok(())
}

/// A failed write into the cache; for a full disk, how much room is needed and where.
fn write_error(e: std::io::Error, part: &Path, name: &str, size: u64, have: u64) -> Failure {
    if e.kind() == ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
        return Failure::Fatal(hub_error(format!(
            "disk full while downloading `{name}` to {}: {} more are needed; free space there or set HF_HUB_CACHE to a folder on a larger disk. The {} received so far are kept (delete the file to reclaim them; the next run resumes from them); nothing was added to the snapshot",
            part.display(),
            format_bytes(size - have),
            format_bytes(have)
        )));
    }
    Failure::Fatal(Error::io(part, e))
}

/// Size, then content hash: sha256 for LFS files, the git blob id (sha1 of `blob <len>\0` + bytes)
/// for the others.
fn verify(part: &Path, name: &str, size: u64, check: &Check) -> Result<()> {
    let len = fs::metadata(part).map_err(|e| Error::io(part, e))?.len();
    if len != size {
        return Err(hub_error(format!(
            "downloaded `{name}` has {len} bytes but the hub lists {size}: run again to download it anew"
        )));
    }
    let mut file = File::open(part).map_err(|e| Error::io(part, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let (kind, expected, actual) = match check {
        Check::Sha256(want) => {
            let mut h = Sha256::new();
            hash_file(&mut file, part, &mut buf, |b| h.update(b))?;
            ("sha256", want, hex(&h.finalize()))
        }
        Check::GitBlob(want) => {
            let mut h = Sha1::new();
            h.update(format!("blob {size}\0").as_bytes());
            hash_file(&mut file, part, &mut buf, |b| h.update(b))?;
            ("git blob id", want, hex(&h.finalize()))
        }
    };
    if &actual != expected {
        return Err(hub_error(format!(
            "downloaded `{name}` does not match the {kind} the hub publishes ({expected}, got {actual}): it was corrupted in transit or by a proxy; it was discarded, run again to download it anew"
        )));
    }
    Ok(())
}

fn hash_file(file: &mut File, path: &Path, buf: &mut [u8], mut update: impl FnMut(&[u8])) -> Result<()> {
    loop {
        match file.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `snapshots/<commit>/<name>` -> `../../blobs/<etag>` (huggingface_hub's relative link), made
/// under a temporary name and renamed over, so readers see no link or a whole one.
fn link_into_snapshot(etag: &str, blob: &Path, link: &Path) -> Result<()> {
    let dir = link.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = link.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(format!("../../blobs/{etag}"), &tmp).map_err(|e| Error::io(&tmp, e))?;
    #[cfg(not(unix))]
    fs::copy(blob, &tmp).map_err(|e| Error::io(&tmp, e))?;
    let _ = blob;
    fs::rename(&tmp, link).map_err(|e| Error::io(link, e))?;
    sync_dir(dir);
    Ok(())
}

/// Temp file in the same folder, fsync, rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(dir);
    Ok(())
}

/// Makes a rename durable; best effort (not every platform can open a folder).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Percent-encodes all but RFC 3986 unreserved characters (and `/` when `keep_slash`), as
/// huggingface_hub's `quote` does for revisions (safe="") and file names.
fn quote(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

struct Client {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

impl Client {
    fn new(opts: &HubOptions) -> Result<Client> {
        if !(opts.endpoint.starts_with("https://") || opts.endpoint.starts_with("http://")) {
            return Err(hub_error(format!(
                "HF_ENDPOINT `{}` is not an http(s) URL: set it like https://huggingface.co",
                opts.endpoint
            )));
        }
        let host = host_of(&opts.endpoint);
        let loopback = matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]");
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Redirects are followed by hand: the hub's own headers come on the first answer.
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(format!("glimpse/{}", env!("CARGO_PKG_VERSION")));
        if loopback {
            config = config.proxy(None);
        }
        Ok(Client { agent: config.build().new_agent(), endpoint: opts.endpoint.clone(), token: opts.token.clone() })
    }

    /// GET with redirects followed (at most 5); the token goes only to the endpoint's own origin
    /// (scheme, host and port), never to the CDN an LFS file redirects to.
    fn get(&self, url: &str, from: Option<u64>) -> Result<ureq::http::Response<ureq::Body>, Failure> {
        self.get_within(url, from, None)
    }

    /// [`Self::get`] with the whole request (connect, headers, body) bounded by `timeout`.
    fn get_within(
        &self,
        url: &str,
        from: Option<u64>,
        timeout: Option<Duration>,
    ) -> Result<ureq::http::Response<ureq::Body>, Failure> {
        let own = origin_of(&self.endpoint).to_ascii_lowercase();
        let mut url = url.to_string();
        for _ in 0..6 {
            let mut req = self.agent.get(&url).header("Accept-Encoding", "identity");
            if let Some(t) = timeout {
                req = req.config().timeout_global(Some(t)).build();
            }
            if let Some(from) = from {
                req = req.header("Range", format!("bytes={from}-"));
            }
            if let Some(token) = self.token.as_ref().filter(|_| origin_of(&url).to_ascii_lowercase() == own) {
                req = req.header("Authorization", format!("Bearer {token}"));
            }
            let resp = req.call().map_err(|e| match e {
                ureq::Error::Io(_)
                | ureq::Error::Timeout(_)
                | ureq::Error::HostNotFound
                | ureq::Error::ConnectionFailed
                | ureq::Error::Protocol(_) => Failure::Unreachable(e.to_string()),
                other => Failure::Fatal(hub_error(format!("request to {url} failed: {other}"))),
            })?;
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let Some(location) = header(&resp, "location") else {
                return Err(Failure::Fatal(hub_error(format!("{url} answered {} without a Location", resp.status()))));
            };
            url = if location.starts_with("http://") || location.starts_with("https://") {
                location
            } else if location.starts_with('/') {
                format!("{}{location}", origin_of(&url))
            } else {
                return Err(Failure::Fatal(hub_error(format!(
                    "{url} redirected to `{location}`, which glimpse does not follow"
                ))));
            };
        }
        Err(Failure::Fatal(hub_error(format!("too many redirects from {url}"))))
    }

    /// The listing of `id` at `rev`, within `timeout` when given.
    fn repo_info(&self, id: &str, rev: &str, timeout: Option<Duration>) -> Result<RepoInfo, Failure> {
        let url = format!("{}/api/models/{id}/revision/{}?blobs=true", self.endpoint, quote(rev, false));
        let resp = self.get_within(&url, None, timeout)?;
        if resp.status().as_u16() != 200 {
            let what =
                if rev == "main" { format!("model `{id}`") } else { format!("model `{id}` at revision `{rev}`") };
            return Err(Failure::Fatal(self.status_error(&resp, &what, id)));
        }
        let text = resp
            .into_body()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| {
            Failure::Fatal(hub_error(format!(
                "{url}: the hub's answer is not a model listing ({e}): is HF_ENDPOINT a Hugging Face Hub?"
            )))
        })
    }

    /// The cause and the fix for an HTTP failure about `what` (in repo `id`).
    fn status_error(&self, resp: &ureq::http::Response<ureq::Body>, what: &str, id: &str) -> Error {
        let status = resp.status().as_u16();
        let code = header(resp, "x-error-code").unwrap_or_default();
        let page = format!("{}/{id}", self.endpoint);
        let token_fix = "set HF_TOKEN (or run `hf auth login`) to a token with read access (https://huggingface.co/settings/tokens)";
        let msg = match (status, code.as_str()) {
            (401 | 403, "GatedRepo") => format!(
                "{what} is gated (HTTP {status}): accept its licence at {page} while logged in, then {token_fix}{}",
                if self.token.is_some() { "; the token sent has no access yet" } else { "" }
            ),
            (401, _) if self.token.is_some() => {
                format!("{what}: the hub refused the token (HTTP 401): it is invalid or expired, or the repo does not exist; check the id and {token_fix}")
            }
            (401, _) => format!("{what} was not found on {} (HTTP 401): check the id; if the repo is private, {token_fix}", self.endpoint),
            (403, _) => format!("{what}: access denied (HTTP 403): the token lacks permission for {page}; use a token with read access to it"),
            (404, "RevisionNotFound") => format!("{what} not found (HTTP 404, no such revision): pass an existing branch, tag or commit to --revision"),
            (404, "EntryNotFound") => format!("{what} not found on the hub (HTTP 404, no such file)"),
            (404, _) => format!("{what} not found on {} (HTTP 404): check the id (org/name) and the revision", self.endpoint),
            (429, _) => format!("{what}: the hub is rate-limiting requests (HTTP 429): wait a minute and try again{}", if self.token.is_some() { "" } else { ", or set HF_TOKEN" }),
            _ => format!("{what}: the hub at {} answered HTTP {status}: try again later", self.endpoint),
        };
        hub_error(msg)
    }
}

/// `scheme://host[:port]` of a URL.
fn origin_of(url: &str) -> String {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[after..].find('/').map(|i| after + i).unwrap_or(url.len());
    url[..end].to_string()
}

/// `host[:port]` of a URL, lowercased, without the port.
fn host_of(url: &str) -> String {
    let origin = origin_of(url);
    let hostport = origin.split("://").nth(1).unwrap_or("").rsplit('@').next().unwrap_or("").to_ascii_lowercase();
    if hostport.starts_with('[') {
        return hostport.split(']').next().map(|h| format!("{h}]")).unwrap_or_default();
    }
    hostport.split(':').next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_hosts() {
        assert_eq!(quote("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(quote("sub dir/a+b.json", true), "sub%20dir/a%2Bb.json");
        assert_eq!(host_of("https://User@HF.co:8080/x"), "hf.co");
        assert_eq!(host_of("http://[::1]:9/x"), "[::1]");
        assert_eq!(origin_of("http://127.0.0.1:5/a/b"), "http://127.0.0.1:5");
    }

    #[test]
    fn picks_metadata_not_pickles() {
        for yes in ["config.json", "tokenizer.json", "merges.txt", "spiece.model", "chat_template.jinja"] {
            assert!(is_metadata(yes), "{yes}");
        }
        for no in
            ["pytorch_model.bin", "model.safetensors", INDEX, "onnx/config.json", "flax_model.msgpack", "model.pt"]
        {
            assert!(!is_metadata(no), "{no}");
        }
    }
}
