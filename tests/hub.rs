//! Hub downloads against a mock Hugging Face Hub on the loopback address: the listing
//! (`/api/models/{id}/revision/{rev}?blobs=true`), `resolve/{rev}/{file}` with X-Repo-Commit and
//! ETag headers, 302 redirects to a "CDN" for LFS files, Range requests, 401/404 with
//! X-Error-Code. Each test starts its own server; servers stop when dropped or after a minute.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use glimpse::hub::{resolve_model_with, HubOptions};
use sha1::Sha1;
use sha2::{Digest, Sha256};

const MAIN: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const V1: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const TOKEN: &str = "hf_test_token";

#[derive(Clone)]
struct MockFile {
    name: String,
    bytes: Arc<Vec<u8>>,
    lfs: bool,
}

impl MockFile {
    fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.bytes[..]))
    }
    fn blob_id(&self) -> String {
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", self.bytes.len()).as_bytes());
        h.update(&self.bytes[..]);
        hex(&h.finalize())
    }
    fn etag(&self) -> String {
        if self.lfs {
            self.sha256()
        } else {
            self.blob_id()
        }
    }
}

struct MockRepo {
    id: String,
    refs: HashMap<String, String>,
    commits: HashMap<String, Vec<MockFile>>,
    gated: bool,
}

#[derive(Clone, Debug)]
struct Req {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct Faults {
    /// Close the next CDN transfer after this many bytes.
    cut_after: Option<usize>,
    /// Flip a byte in every CDN body.
    corrupt: bool,
    /// Send CDN bodies in slow chunks (so concurrent clients overlap).
    slow: bool,
}

struct State {
    repos: Vec<MockRepo>,
    log: Mutex<Vec<Req>>,
    faults: Mutex<Faults>,
    stop: AtomicBool,
}

struct Hub {
    url: String,
    state: Arc<State>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The files of a fixture folder; safetensors are LFS files, as on the hub.
fn fixture_files(name: &str) -> Vec<MockFile> {
    let mut files: Vec<MockFile> = std::fs::read_dir(common::model_dir(name))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            MockFile { lfs: name.ends_with(".safetensors"), bytes: Arc::new(std::fs::read(e.path()).unwrap()), name }
        })
        .collect();
    // A pickle beside the safetensors: glimpse must never fetch it.
    files.push(MockFile { name: "pytorch_model.bin".into(), bytes: Arc::new(vec![7u8; 4096]), lfs: true });
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files
}

/// tiny/blip2 (main and tag v1, which also holds notes.txt), tiny/sharded (three shards) and
/// tiny/gated (needs TOKEN).
fn start_hub() -> Hub {
    let tiny = fixture_files("blip2-opt-tiny");
    let mut v1 = tiny.clone();
    v1.push(MockFile { name: "notes.txt".into(), bytes: Arc::new(b"v1".to_vec()), lfs: false });
    let repo = |id: &str, commits: Vec<(&str, Vec<MockFile>)>, refs: &[(&str, &str)], gated| MockRepo {
        id: id.into(),
        refs: refs.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect(),
        commits: commits.into_iter().map(|(c, f)| (c.to_string(), f)).collect(),
        gated,
    };
    let repos = vec![
        repo("tiny/blip2", vec![(MAIN, tiny.clone()), (V1, v1)], &[("main", MAIN), ("v1", V1)], false),
        repo("tiny/sharded", vec![(MAIN, fixture_files("blip2-opt-tiny-proj"))], &[("main", MAIN)], false),
        repo("tiny/gated", vec![(MAIN, tiny)], &[("main", MAIN)], true),
    ];
    let state =
        Arc::new(State { repos, log: Mutex::default(), faults: Mutex::default(), stop: AtomicBool::new(false) });
    // The hub, and its "CDN" on another origin (as on the real hub, no token may follow there).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // The "CDN" sits on another loopback address, as the real one is another host: clients
    // (huggingface_hub) follow redirects within the hub's host but read the file metadata from
    // the redirect itself when it leaves it.
    let cdn = TcpListener::bind("127.0.0.2:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
    for l in [listener, cdn] {
        l.set_nonblocking(true).unwrap();
        let (st, cdn_url) = (state.clone(), cdn_url.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !st.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                match l.accept() {
                    Ok((stream, _)) => {
                        let (st, cdn_url) = (st.clone(), cdn_url.clone());
                        std::thread::spawn(move || {
                            let _ = serve(stream, &st, &cdn_url);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
    }
    Hub { url, state }
}

impl Hub {
    fn log(&self) -> Vec<Req> {
        self.state.log.lock().unwrap().clone()
    }
    fn clear_log(&self) {
        self.state.log.lock().unwrap().clear();
    }
    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.state.faults.lock().unwrap()
    }
    fn opts(&self, cache: &Path) -> HubOptions {
        HubOptions {
            revision: "main".into(),
            offline: false,
            progress: false,
            endpoint: self.url.clone(),
            token: None,
            cache: Some(cache.to_path_buf()),
            metadata_timeout: Duration::from_secs(10),
        }
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// An answer with a body (headers only for HEAD, as huggingface_hub probes with HEAD).
fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if !HEAD_REQUEST.with(|h| h.get()) {
        s.write_all(body)?;
    }
    Ok(())
}

thread_local! {
    /// Whether the connection this thread serves asked with HEAD.
    static HEAD_REQUEST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn error(s: &mut TcpStream, status: &str, code: &str) -> std::io::Result<()> {
    respond(s, status, &[("X-Error-Code", code.to_string())], format!("{{\"error\":\"{code}\"}}").as_bytes())
}

fn serve(mut s: TcpStream, st: &State, cdn_url: &str) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    HEAD_REQUEST.with(|h| h.set(line.starts_with("HEAD ")));
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let req =
        Req { path: path.clone(), range: headers.get("range").cloned(), auth: headers.get("authorization").cloned() };
    st.log.lock().unwrap().push(req.clone());
    let authorized = req.auth.as_deref() == Some(&format!("Bearer {TOKEN}"));

    if let Some(sha) = path.strip_prefix("/cdn/") {
        let file =
            st.repos.iter().flat_map(|r| r.commits.values().flatten()).find(|f| f.lfs && f.sha256() == sha).cloned();
        let Some(file) = file else { return error(&mut s, "404 Not Found", "EntryNotFound") };
        return send_bytes(&mut s, st, &file.bytes, req.range.as_deref(), true);
    }
    let (api, rest) = match path.strip_prefix("/api/models/") {
        Some(rest) => (true, rest.to_string()),
        None => (false, path.trim_start_matches('/').to_string()),
    };
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    if parts.len() < 4 {
        return error(&mut s, "404 Not Found", "RepoNotFound");
    }
    let id = format!("{}/{}", parts[0], parts[1]);
    let Some(repo) = st.repos.iter().find(|r| r.id == id) else {
        // As the hub: an unknown repo looks private to an anonymous caller.
        return if req.auth.is_some() {
            error(&mut s, "404 Not Found", "RepoNotFound")
        } else {
            error(&mut s, "401 Unauthorized", "RepoNotFound")
        };
    };
    if repo.gated && !authorized {
        return error(&mut s, "401 Unauthorized", "GatedRepo");
    }
    let rev = decode(parts[3].split('?').next().unwrap_or(""));
    let commit = repo.refs.get(&rev).cloned().unwrap_or(rev.clone());
    let Some(files) = repo.commits.get(&commit) else { return error(&mut s, "404 Not Found", "RevisionNotFound") };
    if api && parts[2] == "revision" {
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|f| {
                let mut v = serde_json::json!({"rfilename": f.name, "size": f.bytes.len(), "blobId": f.blob_id()});
                if f.lfs {
                    v["lfs"] = serde_json::json!({"sha256": f.sha256(), "size": f.bytes.len(), "pointerSize": 134});
                }
                v
            })
            .collect();
        let body = serde_json::json!({"id": id, "sha": commit, "siblings": siblings}).to_string();
        return respond(&mut s, "200 OK", &[("Content-Type", "application/json".into())], body.as_bytes());
    }
    if api && parts[2] == "tree" {
        // huggingface_hub's snapshot_download lists files this way.
        let entries: Vec<serde_json::Value> = files
            .iter()
            .map(|f| {
                let mut v =
                    serde_json::json!({"type": "file", "path": f.name, "size": f.bytes.len(), "oid": f.blob_id()});
                if f.lfs {
                    v["lfs"] = serde_json::json!({"oid": f.sha256(), "size": f.bytes.len(), "pointerSize": 134});
                }
                v
            })
            .collect();
        return respond(
            &mut s,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            serde_json::Value::from(entries).to_string().as_bytes(),
        );
    }
    if api || parts[2] != "resolve" || parts.len() < 5 {
        return error(&mut s, "404 Not Found", "EntryNotFound");
    }
    let name = decode(parts[4]);
    let Some(file) = files.iter().find(|f| f.name == name) else {
        return error(&mut s, "404 Not Found", "EntryNotFound");
    };
    let mut h = vec![("X-Repo-Commit", commit.clone()), ("ETag", format!("\"{}\"", file.etag()))];
    if file.lfs {
        h.push(("X-Linked-Etag", format!("\"{}\"", file.sha256())));
        h.push(("X-Linked-Size", file.bytes.len().to_string()));
        h.push(("Location", format!("{cdn_url}/cdn/{}", file.sha256())));
        return respond(&mut s, "302 Found", &h, b"");
    }
    respond(&mut s, "200 OK", &h, &file.bytes)
}

/// A CDN body with Range support and the faults asked for.
fn send_bytes(
    s: &mut TcpStream,
    st: &State,
    bytes: &[u8],
    range: Option<&str>,
    faults_apply: bool,
) -> std::io::Result<()> {
    let from: usize =
        range.and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.trim_end_matches('-').parse().ok()).unwrap_or(0);
    let mut body = bytes[from.min(bytes.len())..].to_vec();
    let (cut, slow) = {
        let mut f = st.faults.lock().unwrap();
        if faults_apply && f.corrupt && !body.is_empty() {
            body[0] ^= 0xff;
        }
        (if faults_apply { f.cut_after.take() } else { None }, f.slow)
    };
    let status = if from > 0 {
        format!("206 Partial Content\r\nContent-Range: bytes {from}-{}/{}", bytes.len() - 1, bytes.len())
    } else {
        "200 OK".into()
    };
    s.write_all(
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes(),
    )?;
    let end = cut.unwrap_or(body.len()).min(body.len());
    for chunk in body[..end].chunks(256 << 10) {
        s.write_all(chunk)?;
        if slow {
            std::thread::sleep(Duration::from_millis(40));
        }
    }
    s.flush()?;
    if cut.is_some() {
        s.shutdown(std::net::Shutdown::Both)?;
    }
    Ok(())
}

fn cdn_requests(log: &[Req]) -> Vec<Req> {
    log.iter().filter(|r| r.path.starts_with("/cdn/")).cloned().collect()
}

fn snapshot(cache: &Path, repo: &str, commit: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--"))).join("snapshots").join(commit)
}

fn err_text(r: glimpse::Result<PathBuf>) -> String {
    match r {
        Ok(p) => panic!("expected an error, got {}", p.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn first_download_lays_out_the_shared_cache_then_hits_it() {
    let hub = start_hub();
    let cache = common::tempdir();
    let dir = resolve_model_with("tiny/blip2", &hub.opts(cache.path())).unwrap();
    assert_eq!(dir, snapshot(cache.path(), "tiny/blip2", MAIN));
    let repo = cache.path().join("models--tiny--blip2");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), MAIN);
    for f in fixture_files("blip2-opt-tiny").iter().filter(|f| f.name != "pytorch_model.bin") {
        let link = dir.join(&f.name);
        // Relative links into blobs/<etag>, as huggingface_hub makes them.
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from(format!("../../blobs/{}", f.etag())),
            "{}",
            f.name
        );
        assert_eq!(std::fs::read(&link).unwrap(), *f.bytes, "{}", f.name);
    }
    assert!(!dir.join("pytorch_model.bin").exists());
    let log = hub.log();
    assert!(log.iter().all(|r| !r.path.contains("pytorch_model.bin")), "a pickle was requested: {log:?}");
    assert!(log[0].path.starts_with("/api/models/tiny/blip2/revision/main?blobs=true"), "{log:?}");
    let leftovers: Vec<_> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Cache hit: one listing, no file requests.
    hub.clear_log();
    assert_eq!(resolve_model_with("tiny/blip2", &hub.opts(cache.path())).unwrap(), dir);
    let log = hub.log();
    assert_eq!(log.len(), 1, "{log:?}");

    // Offline: no request at all; and with the hub gone, the cached copy still serves.
    hub.clear_log();
    let offline = HubOptions { offline: true, ..hub.opts(cache.path()) };
    assert_eq!(resolve_model_with("tiny/blip2", &offline).unwrap(), dir);
    assert!(hub.log().is_empty());
    let unreachable = HubOptions { endpoint: dead_endpoint(), ..hub.opts(cache.path()) };
    assert_eq!(resolve_model_with("tiny/blip2", &unreachable).unwrap(), dir);
}

/// An http URL on a loopback port nothing listens on.
fn dead_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

#[test]
fn sharded_checkpoints_fetch_the_index_and_every_shard() {
    let hub = start_hub();
    let cache = common::tempdir();
    let dir = resolve_model_with("tiny/sharded", &hub.opts(cache.path())).unwrap();
    for n in 1..=3 {
        assert!(dir.join(format!("model-0000{n}-of-00003.safetensors")).is_file());
    }
    glimpse::weights::Checkpoint::open_dir(&dir).unwrap();
}

#[test]
fn interrupted_downloads_resume_with_a_range_request() {
    let hub = start_hub();
    let cache = common::tempdir();
    let model = fixture_files("blip2-opt-tiny").into_iter().find(|f| f.name == "model.safetensors").unwrap();
    // A part left by an earlier, killed run...
    let blobs = cache.path().join("models--tiny--blip2/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{}.incomplete", model.sha256())), &model.bytes[..500_000]).unwrap();
    // ...and a connection cut during this one.
    hub.faults().cut_after = Some(1_000_000);
    let dir = resolve_model_with("tiny/blip2", &hub.opts(cache.path())).unwrap();
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), *model.bytes);
    let ranges: Vec<_> =
        cdn_requests(&hub.log()).into_iter().filter(|r| r.path.contains(&model.sha256())).map(|r| r.range).collect();
    assert_eq!(ranges, [Some("bytes=500000-".to_string()), Some("bytes=1500000-".to_string())]);
}

#[test]
fn corrupt_downloads_never_reach_the_snapshot() {
    let hub = start_hub();
    let cache = common::tempdir();
    hub.faults().corrupt = true;
    let e = err_text(resolve_model_with("tiny/blip2", &hub.opts(cache.path())));
    assert!(e.contains("model.safetensors") && e.contains("sha256") && e.contains("run again"), "{e}");
    let repo = cache.path().join("models--tiny--blip2");
    assert!(!snapshot(cache.path(), "tiny/blip2", MAIN).join("model.safetensors").exists());
    assert!(!repo.join("refs/main").exists(), "the ref is written only for a complete snapshot");
    let model = fixture_files("blip2-opt-tiny").into_iter().find(|f| f.name == "model.safetensors").unwrap();
    let blobs: Vec<_> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(blobs.iter().all(|b| !b.starts_with(&model.sha256())), "the bad download was kept: {blobs:?}");
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_says_so_and_leaves_the_snapshot_clean() {
    let hub = start_hub();
    let cache = common::tempdir();
    let model = fixture_files("blip2-opt-tiny").into_iter().find(|f| f.name == "model.safetensors").unwrap();
    let blobs = cache.path().join("models--tiny--blip2/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    // Writes into the part fail with ENOSPC.
    std::os::unix::fs::symlink("/dev/full", blobs.join(format!("{}.incomplete", model.sha256()))).unwrap();
    let e = err_text(resolve_model_with("tiny/blip2", &hub.opts(cache.path())));
    assert!(e.contains("disk full") && e.contains("HF_HUB_CACHE") && e.contains("model.safetensors"), "{e}");
    assert!(!snapshot(cache.path(), "tiny/blip2", MAIN).join("model.safetensors").exists());
    assert!(!blobs.join(model.sha256()).exists());
}

#[test]
fn revisions_pin_branches_tags_and_commits() {
    let hub = start_hub();
    let cache = common::tempdir();
    let at = |rev: &str| HubOptions { revision: rev.into(), ..hub.opts(cache.path()) };
    let v1 = resolve_model_with("tiny/blip2", &at("v1")).unwrap();
    assert_eq!(v1, snapshot(cache.path(), "tiny/blip2", V1));
    assert_eq!(std::fs::read_to_string(v1.join("notes.txt")).unwrap(), "v1");
    assert_eq!(std::fs::read_to_string(cache.path().join("models--tiny--blip2/refs/v1")).unwrap(), V1);
    let main = resolve_model_with("tiny/blip2", &at("main")).unwrap();
    assert!(!main.join("notes.txt").exists());
    // Blobs are shared between snapshots: only notes.txt and the listings went over the wire twice.
    assert_eq!(cdn_requests(&hub.log()).len(), 1);
    // A commit hash with a complete snapshot needs no network.
    hub.clear_log();
    assert_eq!(resolve_model_with("tiny/blip2", &at(V1)).unwrap(), v1);
    assert!(hub.log().is_empty());
    assert!(!cache.path().join(format!("models--tiny--blip2/refs/{V1}")).exists());
    // Offline, a revision resolves through its ref.
    assert_eq!(resolve_model_with("tiny/blip2", &HubOptions { offline: true, ..at("v1") }).unwrap(), v1);
    let e = err_text(resolve_model_with("tiny/blip2", &at("v9")));
    assert!(e.contains("`v9`") && e.contains("404") && e.contains("--revision"), "{e}");
    let e = err_text(resolve_model_with("tiny/blip2", &at("../../etc")));
    assert!(e.contains("not a branch, tag or commit"), "{e}");
}

#[test]
fn auth_and_missing_repos_name_the_fix() {
    let hub = start_hub();
    let cache = common::tempdir();
    let e = err_text(resolve_model_with("tiny/gated", &hub.opts(cache.path())));
    assert!(
        e.contains("gated")
            && e.contains("accept its licence")
            && e.contains(&format!("{}/tiny/gated", hub.url))
            && e.contains("HF_TOKEN"),
        "{e}"
    );
    let with_token = HubOptions { token: Some(TOKEN.into()), ..hub.opts(cache.path()) };
    resolve_model_with("tiny/gated", &with_token).unwrap();
    let log = hub.log();
    let hub_reqs: Vec<_> = log.iter().filter(|r| r.auth.is_some()).collect();
    assert!(!hub_reqs.is_empty());
    assert!(cdn_requests(&log).iter().all(|r| r.auth.is_none()), "the token went to the CDN");

    let e = err_text(resolve_model_with("tiny/nope", &hub.opts(cache.path())));
    assert!(
        e.contains("`tiny/nope`") && e.contains("401") && e.contains("check the id") && e.contains("HF_TOKEN"),
        "{e}"
    );
    let e = err_text(resolve_model_with("tiny/nope", &with_token));
    assert!(e.contains("`tiny/nope`") && e.contains("404"), "{e}");
}

/// A hub that accepts connections and never answers delays a cached model by the metadata
/// timeout only (huggingface_hub's HF_HUB_ETAG_TIMEOUT), not by the minute-long read timeout.
#[test]
fn an_unresponsive_hub_falls_back_to_the_cache_quickly() {
    let hub = start_hub();
    let cache = common::tempdir();
    let dir = resolve_model_with("tiny/blip2", &hub.opts(cache.path())).unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for s in silent.incoming().flatten() {
            keep.lock().unwrap().push(s);
        }
    });
    let start = Instant::now();
    let opts = HubOptions { endpoint, metadata_timeout: Duration::from_secs(1), ..hub.opts(cache.path()) };
    assert_eq!(resolve_model_with("tiny/blip2", &opts).unwrap(), dir);
    assert!(start.elapsed() < Duration::from_secs(8), "took {:?}", start.elapsed());
    assert!(!held.lock().unwrap().is_empty(), "the hub was asked");
}

#[test]
fn offline_and_unreachable_without_a_cached_copy() {
    let hub = start_hub();
    let cache = common::tempdir();
    let e = err_text(resolve_model_with("tiny/blip2", &HubOptions { offline: true, ..hub.opts(cache.path()) }));
    assert!(e.contains("offline") && e.contains("glimpse download tiny/blip2"), "{e}");
    assert!(hub.log().is_empty());
    let e =
        err_text(resolve_model_with("tiny/blip2", &HubOptions { endpoint: dead_endpoint(), ..hub.opts(cache.path()) }));
    assert!(e.contains("cannot reach") && e.contains("not in the cache") && e.contains("network"), "{e}");
}

fn glimpse_cmd(hub: &Hub, cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_glimpse"));
    c.env("HF_ENDPOINT", &hub.url)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .env("HF_TOKEN_PATH", cache.join("no-token"));
    c
}

#[test]
fn two_processes_download_the_same_model_at_once() {
    let hub = start_hub();
    let cache = common::tempdir();
    hub.faults().slow = true;
    let spawn = || {
        glimpse_cmd(&hub, cache.path())
            .args(["download", "tiny/blip2", "--quiet"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    let want = format!("{}\n", snapshot(cache.path(), "tiny/blip2", MAIN).display());
    assert_eq!(String::from_utf8_lossy(&a.stdout), want);
    assert_eq!(String::from_utf8_lossy(&b.stdout), want);
    // The lock let one process fetch the weights; the other found the verified blob.
    assert_eq!(cdn_requests(&hub.log()).len(), 1, "{:?}", hub.log());
    let model = fixture_files("blip2-opt-tiny").into_iter().find(|f| f.name == "model.safetensors").unwrap();
    assert_eq!(
        std::fs::read(snapshot(cache.path(), "tiny/blip2", MAIN).join("model.safetensors")).unwrap(),
        *model.bytes
    );
}

#[test]
fn cli_captions_a_hub_id_on_a_fresh_cache() {
    let hub = start_hub();
    let cache = common::tempdir();
    let image = common::image("odd_257x181.png");
    let o = glimpse_cmd(&hub, cache.path())
        .args(["caption", "--json", "--device", "cpu", "--model", "tiny/blip2"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rec: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let goldens = common::golden_json("blip2-opt-tiny.json");
    let case = goldens["cases"].as_array().unwrap().iter().find(|c| c["name"] == "caption_odd_257x181").unwrap();
    assert_eq!(rec["text"], case["text"]);
    // Off a terminal there is no progress bar.
    assert!(!String::from_utf8_lossy(&o.stderr).contains('\r'));

    // --offline and --revision reach the resolver.
    let o = glimpse_cmd(&hub, cache.path())
        .args(["caption", "--offline", "--revision", "v1", "--device", "cpu", "-m", "tiny/blip2"])
        .arg(&image)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("revision `v1` is not in the Hugging Face cache")
            && err.contains("--revision v1"),
        "{err}"
    );
}

#[test]
fn cli_reads_the_token_from_the_environment_and_the_token_file() {
    let hub = start_hub();
    let cache = common::tempdir();
    let o = glimpse_cmd(&hub, cache.path()).args(["download", "tiny/gated"]).output().unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("gated"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = glimpse_cmd(&hub, cache.path()).args(["download", "tiny/gated"]).env("HF_TOKEN", TOKEN).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("downloaded"), "{}", String::from_utf8_lossy(&o.stderr));
    let other = common::tempdir();
    let token_file = other.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let o = glimpse_cmd(&hub, other.path())
        .args(["download", "-q", "tiny/gated"])
        .env("HF_TOKEN_PATH", &token_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stderr.is_empty(), "--quiet: {}", String::from_utf8_lossy(&o.stderr));
    // HF_HUB_OFFLINE=1 refuses to download.
    let o = glimpse_cmd(&hub, common::tempdir().path())
        .args(["download", "tiny/blip2"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("offline"));
}

/// `download --offline` answers with a complete cached snapshot (as huggingface_hub's
/// `snapshot_download` offline) without a request, and still refuses when there is none.
#[test]
fn offline_download_of_a_complete_cached_snapshot_succeeds() {
    let hub = start_hub();
    let cache = common::tempdir();
    let dir = resolve_model_with("tiny/blip2", &hub.opts(cache.path())).unwrap();
    hub.clear_log();
    let o = glimpse_cmd(&hub, cache.path()).args(["download", "--offline", "-q", "tiny/blip2"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim_end(), dir.display().to_string());
    assert!(hub.log().is_empty(), "offline: no request");
    let o = glimpse_cmd(&hub, cache.path()).args(["download", "--offline", "tiny/gated"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("offline"));
}

/// huggingface_hub (when installed) finds what glimpse downloaded, and glimpse loads what
/// huggingface_hub downloaded from the same mock hub.
#[test]
fn the_cache_is_shared_with_huggingface_hub() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", "import huggingface_hub"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        println!(
            "skipped: {python} with huggingface_hub is not available (pip install huggingface_hub to run this check)"
        );
        return;
    }
    let hub = start_hub();
    let cache = common::tempdir();
    let dir = resolve_model_with("tiny/blip2", &hub.opts(cache.path())).unwrap();
    let script = "import sys, huggingface_hub as h\n\
                  p = h.snapshot_download('tiny/blip2', cache_dir=sys.argv[1], local_files_only=True)\n\
                  f = h.try_to_load_from_cache('tiny/blip2', 'model.safetensors', cache_dir=sys.argv[1])\n\
                  print(p); print(f)";
    let o = Command::new(&python).args(["-c", script]).arg(cache.path()).env("HF_HUB_OFFLINE", "1").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, [dir.display().to_string(), dir.join("model.safetensors").display().to_string()]);

    // transformers (when installed) loads the config and the processor from that cache offline,
    // and the model itself when torch is there too.
    let script = "import sys, importlib.util as u\n\
                  if u.find_spec('transformers') is None: print('skipped: transformers'); sys.exit(0)\n\
                  import transformers as t\n\
                  c = t.AutoConfig.from_pretrained('tiny/blip2', cache_dir=sys.argv[1], local_files_only=True)\n\
                  p = t.AutoProcessor.from_pretrained('tiny/blip2', cache_dir=sys.argv[1], local_files_only=True)\n\
                  print('config', c.model_type, 'processor', type(p).__name__)\n\
                  if u.find_spec('torch') is None: print('skipped: model weights (no torch)'); sys.exit(0)\n\
                  m = t.Blip2ForConditionalGeneration.from_pretrained('tiny/blip2', cache_dir=sys.argv[1], local_files_only=True)\n\
                  print('model', sum(x.numel() for x in m.parameters()))";
    let o = Command::new(&python).args(["-c", script]).arg(cache.path()).env("HF_HUB_OFFLINE", "1").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    println!("transformers on glimpse's cache: {}", out.trim());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.starts_with("skipped: transformers") || out.contains("config blip-2 processor Blip2Processor"),
        "{out}"
    );

    // The other way: huggingface_hub downloads from the mock hub, glimpse resolves offline.
    let theirs = common::tempdir();
    let script = "import sys, huggingface_hub as h\n\
                  print(h.snapshot_download('tiny/sharded', cache_dir=sys.argv[1], allow_patterns=['*.json', '*.safetensors']))";
    let o = Command::new(&python)
        .args(["-c", script])
        .arg(theirs.path())
        .env("HF_ENDPOINT", &hub.url)
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HUB_DISABLE_XET", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let offline = HubOptions { offline: true, ..hub.opts(theirs.path()) };
    let dir = resolve_model_with("tiny/sharded", &offline).unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), dir.display().to_string());
    glimpse::weights::Checkpoint::open_dir(&dir).unwrap();
    // And online, glimpse finds their blobs complete: only the listing is asked for.
    hub.clear_log();
    resolve_model_with("tiny/sharded", &hub.opts(theirs.path())).unwrap();
    assert_eq!(hub.log().len(), 1, "{:?}", hub.log());
}
