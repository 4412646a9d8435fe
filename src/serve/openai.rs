//! OpenAI request bodies parsed into what glimpse runs, field by field: unknown fields are
//! ignored, a known field with a wrong type or value is a 400 naming it and the value.

use serde_json::{Map, Value};

use super::error::{shown, ApiError};

/// The most `stop` sequences a request gives (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// The most choices one request asks for (`n`): each is a sequence with its own cache.
pub const MAX_N: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    /// An `image_url` part: its URL and the request field that holds it (for errors).
    Image {
        url: String,
        param: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

/// `POST /v1/chat/completions`, as glimpse runs it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not OpenAI's (vLLM's extension): top-k filtering when sampling, 0 disables it.
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
}

/// One input of `POST /v1/embeddings`.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedInput {
    Text(String),
    /// A `data:` URI: embedded as an image.
    Image(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub inputs: Vec<EmbedInput>,
    /// `encoding_format: "base64"`: each embedding as base64 of its little-endian float32s.
    pub base64: bool,
    pub dimensions: Option<usize>,
}

/// The most inputs one embeddings request takes (OpenAI's limit).
pub const MAX_EMBED_INPUTS: usize = 2048;

fn object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object()
        .ok_or_else(|| ApiError::bad_request(format!("the request body must be a JSON object, got {}", shown(body))))
}

/// A present, non-null field.
fn field<'a>(o: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    o.get(name).filter(|v| !v.is_null())
}

fn model(o: &Map<String, Value>) -> Result<String, ApiError> {
    match field(o, "model") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(ApiError::invalid("model", format!("`model` must be a string, got {}", shown(v)))),
        None => Err(ApiError::invalid("model", "`model` is missing: name the served model (GET /v1/models lists it)")),
    }
}

fn bool_field(o: &Map<String, Value>, name: &str) -> Result<bool, ApiError> {
    match field(o, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::invalid(name, format!("`{name}` must be true or false, got {}", shown(v)))),
    }
}

fn number(o: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    match field(o, name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(name, format!("`{name}` must be a number, got {}", shown(v)))),
    }
}

/// A non-negative integer field.
fn count(o: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    match field(o, name) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::invalid(name, format!("`{name}` must be a non-negative integer, got {}", shown(v)))
        }),
    }
}

/// A field that glimpse does not run: accepted at its neutral value, else a 400 that says so.
fn unsupported_unless(o: &Map<String, Value>, name: &str, neutral: impl Fn(&Value) -> bool) -> Result<(), ApiError> {
    match field(o, name) {
        Some(v) if !neutral(v) => Err(ApiError::invalid(
            name,
            format!("`{name}` ({}) is not supported by glimpse serve: leave it out", shown(v)),
        )),
        _ => Ok(()),
    }
}

impl ChatRequest {
    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        let o = object(body)?;
        let model = model(o)?;
        let messages = match field(o, "messages") {
            Some(Value::Array(list)) if !list.is_empty() => {
                list.iter().enumerate().map(|(i, m)| parse_message(i, m)).collect::<Result<Vec<_>, _>>()?
            }
            Some(Value::Array(_)) => {
                return Err(ApiError::invalid("messages", "`messages` is empty: give at least one user message"))
            }
            Some(v) => {
                return Err(ApiError::invalid("messages", format!("`messages` must be a list, got {}", shown(v))))
            }
            None => return Err(ApiError::invalid("messages", "`messages` is missing")),
        };
        let mut max_tokens = None;
        // max_completion_tokens replaces the deprecated max_tokens; either may be given.
        for name in ["max_tokens", "max_completion_tokens"] {
            match count(o, name)? {
                Some(0) => {
                    return Err(ApiError::invalid(
                        name,
                        format!("`{name}` is 0: it must be at least 1 (leave it out for the model's default)"),
                    ))
                }
                Some(n) => {
                    let n = usize::try_from(n).unwrap_or(usize::MAX).min(crate::generate::MAX_NEW_TOKENS + 1);
                    if n > crate::generate::MAX_NEW_TOKENS {
                        return Err(ApiError::invalid(
                            name,
                            format!(
                                "`{name}` is over {}: glimpse generates at most that many tokens per sequence",
                                crate::generate::MAX_NEW_TOKENS
                            ),
                        ));
                    }
                    max_tokens = Some(n);
                }
                None => {}
            }
        }
        let temperature = number(o, "temperature")?;
        if let Some(t) = temperature.filter(|t| !(0.0..=2.0).contains(t)) {
            return Err(ApiError::invalid(
                "temperature",
                format!("`temperature` is {t}: it must be between 0 and 2 (0 is greedy decoding)"),
            ));
        }
        let top_p = number(o, "top_p")?;
        if let Some(p) = top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(ApiError::invalid("top_p", format!("`top_p` is {p}: it must be in (0, 1]")));
        }
        let top_k = count(o, "top_k")?.map(|k| usize::try_from(k).unwrap_or(usize::MAX));
        let seed =
            match field(o, "seed") {
                None => None,
                Some(v) => Some(v.as_u64().or_else(|| v.as_i64().map(|s| s as u64)).ok_or_else(|| {
                    ApiError::invalid("seed", format!("`seed` must be an integer, got {}", shown(v)))
                })?),
            };
        let stop = match field(o, "stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|s| match s {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(ApiError::invalid("stop", format!("`stop` must hold strings, got {}", shown(v)))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(v) => {
                return Err(ApiError::invalid(
                    "stop",
                    format!("`stop` must be a string or a list of strings, got {}", shown(v)),
                ))
            }
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(
                "stop",
                format!("`stop` holds {} strings: give at most {MAX_STOP}", stop.len()),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "`stop` holds an empty string: every stop sequence needs a character",
            ));
        }
        let n = match count(o, "n")? {
            None => 1,
            Some(n @ 1..) if n <= MAX_N as u64 => n as usize,
            Some(n) => return Err(ApiError::invalid("n", format!("`n` is {n}: it must be between 1 and {MAX_N}"))),
        };
        let stream = bool_field(o, "stream")?;
        let include_usage = match field(o, "stream_options") {
            None => false,
            Some(_) if !stream => {
                return Err(ApiError::invalid("stream_options", "`stream_options` is only allowed with `stream: true`"))
            }
            Some(Value::Object(so)) => bool_field(so, "include_usage").map_err(|mut e| {
                e.param = Some("stream_options.include_usage".into());
                e
            })?,
            Some(v) => {
                return Err(ApiError::invalid(
                    "stream_options",
                    format!("`stream_options` must be an object, got {}", shown(v)),
                ))
            }
        };
        let logprobs = bool_field(o, "logprobs")?;
        match count(o, "top_logprobs")? {
            None | Some(0) => {}
            Some(k) if k <= 20 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` is {k}: glimpse returns each chosen token's log-probability but not yet the alternatives; leave it out or set 0"),
                ))
            }
            Some(k) => return Err(ApiError::invalid("top_logprobs", format!("`top_logprobs` is {k}: it must be between 0 and 20"))),
        }
        if logprobs && n > 1 {
            return Err(ApiError::invalid(
                "logprobs",
                "`logprobs` with `n` > 1 is not supported yet (the other choices carry no log-probabilities): ask with n = 1",
            ));
        }
        let zero = |v: &Value| v.as_f64() == Some(0.0);
        unsupported_unless(o, "presence_penalty", zero)?;
        unsupported_unless(o, "frequency_penalty", zero)?;
        unsupported_unless(o, "logit_bias", |v| v.as_object().is_some_and(Map::is_empty))?;
        unsupported_unless(o, "tools", |v| v.as_array().is_some_and(Vec::is_empty))?;
        unsupported_unless(o, "functions", |v| v.as_array().is_some_and(Vec::is_empty))?;
        unsupported_unless(o, "response_format", |v| v.get("type").and_then(Value::as_str) == Some("text"))?;
        Ok(Self {
            model,
            messages,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            n,
            stream,
            include_usage,
            logprobs,
        })
    }
}

fn parse_message(i: usize, m: &Value) -> Result<Message, ApiError> {
    let param = format!("messages[{i}]");
    let o = m
        .as_object()
        .ok_or_else(|| ApiError::invalid(&param, format!("`{param}` must be an object, got {}", shown(m))))?;
    let role = match field(o, "role").and_then(Value::as_str) {
        Some("system" | "developer") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some(r) => {
            return Err(ApiError::invalid(
                format!("{param}.role"),
                format!("`{param}.role` is {r:?}: glimpse serve takes system, developer, user and assistant messages"),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                format!("{param}.role"),
                format!(
                    "`{param}.role` must be a string (user, assistant, system), got {}",
                    shown(o.get("role").unwrap_or(&Value::Null))
                ),
            ))
        }
    };
    let parts = match field(o, "content") {
        Some(Value::String(s)) => vec![Part::Text(s.clone())],
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| parse_part(&format!("{param}.content[{j}]"), p))
            .collect::<Result<Vec<_>, _>>()?,
        None if role == Role::Assistant => Vec::new(),
        Some(v) => {
            return Err(ApiError::invalid(
                format!("{param}.content"),
                format!("`{param}.content` must be a string or a list of parts, got {}", shown(v)),
            ))
        }
        None => return Err(ApiError::invalid(format!("{param}.content"), format!("`{param}.content` is missing"))),
    };
    if role != Role::User && parts.iter().any(|p| matches!(p, Part::Image { .. })) {
        return Err(ApiError::invalid(
            format!("{param}.content"),
            format!("`{param}` is a {} message with an image: images go in user messages", role.as_str()),
        ));
    }
    Ok(Message { role, parts })
}

fn parse_part(param: &str, p: &Value) -> Result<Part, ApiError> {
    let kind = p.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => match p.get("text") {
            Some(Value::String(t)) => Ok(Part::Text(t.clone())),
            v => Err(ApiError::invalid(
                format!("{param}.text"),
                format!("`{param}.text` must be a string, got {}", shown(v.unwrap_or(&Value::Null))),
            )),
        },
        Some("image_url") => {
            let url = match p.get("image_url") {
                Some(Value::String(u)) => Some(u),
                Some(Value::Object(o)) => match o.get("url") {
                    Some(Value::String(u)) => Some(u),
                    _ => None,
                },
                _ => None,
            };
            match url {
                Some(url) => Ok(Part::Image { url: url.clone(), param: format!("{param}.image_url") }),
                None => Err(ApiError::invalid(
                    format!("{param}.image_url"),
                    format!(
                        "`{param}.image_url` must be an object with a `url` string, got {}",
                        shown(p.get("image_url").unwrap_or(&Value::Null))
                    ),
                )),
            }
        }
        Some(other) => Err(ApiError::invalid(
            format!("{param}.type"),
            format!("content part type {other:?} is not supported: glimpse serve takes `text` and `image_url` parts"),
        )),
        None => Err(ApiError::invalid(
            format!("{param}.type"),
            format!("`{param}` needs a `type` string (`text` or `image_url`), got {}", shown(p)),
        )),
    }
}

impl EmbeddingsRequest {
    pub fn parse(body: &Value) -> Result<Self, ApiError> {
        let o = object(body)?;
        let model = model(o)?;
        let one = |i: Option<usize>, v: &Value| -> Result<EmbedInput, ApiError> {
            let param = i.map_or("input".to_string(), |i| format!("input[{i}]"));
            match v {
                Value::String(s) if s.starts_with("data:") => Ok(EmbedInput::Image(s.clone())),
                Value::String(s) if s.is_empty() => Err(ApiError::invalid(param, "an input is an empty string: give text or a data: URI")),
                Value::String(s) => Ok(EmbedInput::Text(s.clone())),
                Value::Number(_) | Value::Array(_) => Err(ApiError::invalid(
                    param,
                    "token id inputs are not supported: send the text itself (glimpse tokenizes it as CLIPProcessor does)",
                )),
                v => Err(ApiError::invalid(param, format!("an input must be a string, got {}", shown(v)))),
            }
        };
        let inputs = match field(o, "input") {
            Some(Value::Array(list)) if list.is_empty() => {
                return Err(ApiError::invalid("input", "`input` is empty: give at least one text or image"))
            }
            Some(Value::Array(list)) if list.len() > MAX_EMBED_INPUTS => {
                return Err(ApiError::invalid(
                    "input",
                    format!("`input` holds {} items: give at most {MAX_EMBED_INPUTS}", list.len()),
                ))
            }
            Some(Value::Array(list)) => {
                list.iter().enumerate().map(|(i, v)| one(Some(i), v)).collect::<Result<Vec<_>, _>>()?
            }
            Some(v) => vec![one(None, v)?],
            None => return Err(ApiError::invalid("input", "`input` is missing")),
        };
        let base64 = match field(o, "encoding_format").map(|v| (v, v.as_str())) {
            None | Some((_, Some("float"))) => false,
            Some((_, Some("base64"))) => true,
            Some((v, _)) => {
                return Err(ApiError::invalid(
                    "encoding_format",
                    format!("`encoding_format` is {}: use \"float\" or \"base64\"", shown(v)),
                ))
            }
        };
        let dimensions = count(o, "dimensions")?.map(|d| usize::try_from(d).unwrap_or(usize::MAX));
        Ok(Self { model, inputs, base64, dimensions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(body: Value) -> ApiError {
        ChatRequest::parse(&body).unwrap_err()
    }

    fn user(text: &str) -> Value {
        json!([{"role": "user", "content": text}])
    }

    #[test]
    fn a_full_request_parses_and_unknown_fields_are_ignored() {
        let r = ChatRequest::parse(&json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==", "detail": "low"}},
                    {"type": "text", "text": "what?"}
                ]}
            ],
            "max_completion_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": "x", "n": 2,
            "stream": true, "stream_options": {"include_usage": true}, "some_new_field": {"x": 1}
        }))
        .unwrap();
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!((r.temperature, r.top_p, r.seed, r.n), (Some(0.5), Some(0.9), Some(7), 2));
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.messages[0].role, Role::System);
        assert_eq!(
            r.messages[1].parts,
            vec![
                Part::Image {
                    url: "data:image/png;base64,AA==".into(),
                    param: "messages[1].content[0].image_url".into()
                },
                Part::Text("what?".into())
            ]
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (json!({"model": "m", "messages": user("hi"), "max_tokens": 0}), "max_tokens"),
            (json!({"model": "m", "messages": user("hi"), "max_tokens": "5"}), "max_tokens"),
            (json!({"model": "m", "messages": user("hi"), "temperature": 3}), "temperature"),
            (json!({"model": "m", "messages": user("hi"), "top_p": 0}), "top_p"),
            (json!({"model": "m", "messages": user("hi"), "n": 0}), "n"),
            (json!({"model": "m", "messages": user("hi"), "stop": [1]}), "stop"),
            (json!({"model": "m", "messages": user("hi"), "stream_options": {}}), "stream_options"),
            (json!({"model": "m", "messages": user("hi"), "top_logprobs": 3}), "top_logprobs"),
            (json!({"model": "m", "messages": user("hi"), "presence_penalty": 1}), "presence_penalty"),
            (json!({"model": 5, "messages": user("hi")}), "model"),
            (json!({"messages": user("hi")}), "model"),
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}), "messages[0].role"),
            (json!({"model": "m", "messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
                "messages[0].content[0].image_url",
            ),
        ];
        for (body, param) in cases {
            let e = err(body.clone());
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert_eq!(e.kind, "invalid_request_error");
        }
        assert!(err(json!({"model": "m", "messages": user("hi"), "max_tokens": 0})).message.contains("is 0"));
        assert!(err(json!([1])).message.contains("JSON object"));
    }

    #[test]
    fn neutral_values_of_unsupported_fields_pass() {
        let r = ChatRequest::parse(&json!({
            "model": "m", "messages": user("hi"), "presence_penalty": 0, "frequency_penalty": 0.0,
            "logit_bias": {}, "tools": [], "response_format": {"type": "text"}, "top_logprobs": 0, "logprobs": true
        }))
        .unwrap();
        assert!(r.logprobs);
    }

    #[test]
    fn embedding_inputs_are_texts_or_data_uris() {
        let r = EmbeddingsRequest::parse(
            &json!({"model": "c", "input": ["a cat", "data:image/png;base64,AA=="], "encoding_format": "base64"}),
        )
        .unwrap();
        assert_eq!(
            r.inputs,
            vec![EmbedInput::Text("a cat".into()), EmbedInput::Image("data:image/png;base64,AA==".into())]
        );
        assert!(r.base64);
        let one = EmbeddingsRequest::parse(&json!({"model": "c", "input": "dog"})).unwrap();
        assert_eq!(one.inputs, vec![EmbedInput::Text("dog".into())]);
        for (body, param) in [
            (json!({"model": "c", "input": []}), "input"),
            (json!({"model": "c", "input": [[1, 2]]}), "input[0]"),
            (json!({"model": "c", "input": "x", "encoding_format": "int8"}), "encoding_format"),
        ] {
            let e = EmbeddingsRequest::parse(&body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }
}
