//! `glimpse serve`: an OpenAI-compatible HTTP server (docs/serve.md).
//!
//! - routes.rs: the axum routes, API key check, request counting, the SSE pump;
//! - openai.rs: request bodies parsed field by field; response.rs: response bodies;
//!   error.rs: OpenAI's error object;
//! - media.rs: image bytes of an `image_url`; prepare.rs: a request made ready for the worker
//!   (images preprocessed, prompt tokenized, settings resolved), off the async threads;
//! - scheduler.rs: the bounded queue and the one worker thread that runs the model, batching
//!   compatible requests into one call (request-level batching: requests do not join a running
//!   decode; iteration-level continuous batching is the next step);
//! - cache.rs: the image cache (image features by the SHA-256 of the image bytes, LRU);
//! - text.rs: stop sequences and streamed text; metrics.rs: Prometheus metrics.

mod cache;
mod error;
mod media;
mod metrics;
mod openai;
mod prepare;
mod response;
mod routes;
mod scheduler;
mod text;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::api::{Device, EmbedModel, Model};
use crate::error::{Error, Result};

/// `glimpse serve` options (the model's hub options are the CLI's own).
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Model folder, or a hub id (downloaded on first use): a generating model (BLIP-2,
    /// InstructBLIP, LLaVA) answers /v1/chat/completions, a CLIP model /v1/embeddings.
    #[arg(long, short)]
    pub model: String,
    /// cpu, cuda, or auto (CUDA when usable, else CPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The name requests give as `model` and /v1/models lists (default: --model as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Requests run together in one model call at most. On the CPU every greedy answer is
    /// byte-identical to the same request sent alone, whatever the batch (docs/serve.md,
    /// "Scheduling"); larger calls trade latency for throughput.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub max_batch: u64,
    /// Requests waiting for the model at most; more are refused with 429 and Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_queue: u64,
    /// Require `Authorization: Bearer KEY` on /v1/* (/health and /metrics stay open).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Largest request body (and largest file:// image) in bytes.
    #[arg(long, default_value_t = 32 << 20, value_parser = clap::value_parser!(u64).range(1024..=(1 << 32)))]
    pub max_body_bytes: u64,
    /// Seconds a request may take from arrival to its last token (408 after that).
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout_s: f64,
    /// Bytes of image features kept for images seen before (identical bytes skip the vision
    /// tower, Q-Former and projector); least recently used go first. 0 turns the cache off.
    #[arg(long, default_value_t = 256 << 20)]
    pub image_cache_bytes: u64,
    /// Allow `file://` image URLs of files under this folder (none by default).
    #[arg(long, value_name = "DIR")]
    pub allowed_local_media: Option<PathBuf>,
    /// Quantize a generating model's language decoder at load: int8 or int4 (weight-only; CPU
    /// only for now; see README "Quantization"). Refused for an embedding model.
    #[arg(long, value_name = "int8|int4")]
    pub quantize: Option<crate::quant::Quantize>,
    /// Testing only: pause this long after each generated token.
    #[arg(long, hide = true, default_value_t = 0)]
    pub debug_token_delay_ms: u64,
}

/// The loaded model: one that generates or one that embeds.
#[derive(Clone)]
pub enum Served {
    Generate(Arc<Model>),
    Embed(Arc<EmbedModel>),
}

impl Served {
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        Self::load_with(dir, device, crate::api::LoadOptions::default())
    }

    /// [`Served::load`] with load options (quantization: generating models only).
    pub fn load_with(dir: &Path, device: Device, options: crate::api::LoadOptions) -> Result<Self> {
        let cfg = crate::models::ModelConfig::load(&dir.join("config.json"))?;
        Ok(if cfg.embeds() {
            if let Some(q) = options.quantize {
                return Err(Error::Unsupported(format!(
                    "--quantize {q} applies to generating models (their language decoder); {} is an embedding model: serve it without --quantize",
                    dir.display()
                )));
            }
            Served::Embed(Arc::new(EmbedModel::load(dir, device)?))
        } else {
            Served::Generate(Arc::new(Model::load_with(dir, device, options)?))
        })
    }

    fn backend_name(&self) -> String {
        match self {
            Served::Generate(m) => m.backend_name(),
            Served::Embed(m) => m.backend_name(),
        }
    }

    /// The model when it generates text (the chat route's), else None.
    fn generating(&self) -> Option<&Arc<Model>> {
        match self {
            Served::Generate(model) => Some(model),
            Served::Embed(_) => None,
        }
    }

    /// The model when it embeds (the embeddings route's), else None.
    fn embedding(&self) -> Option<&Arc<EmbedModel>> {
        match self {
            Served::Embed(model) => Some(model),
            Served::Generate(_) => None,
        }
    }
}

/// What every handler shares.
pub struct Shared {
    served: Served,
    name: String,
    queue: Arc<scheduler::Queue>,
    metrics: Arc<metrics::Metrics>,
    media: media::MediaPolicy,
    api_key: Option<String>,
    timeout: Duration,
    max_queue: usize,
    max_body_bytes: usize,
    /// Bounds the requests whose images are being decoded at once.
    preparing: tokio::sync::Semaphore,
    started: u64,
}

/// Loads the model in `dir`, serves until SIGTERM or Ctrl-C, then drains: no new connections,
/// every request already in finishes, then the worker stops.
pub fn run(args: &ServeArgs, dir: &Path) -> Result<()> {
    if !(args.request_timeout_s.is_finite() && args.request_timeout_s > 0.0) {
        return Err(Error::InvalidInput(format!(
            "--request-timeout-s is {}: it must be a positive number of seconds",
            args.request_timeout_s
        )));
    }
    let device = args.device.parse::<Device>()?;
    let media = media::MediaPolicy::new(args.allowed_local_media.as_deref(), args.max_body_bytes)?;
    let served = Served::load_with(dir, device, crate::api::LoadOptions { quantize: args.quantize })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("glimpse-serve-http")
        .build()
        .map_err(|e| Error::InvalidInput(format!("could not start the async runtime: {e}")))?;
    runtime.block_on(serve(args, served, media))
}

async fn serve(args: &ServeArgs, served: Served, media: media::MediaPolicy) -> Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    let max_queue = args.max_queue as usize;
    let queue = Arc::new(scheduler::Queue::new(max_queue, metrics.clone()));
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await.map_err(|e| {
        Error::InvalidInput(format!(
            "could not listen on {}:{}: {e} (pick another --port, or 0 for a free one)",
            args.host, args.port
        ))
    })?;
    let addr: SocketAddr =
        listener.local_addr().map_err(|e| Error::InvalidInput(format!("the listening address: {e}")))?;
    let worker = scheduler::Worker {
        served: served.clone(),
        queue: queue.clone(),
        metrics: metrics.clone(),
        max_batch: args.max_batch as usize,
        cache: (args.image_cache_bytes > 0).then(|| cache::ImageCache::new(args.image_cache_bytes as usize)),
        token_delay: Duration::from_millis(args.debug_token_delay_ms),
    }
    .spawn()
    .map_err(|e| Error::InvalidInput(format!("could not start the worker thread: {e}")))?;
    let name = args.served_model_name.clone().unwrap_or_else(|| args.model.clone());
    let backend = served.backend_name();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let shared = Arc::new(Shared {
        served,
        name: name.clone(),
        queue: queue.clone(),
        metrics,
        media,
        api_key: args.api_key.clone(),
        timeout: Duration::from_secs_f64(args.request_timeout_s),
        max_queue,
        max_body_bytes: args.max_body_bytes as usize,
        preparing: tokio::sync::Semaphore::new(cores.max(2)),
        started: response::unix_time(),
    });
    let app = routes::router(shared, args.max_body_bytes as usize);
    // The address on stdout, one line, for scripts and tests that start on --port 0.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening on http://{addr}");
    let _ = out.flush();
    let _ = writeln!(
        std::io::stderr(),
        "glimpse serve: {name} on {backend}, up to {} requests per model call, {max_queue} waiting at most",
        args.max_batch
    );
    let served = axum::serve(listener, app).with_graceful_shutdown(stop_signal()).await;
    // No new requests; the worker finishes what is queued, then ends.
    queue.close();
    let _ = worker.join();
    served.map_err(|e| Error::InvalidInput(format!("the server stopped: {e}")))
}

/// SIGTERM or Ctrl-C (a signal that cannot be watched never fires).
async fn stop_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut t) => {
                t.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    let _ = writeln!(std::io::stderr(), "glimpse serve: stopping: finishing the requests already in");
}
