//! OpenAI response bodies: chat completions, their streamed chunks, embeddings, models.

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use serde_json::{json, Value};

use super::scheduler::{Choice, Generated, TokenLogprob};

/// `chatcmpl-...`: unique within the process (time and a counter).
pub fn completion_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("chatcmpl-{:x}{n:06x}", unix_time())
}

pub fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What every response of one request repeats.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Meta {
    pub fn new(model: &str) -> Self {
        Self { id: completion_id(), created: unix_time(), model: model.to_string() }
    }
}

fn usage(g: &Generated) -> Value {
    let completion: usize = g.choices.iter().map(|c| c.tokens).sum();
    json!({"prompt_tokens": g.prompt_tokens, "completion_tokens": completion, "total_tokens": g.prompt_tokens + completion})
}

pub fn logprob_entries(tokens: &[TokenLogprob]) -> Value {
    Value::Array(
        tokens
            .iter()
            .map(|t| json!({"token": t.token, "logprob": t.logprob, "bytes": t.token.as_bytes(), "top_logprobs": []}))
            .collect(),
    )
}

fn logprobs(c: &Choice) -> Value {
    c.logprobs.as_ref().map_or(Value::Null, |t| json!({"content": logprob_entries(t)}))
}

/// `chat.completion`.
pub fn completion(meta: &Meta, g: &Generated) -> Value {
    let choices: Vec<Value> = g
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs(c),
                "finish_reason": c.finish_reason,
            })
        })
        .collect();
    json!({
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "choices": choices, "usage": usage(g),
    })
}

/// One `chat.completion.chunk` with one choice.
pub fn chunk(meta: &Meta, index: usize, delta: Value, logprobs: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    })
}

/// The last chunk of `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk(meta: &Meta, g: &Generated) -> Value {
    json!({
        "id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
        "choices": [], "usage": usage(g),
    })
}

pub fn embeddings(model: &str, vectors: &[Vec<f32>], base64: bool, prompt_tokens: usize) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
}

pub fn models(name: &str, created: u64) -> Value {
    json!({"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "glimpse"}]})
}
