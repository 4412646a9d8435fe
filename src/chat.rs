//! Chat prompting for chat-model families (LLaVA): the checkpoint's Jinja chat template rendered
//! as transformers 5.17's `apply_chat_template` does (trim_blocks, lstrip_blocks, Python string
//! methods, `{% generation %}` tags dropped), then the processor's `<image>` expansion
//! (`LlavaProcessor.replace_image_token`).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::json::read_json;

/// What `glimpse caption` asks a chat model: one user message with the image and this text.
pub const CAPTION_INSTRUCTION: &str = "Describe the image in one sentence.";

/// A chat template and the processor settings that expand image placeholders.
#[derive(Debug, Clone)]
pub struct ChatProcessor {
    template: String,
    /// Where the template came from, for errors.
    source: PathBuf,
    pub image_token: String,
    pub patch_size: Option<usize>,
    pub num_additional_image_tokens: usize,
    /// `vision_feature_select_strategy` of processor_config.json ("default" drops CLS).
    pub strategy: String,
    /// Special-token strings the template may use (`bos_token`, `eos_token`, ...).
    specials: serde_json::Map<String, Value>,
}

fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// Drops `{% generation %}` / `{% endgeneration %}` (transformers' AssistantTracker extension:
/// the body renders as it is).
fn strip_generation_tags(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(i) = rest.find("{%") {
        let Some(j) = rest[i..].find("%}") else { break };
        let inner = rest[i + 2..i + j].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..i]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(&rest[i..i + j + 2]);
        }
        rest = &rest[i + j + 2..];
    }
    out.push_str(rest);
    out
}

/// The most template instructions one render runs (minijinja's fuel).
pub const TEMPLATE_FUEL: u64 = 5_000_000;

impl ChatProcessor {
    /// The template as transformers 5.17 finds it: chat_template.jinja, else chat_template.json
    /// (`chat_template` field), else tokenizer_config.json's `chat_template` (a string, or a list
    /// of named templates whose `default` is used). Processor fields from processor_config.json.
    pub fn load_from_dir(dir: &Path) -> Result<Self> {
        let (jinja, json_path, tok_path) =
            (dir.join("chat_template.jinja"), dir.join("chat_template.json"), dir.join("tokenizer_config.json"));
        let tok_cfg: Value = if tok_path.exists() { read_json(&tok_path)? } else { Value::Null };
        let (template, source) = if jinja.exists() {
            (crate::files::read_to_string(&jinja, crate::files::MAX_CONFIG_BYTES)?, jinja)
        } else if json_path.exists() {
            let v: Value = read_json(&json_path)?;
            match v.get("chat_template").and_then(Value::as_str) {
                Some(t) => (t.to_string(), json_path),
                None => return Err(Error::config(&json_path, "no `chat_template` string in the file")),
            }
        } else {
            match tok_cfg.get("chat_template") {
                Some(Value::String(t)) => (t.clone(), tok_path.clone()),
                Some(Value::Array(list)) => {
                    let default = list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                    match default.and_then(|t| t.get("template")).and_then(Value::as_str) {
                        Some(t) => (t.to_string(), tok_path.clone()),
                        None => return Err(Error::config(&tok_path, "`chat_template` lists no template named \"default\"")),
                    }
                }
                _ => {
                    return Err(Error::MissingFile {
                        path: jinja,
                        hint: " (nor chat_template.json or a `chat_template` in tokenizer_config.json): a chat model needs its chat template".into(),
                    })
                }
            }
        };
        let proc_path = dir.join("processor_config.json");
        let proc: Value = if proc_path.exists() { read_json(&proc_path)? } else { Value::Null };
        let usize_field = |key: &str| -> Result<Option<usize>> {
            match proc.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                    Error::config(&proc_path, format!("`{key}` is {v}: it must be a non-negative integer"))
                }),
            }
        };
        let patch_size = usize_field("patch_size")?;
        if patch_size == Some(0) {
            return Err(Error::config(&proc_path, "`patch_size` is 0: it must be the vision tower's patch size"));
        }
        let mut specials = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(s) = tok_cfg.get(key).and_then(token_string) {
                specials.insert(key.into(), Value::String(s));
            }
        }
        Ok(Self {
            template: strip_generation_tags(&template),
            source,
            image_token: proc.get("image_token").and_then(Value::as_str).unwrap_or("<image>").to_string(),
            patch_size,
            num_additional_image_tokens: usize_field("num_additional_image_tokens")?.unwrap_or(0),
            strategy: proc.get("vision_feature_select_strategy").and_then(Value::as_str).unwrap_or("default").into(),
            specials,
        })
    }

    /// The bos token string, if the tokenizer config names one.
    pub fn bos_token(&self) -> Option<&str> {
        self.specials.get("bos_token").and_then(Value::as_str)
    }

    /// Renders `messages` with `add_generation_prompt`, as `apply_chat_template(tokenize=False)`.
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        // A shipped template renders in a few thousand instructions; a runaway one (nested
        // `range(100000)` loops) stops here with an error instead of running for hours.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let err = |e: minijinja::Error| {
            Error::config(
                &self.source,
                format!("chat template: {e}{}", e.detail().map(|d| format!(" ({d})")).unwrap_or_default()),
            )
        };
        env.add_template("chat", &self.template).map_err(err)?;
        let mut ctx = self.specials.clone();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        env.get_template("chat").map_err(err)?.render(Value::Object(ctx)).map_err(err)
    }

    /// One user message: `images` image entries first, then `text` (LLaVA's shipped template puts
    /// images first anyway), with the generation prompt.
    pub fn user_prompt(&self, images: usize, text: &str) -> Result<String> {
        let mut content: Vec<Value> = (0..images).map(|_| json!({"type": "image"})).collect();
        content.push(json!({"type": "text", "text": text}));
        self.render(&json!([{"role": "user", "content": content}]), true)
    }

    /// Image tokens per image of `height` x `width` pixel values (`replace_image_token`).
    pub fn tokens_per_image(&self, height: usize, width: usize) -> Result<usize> {
        let p = self.patch_size.ok_or_else(|| {
            Error::InvalidInput(
                "processor_config.json has no `patch_size`: add the vision tower's patch size (14 for LLaVA-1.5)"
                    .into(),
            )
        })?;
        let n = (height / p) * (width / p) + self.num_additional_image_tokens;
        Ok(n - usize::from(self.strategy == "default").min(n))
    }

    /// Replaces every image placeholder of `prompt` by `n` copies.
    pub fn expand(&self, prompt: &str, n: usize) -> String {
        prompt.replace(&self.image_token, &self.image_token.repeat(n))
    }
}
