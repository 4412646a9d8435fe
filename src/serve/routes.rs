//! The HTTP routes: axum handlers, the API key check, request counting, and the SSE pump of a
//! streamed completion.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::{json_response, ApiError};
use super::metrics::route_label;
use super::openai::{ChatRequest, EmbeddingsRequest};
use super::response::{self, Meta};
use super::scheduler::{Event, Job, Rejected, Reply, Work};
use super::{prepare, Shared};

pub fn router(shared: Arc<Shared>, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(shared.clone(), count))
        .with_state(shared)
}

type Result<T> = std::result::Result<T, ApiError>;

/// Counts every answered request by route and status.
async fn count(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let resp = next.run(req).await;
    s.metrics.count_request(route, resp.status().as_u16());
    resp
}

/// `--api-key`: `/v1/*` needs `Authorization: Bearer KEY` (health and metrics do not).
async fn auth(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let unauthorized = |message: &str| {
            ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: message.into(),
                kind: "authentication_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response()
        };
        match given.and_then(|v| v.strip_prefix("Bearer ")) {
            None => return unauthorized("no API key given: send the header `Authorization: Bearer <key>`"),
            Some(k) if !same(k.trim().as_bytes(), key.as_bytes()) => {
                return unauthorized("incorrect API key: send the key the server was started with (--api-key)")
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// Equality that takes as long whatever the first differing byte is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let mut resp = s.metrics.render().into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    resp
}

async fn models(State(s): State<Arc<Shared>>) -> Response {
    json_response(StatusCode::OK, &response::models(&s.name, s.started))
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::bad_request(format!("Invalid URL ({method} {}): glimpse serve answers POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models, GET /health and GET /metrics", uri.path()))
        .with_status(StatusCode::NOT_FOUND)
        .into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::bad_request(format!("{method} is not allowed on {}", uri.path()))
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
        .into_response()
}

/// A request body as axum hands it over: the bytes, or why they could not be read.
type RawBody = std::result::Result<Bytes, BytesRejection>;

/// The body as JSON: over `--max-body-bytes` is a 413, anything but JSON a 400.
fn json_body(body: RawBody, limit: usize) -> Result<Value> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::bad_request(format!(
                "the request body is over {limit} bytes (--max-body-bytes): send smaller images or raise the limit"
            ))
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
        } else {
            ApiError::bad_request(format!("the request body could not be read: {}", e.body_text()))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// The JSON body of a POST route: parsed as OpenAI's API defines it, naming the model it asks.
trait RouteRequest: Sized {
    fn parse(body: &Value) -> Result<Self>;
    fn model(&self) -> &str;
}

impl RouteRequest for ChatRequest {
    fn parse(body: &Value) -> Result<Self> {
        ChatRequest::parse(body)
    }
    fn model(&self) -> &str {
        &self.model
    }
}

impl RouteRequest for EmbeddingsRequest {
    fn parse(body: &Value) -> Result<Self> {
        EmbeddingsRequest::parse(body)
    }
    fn model(&self) -> &str {
        &self.model
    }
}

impl Shared {
    /// A request as it arrives: its body read, parsed and checked to ask for the served model,
    /// with the instant by which it must be answered (`--request-timeout-s` from now).
    fn accept<R: RouteRequest>(&self, body: RawBody) -> Result<(R, tokio::time::Instant)> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let req = R::parse(&json_body(body, self.max_body_bytes)?)?;
        self.check_model(req.model())?;
        Ok((req, deadline))
    }

    /// The 400 for a request the served model does not take: `does` says what it does instead
    /// and which route to use.
    fn wrong_route(&self, does: &str) -> ApiError {
        ApiError::bad_request(format!("`{}` {does}", self.name))
    }

    fn check_model(&self, name: &str) -> Result<()> {
        if name == self.name {
            return Ok(());
        }
        Err(ApiError::invalid(
            "model",
            format!("the model `{name}` does not exist: this server serves `{}`", self.name),
        )
        .with_status(StatusCode::NOT_FOUND)
        .with_code("model_not_found"))
    }

    fn full(&self) -> ApiError {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "the server's queue is full ({} requests waiting, --max-queue): retry after a moment",
                self.max_queue
            ),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        }
    }

    /// Preprocessing runs off the async threads; the queue is checked first so a full server
    /// refuses before decoding anything.
    async fn prepare<T: Send + 'static, R: Send + 'static>(
        &self,
        req: R,
        f: impl FnOnce(&R) -> Result<T> + Send + 'static,
    ) -> Result<(T, R)> {
        if self.queue.is_full() {
            return Err(self.full());
        }
        let _permit = self.preparing.acquire().await.map_err(|_| ApiError::server("the server is stopping"))?;
        tokio::task::spawn_blocking(move || {
            let out = f(&req);
            out.map(|t| (t, req))
        })
        .await
        .map_err(|_| ApiError::server("preparing the request panicked (a glimpse bug: please report it)"))?
    }

    fn submit(&self, work: Work) -> Result<mpsc::UnboundedReceiver<Event>> {
        let (tx, rx) = mpsc::unbounded_channel();
        match self.queue.submit(Job { work, reply: Reply { events: tx, queued_at: Instant::now() } }) {
            Ok(()) => Ok(rx),
            Err(Rejected::Full) => Err(self.full()),
            Err(Rejected::Closed) => {
                Err(ApiError::server("the server is shutting down").with_status(StatusCode::SERVICE_UNAVAILABLE))
            }
        }
    }

    fn timeout(&self) -> ApiError {
        ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the request did not finish within {} s (--request-timeout-s): ask for fewer tokens or retry when the server is less busy",
                self.timeout.as_secs_f64()
            ),
            kind: "timeout_error",
            param: None,
            code: Some("request_timeout"),
        }
    }
}

/// The next event other than a stream delta, within the request's time.
async fn outcome(s: &Shared, rx: &mut mpsc::UnboundedReceiver<Event>, deadline: tokio::time::Instant) -> Result<Event> {
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Event::Delta { .. })) => continue,
            Ok(Some(Event::Failed(e))) => return Err(e),
            Ok(Some(e)) => return Ok(e),
            Ok(None) => return Err(ApiError::server("the worker stopped before answering")),
            Err(_) => return Err(s.timeout()),
        }
    }
}

async fn chat(State(s): State<Arc<Shared>>, body: RawBody) -> Result<Response> {
    let (req, deadline) = s.accept::<ChatRequest>(body)?;
    let model = s
        .served
        .generating()
        .cloned()
        .ok_or_else(|| s.wrong_route("embeds images and texts, it does not chat: use POST /v1/embeddings"))?;
    let media = s.media.clone();
    let (job, req) = s.prepare(req, move |r| prepare::chat_job(&model, r, &media)).await?;
    let mut rx = s.submit(Work::Generate(Box::new(job)))?;
    let meta = Meta::new(&s.name);
    if req.stream {
        let (tx, body) = mpsc::channel(32);
        tokio::spawn(pump(s.clone(), meta, req, rx, tx, deadline));
        let mut resp = Response::new(Body::from_stream(ChannelBody(body)));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(resp);
    }
    match outcome(&s, &mut rx, deadline).await? {
        Event::Generated(g) => Ok(json_response(StatusCode::OK, &response::completion(&meta, &g))),
        _ => Err(ApiError::server("the worker answered a chat request with something else")),
    }
}

/// A streamed body fed by a channel: dropped when the client goes away, which closes the
/// channel, which stops the pump, which drops the request's receiver, which the worker sees.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl futures_core::Stream for ChannelBody {
    type Item = std::result::Result<Bytes, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|b| b.map(Ok))
    }
}

/// Server-sent events of one streamed completion: a role chunk per choice, the first choice's
/// text as it is generated, the other choices' text when they end, a finish chunk per choice,
/// the usage chunk when asked, then `data: [DONE]`. An error after the headers went out is an
/// `error` event.
async fn pump(
    s: Arc<Shared>,
    meta: Meta,
    req: ChatRequest,
    mut rx: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::Sender<Bytes>,
    deadline: tokio::time::Instant,
) {
    let send = |v: Value| {
        let tx = tx.clone();
        async move { tx.send(Bytes::from(format!("data: {v}\n\n"))).await.is_ok() }
    };
    for i in 0..req.n {
        if !send(response::chunk(&meta, i, json!({"role": "assistant", "content": ""}), Value::Null, None)).await {
            return;
        }
    }
    loop {
        let event = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => Event::Failed(ApiError::server("the worker stopped before answering")),
            Err(_) => Event::Failed(s.timeout()),
        };
        match event {
            Event::Delta { text, token } => {
                let logprobs = match (&token, req.logprobs) {
                    (Some(t), true) => json!({"content": response::logprob_entries(std::slice::from_ref(t))}),
                    _ => Value::Null,
                };
                if (!text.is_empty() || !logprobs.is_null())
                    && !send(response::chunk(&meta, 0, json!({"content": text}), logprobs, None)).await
                {
                    return;
                }
            }
            Event::Generated(g) => {
                for (i, c) in g.choices.iter().enumerate().skip(1) {
                    if !send(response::chunk(&meta, i, json!({"content": c.text}), Value::Null, None)).await {
                        return;
                    }
                }
                for (i, c) in g.choices.iter().enumerate() {
                    if !send(response::chunk(&meta, i, json!({}), Value::Null, Some(c.finish_reason))).await {
                        return;
                    }
                }
                if req.include_usage && !send(response::usage_chunk(&meta, &g)).await {
                    return;
                }
                break;
            }
            Event::Failed(e) => {
                if !send(e.body()).await {
                    return;
                }
                break;
            }
            Event::Embedded(_) => {
                let _ = send(ApiError::server("the worker answered a chat request with embeddings").body()).await;
                break;
            }
        }
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}

async fn embeddings(State(s): State<Arc<Shared>>, body: RawBody) -> Result<Response> {
    let (req, deadline) = s.accept::<EmbeddingsRequest>(body)?;
    let model = s.served.embedding().cloned().ok_or_else(|| {
        s.wrong_route("generates text, it does not embed: use POST /v1/chat/completions (embeddings need a CLIP model)")
    })?;
    let media = s.media.clone();
    let ((items, tokens), req) = s.prepare(req, move |r| prepare::embed_job(&model, r, &media)).await?;
    let mut rx = s.submit(Work::Embed(items))?;
    match outcome(&s, &mut rx, deadline).await? {
        Event::Embedded(v) => Ok(json_response(StatusCode::OK, &response::embeddings(&s.name, &v, req.base64, tokens))),
        _ => Err(ApiError::server("the worker answered an embeddings request with something else")),
    }
}
