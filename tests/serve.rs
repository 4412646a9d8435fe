//! `glimpse serve` end to end on the tiny fixtures, over loopback only: each test starts the
//! binary on port 0, reads the address it prints, and talks to it with a blocking HTTP client.
//! Answers are checked against the library run in-process on the same inputs (greedy answers
//! byte for byte), errors against OpenAI's error object. A hidden `--debug-token-delay-ms`
//! holds the worker busy where a test needs a queue (429, timeouts, disconnects, draining).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use glimpse::generate::GenerationOverrides;
use glimpse::{Device, EmbedModel, GenerateOptions, ImageInput, Model, Output, Prompt, Request};
use serde_json::{json, Value};

const NAME: &str = "tiny";

struct Server {
    child: Child,
    base: String,
    agent: ureq::Agent,
}

impl Server {
    fn start(model: &str, extra: &[&str]) -> Self {
        let dir = common::model_dir(model);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_glimpse"));
        cmd.args(["serve", "--model"]).arg(&dir).args(["--served-model-name", NAME, "--device", "cpu", "--port", "0"]);
        cmd.args(extra).stdin(Stdio::null()).stdout(Stdio::piped());
        // Set GLIMPSE_SERVE_TEST_LOG to see the server's stderr.
        cmd.stderr(if std::env::var_os("GLIMPSE_SERVE_TEST_LOG").is_some() { Stdio::inherit() } else { Stdio::null() });
        let mut child = cmd.spawn().expect("start glimpse serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("the server prints its address within 60 s");
        let base =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("first line: {line:?}")).to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Self { child, base, agent }
    }

    fn post_with(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value, Option<String>) {
        let mut req = self.agent.post(format!("{}{path}", self.base)).header("Content-Type", "application/json");
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = req.send(body).expect("request");
        let status = resp.status().as_u16();
        let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let text = resp.body_mut().read_to_string().expect("body");
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, value, retry)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, v, _) = self.post_with(path, &body.to_string(), None);
        (s, v)
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = req.call().expect("request");
        (resp.status().as_u16(), resp.body_mut().read_to_string().expect("body"))
    }

    /// A value of /metrics (0 when absent).
    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics", None);
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// Waits (10 s at most) until `metric` reaches `value`.
    fn wait_for(&self, metric: &str, value: f64) {
        let start = Instant::now();
        while self.metric(metric) != value {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{metric} never reached {value}: {}",
                self.metric(metric)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(common::image(name)).unwrap()
}

fn data_uri(name: &str) -> String {
    let mime = if name.ends_with(".jpg") { "image/jpeg" } else { "image/png" };
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(image_bytes(name)))
}

/// A chat request: one user message with `image` and `text`, plus `extra` fields.
fn chat(image: &str, text: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": NAME,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": text}
        ]}],
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("no content: {v}"))
}

/// What the library gives for `image` and `text` (empty: caption), in-process.
fn alone(model: &Model, image: &str, text: &str, opts: &GenerateOptions) -> Output {
    let bytes = image_bytes(image);
    let px = model.preprocess_input(&ImageInput::Bytes { bytes: &bytes, name: image }).unwrap();
    let prompt = if text.is_empty() { Prompt::Caption } else { Prompt::Question(text) };
    model.generate(&Request::new(&[px], prompt, opts), &mut |_| {}).unwrap().remove(0)
}

/// OpenAI's error object, with `param` and a message holding `says`.
fn assert_error(status: u16, v: &Value, want_status: u16, param: Option<&str>, says: &str) {
    assert_eq!(status, want_status, "{v}");
    let e = &v["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "error object without `{key}`: {v}");
    }
    assert_eq!(e["param"].as_str(), param, "{v}");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(says), "message {msg:?} does not say {says:?}");
}

/// The `data:` lines of a streamed response, [DONE] included.
fn stream_events(server: &Server, body: &Value) -> Vec<String> {
    let mut resp = server
        .agent
        .post(format!("{}/v1/chat/completions", server.base))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers().get("content-type").unwrap(), "text/event-stream");
    let reader = BufReader::new(resp.body_mut().as_reader());
    reader.lines().map(Result::unwrap).filter_map(|l| l.strip_prefix("data: ").map(String::from)).collect()
}

#[test]
fn chat_answers_equal_the_model_alone_and_stream_the_same_text() {
    let server = Server::start("blip2-opt-tiny", &[]);
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let greedy = model.default_options();
    let image = data_uri("photo_q90.jpg");
    for text in ["what is in the picture?", ""] {
        let want = alone(&model, "photo_q90.jpg", text, &greedy);
        assert!(!want.text.is_empty());
        let (status, v) =
            server.post("/v1/chat/completions", &chat(&image, text, json!({"temperature": 0, "logprobs": true})));
        assert_eq!(status, 200, "{v}");
        assert_eq!(content(&v), want.text, "question {text:?}");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], NAME);
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let prompt = if text.is_empty() { None } else { Some(model.question_prompt(text)) };
        let prompt_tokens = model.input_ids(prompt.as_deref()).unwrap().len();
        assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
        assert_eq!(v["usage"]["completion_tokens"], want.tokens.len());
        assert_eq!(v["usage"]["total_tokens"], prompt_tokens + want.tokens.len());
        let eos = want.tokens.last().is_some_and(|t| greedy.eos_token_ids.contains(t));
        let reason = if want.tokens.len() == 20 && !eos { "length" } else { "stop" };
        assert_eq!(v["choices"][0]["finish_reason"], reason);
        let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(lp.len(), want.tokens.len());
        for (entry, (&token, &logprob)) in lp.iter().zip(want.tokens.iter().zip(&want.logprobs)) {
            // As the library's value reads back through the same JSON parser (serde_json's
            // default parse may be one ulp off the shortest decimal the server writes).
            let wire: Value = serde_json::from_str(&json!(logprob).to_string()).unwrap();
            assert_eq!(entry["logprob"], wire);
            assert_eq!(entry["token"].as_str().unwrap(), model.tokenizer.decode(&[token], false).unwrap());
            assert_eq!(entry["bytes"].as_array().unwrap().len(), entry["token"].as_str().unwrap().len());
        }

        // Streamed: the deltas add up to the same text; a finish chunk, the usage, [DONE].
        let body =
            chat(&image, text, json!({"temperature": 0, "stream": true, "stream_options": {"include_usage": true}}));
        let events = stream_events(&server, &body);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let streamed: String =
            chunks.iter().filter_map(|c| c["choices"].get(0).and_then(|ch| ch["delta"]["content"].as_str())).collect();
        assert_eq!(streamed, want.text);
        assert!(chunks.len() > 3, "the text comes in several chunks: {chunks:?}");
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], reason);
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], want.tokens.len());
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    }

    // max_tokens and a stop sequence: the text ends before the stop sequence.
    let want = alone(&model, "photo_q90.jpg", "what?", &GenerateOptions { max_new_tokens: Some(6), ..greedy.clone() });
    let (_, v) = server.post("/v1/chat/completions", &chat(&image, "what?", json!({"max_tokens": 6})));
    assert_eq!(content(&v), want.text);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let stop: String = want.text.chars().skip(3).take(2).collect();
    let (_, v) = server.post("/v1/chat/completions", &chat(&image, "what?", json!({"max_tokens": 6, "stop": [stop]})));
    let cut = &want.text[..want.text.find(&stop).unwrap()];
    assert_eq!(content(&v), cut, "stop {stop:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let events = stream_events(&server, &chat(&image, "what?", json!({"max_tokens": 6, "stop": stop, "stream": true})));
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(String::from))
        .collect();
    assert_eq!(streamed, cut);

    // GET routes.
    let (status, models) = server.get("/v1/models", None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], NAME);
    assert_eq!(server.get("/health", None), (200, json!({"status": "ok"}).to_string()));
    let (_, metrics) = server.get("/metrics", None);
    assert!(metrics.contains("glimpse_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 7"), "{metrics}");
    assert!(metrics.contains("# TYPE glimpse_time_to_first_token_seconds histogram"));
    assert!(metrics.contains("glimpse_inter_token_latency_seconds_count"));
    assert!(server.metric("glimpse_generated_tokens_total") > 0.0);
}

#[test]
fn concurrent_greedy_requests_each_equal_the_request_alone() {
    // The first request holds the worker for a moment, so the others queue and share calls.
    let server = Server::start("blip2-opt-tiny", &["--max-batch", "8", "--debug-token-delay-ms", "20"]);
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let cases = [
        ("photo_q90.jpg", "what is this?"),
        ("wide_301x97.png", "what colour is the big object in the middle of this picture?"),
        ("tall_83x311.png", "how many?"),
        ("odd_257x181.png", ""),
        ("rgba_150x120.png", "is it a cat?"),
        ("palette_100x80.png", ""),
        ("grey_67x45.png", "where is it?"),
        ("exact_224x224.png", "who?"),
    ];
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(image, text)| {
                let server = &server;
                s.spawn(move || {
                    server.post("/v1/chat/completions", &chat(&data_uri(image), text, json!({"temperature": 0})))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let greedy = model.default_options();
    for ((image, text), (status, v)) in cases.iter().zip(&answers) {
        assert_eq!(*status, 200, "{v}");
        let want = alone(&model, image, text, &greedy);
        assert_eq!(content(v), want.text, "{image} {text:?}: the batched answer differs from the request alone");
        assert_eq!(v["usage"]["completion_tokens"], want.tokens.len());
    }
    // Some requests really shared a model call.
    let calls = server.metric("glimpse_batch_size_count");
    assert!(calls < cases.len() as f64, "{calls} model calls for {} requests: nothing was batched", cases.len());
}

/// The load test: 64 concurrent greedy requests over 8 images and 8 questions (captions among
/// them), each answer compared with the same request sent alone afterwards, one at a time, to a
/// server without the image cache.
///
/// Every answer is byte-identical to the request alone (text, finish reason, usage, every
/// log-probability) with the default `--max-batch` (8) and with calls of up to 16: the CPU
/// executor's decode step runs each sequence's row as a matrix-vector product however many
/// share the step, and its GEMM sums a prefill row without reference to the other rows
/// (src/backend/cpu/ops.rs `LinearPath`, tests/batch_exact.rs). Before that, calls above 4
/// sequences left the GEMV for the GEMM and moved log-probabilities by up to about 3e-5.
#[test]
fn load_64_concurrent_greedy_requests_each_equal_the_request_sent_alone() {
    let images = [
        "photo_q90.jpg",
        "wide_301x97.png",
        "tall_83x311.png",
        "odd_257x181.png",
        "rgba_150x120.png",
        "palette_100x80.png",
        "grey_67x45.png",
        "exact_224x224.png",
    ];
    let questions = [
        "",
        "what is this?",
        "how many?",
        "what colour is the big object in the middle?",
        "who?",
        "",
        "is it a cat?",
        "where?",
    ];
    let uris: Vec<String> = images.iter().map(|i| data_uri(i)).collect();
    // Every image with every question, the image cycling faster, so each call mixes them.
    let bodies: Vec<Value> = (0..64)
        .map(|i| chat(&uris[i % 8], questions[(i / 8 + i) % 8], json!({"temperature": 0, "logprobs": true})))
        .collect();
    let loaded = |max_batch: Option<&str>| {
        let mut args = vec!["--max-queue", "128"];
        args.extend(max_batch.map(|m| ["--max-batch", m]).into_iter().flatten());
        let server = Server::start("blip2-opt-tiny", &args);
        let start = Instant::now();
        let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
            let handles: Vec<_> = bodies
                .iter()
                .map(|body| {
                    let server = &server;
                    s.spawn(move || server.post("/v1/chat/completions", body))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let calls = server.metric("glimpse_batch_size_count");
        let largest = max_batch.unwrap_or("8 (the default)");
        eprintln!("--max-batch {largest}: 64 concurrent requests in {:?}, {calls} model calls", start.elapsed());
        assert!(calls < 64.0, "{calls} model calls for 64 requests: nothing was batched");
        assert!(server.metric("glimpse_image_cache_hits_total") > 0.0);
        // Some call really held more than 4 requests (what used to leave the GEMV).
        let up_to_4 = server.metric("glimpse_batch_size_bucket{le=\"4\"}");
        assert!(up_to_4 < calls, "all {calls} model calls held 4 requests or fewer");
        answers
    };
    let (default, wide) = (loaded(None), loaded(Some("16")));

    let alone = Server::start("blip2-opt-tiny", &["--max-batch", "1", "--image-cache-bytes", "0"]);
    for (i, (body, ((s8, v8), (s16, v16)))) in bodies.iter().zip(default.iter().zip(&wide)).enumerate() {
        assert_eq!((*s8, *s16), (200, 200), "request {i}: {v8} {v16}");
        let (status, want) = alone.post("/v1/chat/completions", body);
        assert_eq!(status, 200, "{want}");
        assert_eq!(v8["choices"], want["choices"], "request {i}: the answer under load differs from the request alone");
        assert_eq!(v8["usage"], want["usage"], "request {i}");
        assert_eq!(v16["choices"], want["choices"], "request {i} in calls of up to 16");
        assert_eq!(v16["usage"], want["usage"], "request {i} in calls of up to 16");
    }
}

#[test]
fn instructblip_shares_calls_only_between_equal_questions() {
    // InstructBLIP's Q-Former reads the question too, and padded batches of different
    // questions do not yet equal each alone: only equal questions share a call.
    let server = Server::start("instructblip-tiny", &["--debug-token-delay-ms", "20"]);
    let model = Model::load(common::model_dir("instructblip-tiny"), Device::Cpu).unwrap();
    let cases = [
        ("photo_q90.jpg", "what is it?"),
        ("wide_301x97.png", "what is it?"),
        ("tall_83x311.png", ""),
        ("odd_257x181.png", "what is it?"),
        ("rgba_150x120.png", "which colour is the sky here?"),
    ];
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(image, text)| {
                let server = &server;
                s.spawn(move || {
                    server.post("/v1/chat/completions", &chat(&data_uri(image), text, json!({"max_tokens": 6})))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let opts = GenerateOptions { max_new_tokens: Some(6), ..model.default_options() };
    for ((image, text), (status, v)) in cases.iter().zip(&answers) {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(content(v), alone(&model, image, text, &opts).text, "{image} {text:?}");
    }
    assert!(server.metric("glimpse_batch_size_count") < cases.len() as f64);
}

#[test]
fn llava_chats_through_its_template_and_batches_the_same_prompt() {
    let server = Server::start("llava-tiny", &["--debug-token-delay-ms", "20"]);
    let model = Model::load(common::model_dir("llava-tiny"), Device::Cpu).unwrap();
    let opts = GenerateOptions { max_new_tokens: Some(8), ..model.default_options() };
    let images = ["photo_q90.jpg", "wide_301x97.png", "tall_83x311.png", "odd_257x181.png"];
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = images
            .iter()
            .map(|image| {
                let server = &server;
                s.spawn(move || {
                    server
                        .post("/v1/chat/completions", &chat(&data_uri(image), "what is it?", json!({"max_tokens": 8})))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (image, (status, v)) in images.iter().zip(&answers) {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(content(v), alone(&model, image, "what is it?", &opts).text, "{image}");
        let rendered = model.chat.as_ref().unwrap().user_prompt(1, "what is it?").unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], model.input_ids(Some(&rendered)).unwrap().len());
    }
    assert!(server.metric("glimpse_batch_size_count") < images.len() as f64);

    // A conversation: system and assistant turns go through the template too.
    let messages = json!([
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri("photo_q90.jpg")}}, {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": "a dog"},
        {"role": "user", "content": "and the colour?"}
    ]);
    let (status, v) =
        server.post("/v1/chat/completions", &json!({"model": NAME, "messages": messages, "max_tokens": 8}));
    assert_eq!(status, 200, "{v}");
    let hf = json!([
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a dog"}]},
        {"role": "user", "content": [{"type": "text", "text": "and the colour?"}]}
    ]);
    let rendered = model.chat.as_ref().unwrap().render(&hf, true).unwrap();
    assert!(rendered.contains("ASSISTANT: a dog"), "{rendered}");
    let bytes = image_bytes("photo_q90.jpg");
    let px = model.preprocess_input(&ImageInput::Bytes { bytes: &bytes, name: "x" }).unwrap();
    let want = model.run(&[px], Some(&rendered), &opts, &mut |_| {}).unwrap().remove(0);
    assert_eq!(content(&v), want.text);

    // A chat model needs an image.
    let (status, v) =
        server.post("/v1/chat/completions", &json!({"model": NAME, "messages": [{"role": "user", "content": "hi"}]}));
    assert_error(status, &v, 400, Some("messages"), "no image");
}

/// SmolVLM: each image splits into its own tile grid, so requests about different images hold
/// different prompts; batched or cached, every answer equals the model's alone.
#[test]
fn smolvlm_answers_each_image_with_its_own_tiles() {
    let server = Server::start("smolvlm-tiny", &["--debug-token-delay-ms", "20"]);
    let model = Model::load(common::model_dir("smolvlm-tiny"), Device::Cpu).unwrap();
    let opts = GenerateOptions { max_new_tokens: Some(8), ..model.default_options() };
    let images = ["wide_301x97.png", "tall_83x311.png", "tiny_13x9.png", "wide_301x97.png"];
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = images
            .iter()
            .map(|image| {
                let server = &server;
                s.spawn(move || {
                    server
                        .post("/v1/chat/completions", &chat(&data_uri(image), "what is it?", json!({"max_tokens": 8})))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (image, (status, v)) in images.iter().zip(&answers) {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(content(v), alone(&model, image, "what is it?", &opts).text, "{image}");
        let bytes = image_bytes(image);
        let px = model.preprocess_input(&ImageInput::Bytes { bytes: &bytes, name: image }).unwrap();
        let rendered = model.chat.as_ref().unwrap().user_prompt(1, "what is it?").unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], model.input_ids_for(Some(&rendered), &[px]).unwrap().len());
    }
    assert!(server.metric("glimpse_image_cache_hits_total") + server.metric("glimpse_image_cache_misses_total") >= 3.0);
}

#[test]
fn n_sampled_choices_follow_the_seed() {
    let server = Server::start("blip2-opt-tiny", &[]);
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let image = data_uri("photo_q90.jpg");
    let body = chat(&image, "what?", json!({"n": 3, "temperature": 0.9, "top_p": 0.95, "seed": 11, "max_tokens": 8}));
    let (status, v) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let texts: Vec<&str> =
        v["choices"].as_array().unwrap().iter().map(|c| c["message"]["content"].as_str().unwrap()).collect();
    assert_eq!(texts.len(), 3);
    let overrides = GenerationOverrides {
        max_new_tokens: Some(8),
        do_sample: Some(true),
        temperature: Some(0.9),
        top_p: Some(0.95),
        seed: Some(11),
        num_return_sequences: Some(3),
        ..GenerationOverrides::default()
    };
    let want = alone(&model, "photo_q90.jpg", "what?", &model.options(&overrides).unwrap());
    let mut want_texts = vec![want.text.as_str()];
    want_texts.extend(want.alternatives.iter().map(|h| h.text.as_str()));
    assert_eq!(texts, want_texts);
    assert!(texts.iter().any(|t| *t != texts[0]), "three draws, all equal: {texts:?}");
    let completion: usize =
        std::iter::once(want.tokens.len()).chain(want.alternatives.iter().map(|h| h.tokens.len())).sum();
    assert_eq!(v["usage"]["completion_tokens"], completion);
    // The same seed again: the same draws.
    assert_eq!(server.post("/v1/chat/completions", &body).1["choices"], v["choices"]);
    // Streamed: the first choice as it comes, the others at their end, a finish chunk each.
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let events = stream_events(&server, &stream_body);
    let mut streamed = vec![String::new(); 3];
    let mut finished = 0;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        let ch = &c["choices"][0];
        let i = ch["index"].as_u64().unwrap() as usize;
        streamed[i].push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        finished += usize::from(!ch["finish_reason"].is_null());
    }
    assert_eq!(streamed, want_texts);
    assert_eq!(finished, 3);
    // Greedy decoding gives one answer: n > 1 needs a temperature.
    let (status, v) = server.post("/v1/chat/completions", &chat(&image, "what?", json!({"n": 2, "temperature": 0})));
    assert_error(status, &v, 400, Some("n"), "temperature");
}

#[test]
fn embeddings_equal_the_embed_model() {
    let server = Server::start("clip-tiny", &[]);
    let model = EmbedModel::load(common::model_dir("clip-tiny"), Device::Cpu).unwrap();
    let inputs = json!(["a photo of a cat", data_uri("photo_q90.jpg"), "a dog", data_uri("wide_301x97.png")]);
    let (status, v) = server.post("/v1/embeddings", &json!({"model": NAME, "input": inputs}));
    assert_eq!(status, 200, "{v}");
    let texts = model.embed_texts(&["a photo of a cat", "a dog"]).unwrap();
    let pixels: Vec<_> = ["photo_q90.jpg", "wide_301x97.png"]
        .iter()
        .map(|i| model.preprocess_input(&ImageInput::Bytes { bytes: &image_bytes(i), name: i }).unwrap())
        .collect();
    let images = model.embed_images(&pixels).unwrap();
    let want = [&texts[0], &images[0], &texts[1], &images[1]];
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 4);
    for (i, (d, w)) in data.iter().zip(want).enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["object"], "embedding");
        let got: Vec<f32> = d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(&got, w, "input {i}");
    }
    let tokens = model.text_ids("a photo of a cat").unwrap().len() + model.text_ids("a dog").unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], tokens);
    // base64: little-endian float32s.
    let (_, b) = server.post("/v1/embeddings", &json!({"model": NAME, "input": "a dog", "encoding_format": "base64"}));
    let bytes = base64::engine::general_purpose::STANDARD.decode(b["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let got: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    // A text alone: its own batch of one (padding to a longer text moves the last bits).
    assert_eq!(got, model.embed_texts(&["a dog"]).unwrap()[0]);
    // Errors name the input.
    let (status, v) = server
        .post("/v1/embeddings", &json!({"model": NAME, "input": ["ok", "data:image/png;base64,bm90IGFuIGltYWdl"]}));
    assert_error(status, &v, 400, Some("input[1]"), "not a recognised image format");
    let (status, v) = server.post("/v1/embeddings", &json!({"model": NAME, "input": "x", "dimensions": 3}));
    assert_error(status, &v, 400, Some("dimensions"), "dimensions");
    let (status, v) = server.post("/v1/chat/completions", &chat(&data_uri("photo_q90.jpg"), "hi", json!({})));
    assert_error(status, &v, 400, None, "/v1/embeddings");
}

#[test]
fn bad_requests_are_400s_with_openai_errors_and_hurt_no_other_request() {
    let media = common::tempdir();
    let allowed = media.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    std::fs::copy(common::image("photo_q90.jpg"), allowed.join("photo.jpg")).unwrap();
    std::fs::copy(common::image("photo_q90.jpg"), media.path().join("outside.jpg")).unwrap();
    let server = Server::start(
        "blip2-opt-tiny",
        &["--allowed-local-media", allowed.to_str().unwrap(), "--max-body-bytes", "200000"],
    );
    let image = data_uri("photo_q90.jpg");
    let post = |body: &Value| server.post("/v1/chat/completions", body);
    let url_param = Some("messages[0].content[0].image_url");

    let (s, v) = post(&chat("data:image/png;base64,@@not base64@@", "what?", json!({})));
    assert_error(s, &v, 400, url_param, "base64");
    let (s, v) = post(&chat("data:image/png;base64,aGVsbG8gd29ybGQ=", "what?", json!({})));
    assert_error(s, &v, 400, url_param, "not a recognised image format");
    let (s, v) = post(&chat("https://example.com/cat.png", "what?", json!({})));
    assert_error(s, &v, 400, url_param, "remote image URLs are not fetched");
    let outside = format!("file://{}/../outside.jpg", allowed.display());
    let (s, v) = post(&chat(&outside, "what?", json!({})));
    assert_error(s, &v, 400, url_param, "outside --allowed-local-media");
    let (s, v) = post(&chat(&image, "what?", json!({"max_tokens": 0})));
    assert_error(s, &v, 400, Some("max_tokens"), "is 0");
    let (s, v) = post(&chat(&image, "what?", json!({"temperature": "warm"})));
    assert_error(s, &v, 400, Some("temperature"), "\"warm\"");
    let mut bad_model = chat(&image, "what?", json!({}));
    bad_model["model"] = json!(["tiny"]);
    let (s, v) = post(&bad_model);
    assert_error(s, &v, 400, Some("model"), "must be a string");
    bad_model["model"] = json!("gpt-4o");
    let (s, v) = post(&bad_model);
    assert_error(s, &v, 404, Some("model"), "gpt-4o");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (s, v) = post(&json!({"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "image_url", "image_url": {"url": image}}]}]}));
    assert_error(s, &v, 400, Some("messages"), "exactly one image");
    let (s, v, _) = server.post_with("/v1/chat/completions", "{\"model\": ", None);
    assert_error(s, &v, 400, None, "not valid JSON");
    let big = chat(&format!("data:image/png;base64,{}", "A".repeat(300_000)), "what?", json!({}));
    let (s, v) = post(&big);
    assert_error(s, &v, 413, None, "--max-body-bytes");
    let (s, v) = post(&json!({"model": NAME, "input": "x"}));
    assert_error(s, &v, 400, Some("messages"), "missing");
    let (s, v) = server.post("/v1/embeddings", &json!({"model": NAME, "input": "x"}));
    assert_error(s, &v, 400, None, "does not embed");
    let (s, v, _) = server.post_with("/v1/nothing", "{}", None);
    assert_error(s, &v, 404, None, "Invalid URL");

    // The server still answers, and a file:// image under the allowed folder equals its bytes.
    let local = format!("file://{}", allowed.join("photo.jpg").display());
    let (s, from_file) = post(&chat(&local, "what?", json!({})));
    assert_eq!(s, 200, "{from_file}");
    let (_, from_data) = post(&chat(&image, "what?", json!({})));
    assert_eq!(content(&from_file), content(&from_data));
    assert!(server
        .get("/metrics", None)
        .1
        .contains("glimpse_requests_total{route=\"/v1/chat/completions\",status=\"400\"} 10"));
}

/// A request sent in the background.
fn send_async(server: &Server, body: Value) -> std::thread::JoinHandle<(u16, Value)> {
    let (base, agent) = (server.base.clone(), server.agent.clone());
    std::thread::spawn(move || {
        let mut resp = agent.post(format!("{base}/v1/chat/completions")).send(body.to_string()).unwrap();
        let status = resp.status().as_u16();
        (status, serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap())
    })
}

#[test]
fn the_image_cache_reuses_image_features_and_changes_no_answer() {
    let server = Server::start("blip2-opt-tiny", &["--max-batch", "8", "--debug-token-delay-ms", "20"]);
    let uncached = Server::start("blip2-opt-tiny", &["--image-cache-bytes", "0"]);
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let body = |image: &str, text: &str| chat(&data_uri(image), text, json!({"temperature": 0, "logprobs": true}));
    let cache = |s: &Server| {
        ["hits_total", "misses_total", "entries", "bytes"].map(|m| s.metric(&format!("glimpse_image_cache_{m}")))
    };
    // BLIP-2's features of one image: 32 projected queries of the decoder's width (160), f32.
    let entry = (32 * 160 * 4) as f64;

    let ask = body("photo_q90.jpg", "what is in the picture?");
    let (status, first) = server.post("/v1/chat/completions", &ask);
    assert_eq!(status, 200, "{first}");
    assert_eq!(cache(&server), [0.0, 1.0, 1.0, entry]);
    let (_, second) = server.post("/v1/chat/completions", &ask);
    assert_eq!(cache(&server), [1.0, 1.0, 1.0, entry], "the same bytes again are a hit");
    // Text, finish reason, usage and every log-probability: the same with and without the cache.
    assert_eq!(second["choices"], first["choices"]);
    assert_eq!(second["usage"], first["usage"]);
    let (_, off) = uncached.post("/v1/chat/completions", &ask);
    assert_eq!(off["choices"], first["choices"]);
    assert_eq!(cache(&uncached), [0.0; 4], "--image-cache-bytes 0 turns it off");
    let want = alone(&model, "photo_q90.jpg", "what is in the picture?", &model.default_options());
    assert_eq!(content(&first), want.text);
    let logprobs: Vec<f64> = first["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();
    // serde_json's default float parsing may land one ulp off the printed shortest decimal.
    assert_eq!(logprobs.len(), want.logprobs.len());
    for (got, want) in logprobs.iter().zip(&want.logprobs) {
        assert!((got - want).abs() <= 1e-15 * want.abs(), "{got} vs {want}");
    }

    // One model call mixing a hit and a miss: a first request holds the worker while the two
    // queue, then they share the next call.
    let hold = send_async(&server, chat(&data_uri("exact_224x224.png"), "hold", json!({"max_tokens": 8})));
    server.wait_for("glimpse_requests_running", 1.0);
    let mixed = [("photo_q90.jpg", "what colour is it?"), ("wide_301x97.png", "and this one?")];
    let handles: Vec<_> = mixed.iter().map(|(image, text)| send_async(&server, body(image, text))).collect();
    server.wait_for("glimpse_queue_depth", 2.0);
    assert_eq!(hold.join().unwrap().0, 200);
    let answers: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(server.metric("glimpse_batch_size_count"), 4.0, "the two shared one call");
    assert_eq!(cache(&server), [2.0, 3.0, 3.0, 3.0 * entry]);
    for ((image, text), (status, v)) in mixed.iter().zip(&answers) {
        assert_eq!(*status, 200, "{v}");
        let (_, off) = uncached.post("/v1/chat/completions", &body(image, text));
        assert_eq!(v["choices"], off["choices"], "{image}: the answer differs from the uncached server's");
    }

    // Bounded in bytes: room for one image's features, the least recently used goes.
    let small = Server::start("blip2-opt-tiny", &["--image-cache-bytes", &(entry as usize + 100).to_string()]);
    for image in ["photo_q90.jpg", "wide_301x97.png", "photo_q90.jpg"] {
        assert_eq!(small.post("/v1/chat/completions", &body(image, "what?")).0, 200);
    }
    assert_eq!(cache(&small), [0.0, 3.0, 1.0, entry]);
}

#[test]
fn a_full_queue_is_a_429_with_retry_after_and_the_queued_requests_still_run() {
    let server =
        Server::start("blip2-opt-tiny", &["--max-batch", "1", "--max-queue", "1", "--debug-token-delay-ms", "150"]);
    let image = data_uri("photo_q90.jpg");
    let body = chat(&image, "what?", json!({"max_tokens": 8}));
    let running = send_async(&server, body.clone());
    server.wait_for("glimpse_requests_running", 1.0);
    let queued = send_async(&server, body.clone());
    server.wait_for("glimpse_queue_depth", 1.0);
    let (status, v, retry) = server.post_with("/v1/chat/completions", &body.to_string(), None);
    assert_error(status, &v, 429, None, "queue is full");
    assert_eq!(v["error"]["code"], "queue_full");
    assert_eq!(retry.as_deref(), Some("1"));
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let want = alone(
        &model,
        "photo_q90.jpg",
        "what?",
        &GenerateOptions { max_new_tokens: Some(8), ..model.default_options() },
    );
    for h in [running, queued] {
        let (status, v) = h.join().unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(content(&v), want.text);
    }
}

#[test]
fn a_request_over_its_time_is_a_408_and_its_run_stops() {
    let server = Server::start(
        "blip2-opt-tiny",
        &["--max-batch", "1", "--debug-token-delay-ms", "100", "--request-timeout-s", "0.6"],
    );
    // 12 tokens take over a second: the request times out, and its run is cancelled.
    let (status, v) =
        server.post("/v1/chat/completions", &chat(&data_uri("photo_q90.jpg"), "what?", json!({"max_tokens": 12})));
    assert_error(status, &v, 408, None, "--request-timeout-s");
    assert_eq!(v["error"]["code"], "request_timeout");
    server.wait_for("glimpse_requests_running", 0.0);
    let generated = server.metric("glimpse_generated_tokens_total");
    assert!(generated < 12.0, "the timed-out run went on to its end ({generated} tokens)");
    // The server goes on answering.
    let (status, v) =
        server.post("/v1/chat/completions", &chat(&data_uri("photo_q90.jpg"), "what?", json!({"max_tokens": 2})));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn a_client_that_leaves_while_queued_is_dropped_before_its_request_runs() {
    let server = Server::start("blip2-opt-tiny", &["--max-batch", "1", "--debug-token-delay-ms", "200"]);
    let image = data_uri("photo_q90.jpg");
    let running = send_async(&server, chat(&image, "what?", json!({"max_tokens": 8})));
    server.wait_for("glimpse_requests_running", 1.0);
    let body = chat(&image, "what?", json!({"max_tokens": 3})).to_string();
    let mut raw = std::net::TcpStream::connect(server.addr()).unwrap();
    write!(raw, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    server.wait_for("glimpse_queue_depth", 1.0);
    drop(raw);
    let (status, v) = running.join().unwrap();
    assert_eq!(status, 200, "{v}");
    server.wait_for("glimpse_dropped_before_run_total", 1.0);
    assert_eq!(server.metric("glimpse_batch_size_count"), 1.0, "only the request whose client stayed ran");
}

#[test]
fn a_stream_whose_client_leaves_stops_generating() {
    let server = Server::start("blip2-opt-tiny", &["--debug-token-delay-ms", "50"]);
    let body = chat(&data_uri("photo_q90.jpg"), "what?", json!({"max_tokens": 40, "stream": true})).to_string();
    let mut raw = std::net::TcpStream::connect(server.addr()).unwrap();
    write!(raw, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    // Read until the first token's chunk arrived, then leave.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data: ").count() < 3 {
        let n = std::io::Read::read(&mut raw, &mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    drop(raw);
    server.wait_for("glimpse_requests_running", 0.0);
    let generated = server.metric("glimpse_generated_tokens_total");
    assert!(generated < 40.0, "the run went on to its end after the client left ({generated} tokens)");
}

#[test]
fn an_api_key_guards_the_v1_routes() {
    let server = Server::start("blip2-opt-tiny", &["--api-key", "sekrit"]);
    let body = chat(&data_uri("photo_q90.jpg"), "", json!({"max_tokens": 3})).to_string();
    for key in [None, Some("wrong")] {
        let (status, v, _) = server.post_with("/v1/chat/completions", &body, key);
        assert_error(status, &v, 401, None, "API key");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(server.get("/v1/models", key).0, 401);
    }
    let (status, v, _) = server.post_with("/v1/chat/completions", &body, Some("sekrit"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(server.get("/v1/models", Some("sekrit")).0, 200);
    assert_eq!(server.get("/health", None).0, 200);
    assert_eq!(server.get("/metrics", None).0, 200);
}

#[cfg(unix)]
#[test]
fn sigterm_finishes_the_requests_in_flight_then_exits() {
    let mut server = Server::start("blip2-opt-tiny", &["--max-batch", "1", "--debug-token-delay-ms", "100"]);
    let image = data_uri("photo_q90.jpg");
    let running = send_async(&server, chat(&image, "what?", json!({"max_tokens": 8})));
    server.wait_for("glimpse_requests_running", 1.0);
    let queued = send_async(&server, chat(&image, "", json!({"max_tokens": 4})));
    server.wait_for("glimpse_queue_depth", 1.0);
    let pid = server.child.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let opts = |n| GenerateOptions { max_new_tokens: Some(n), ..model.default_options() };
    for (h, text, n) in [(running, "what?", 8), (queued, "", 4)] {
        let (status, v) = h.join().unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(content(&v), alone(&model, "photo_q90.jpg", text, &opts(n)).text);
    }
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(std::net::TcpStream::connect(server.addr()).is_err(), "still accepting after the drain");
}

#[test]
fn the_address_is_printed_and_a_taken_port_is_a_clear_error() {
    let server = Server::start("blip2-opt-tiny", &[]);
    let port = server.addr().rsplit(':').next().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["serve", "--device", "cpu", "--port", &port, "--model"])
        .arg(Path::new(&common::model_dir("blip2-opt-tiny")))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("could not listen on 127.0.0.1:{port}")), "{err}");
}

/// IDEFICS over the server: two images and a question in one user message give the library's
/// answer to the same question about both (idefics-9b-instruct's form); one image with no text
/// gives its caption.
#[test]
fn idefics_answers_about_interleaved_images() {
    let server = Server::start("idefics-tiny", &[]);
    let model = Model::load(common::model_dir("idefics-tiny"), Device::Cpu).unwrap();
    let opts = GenerateOptions { max_new_tokens: Some(6), ..model.default_options() };
    let names = ["wide_301x97.png", "tall_83x311.png"];
    let pixels: Vec<_> = names
        .iter()
        .map(|n| model.preprocess_input(&ImageInput::Bytes { bytes: &image_bytes(n), name: n }).unwrap())
        .collect();
    let want =
        model.generate(&Request::new(&pixels, Prompt::Question("which is taller?"), &opts), &mut |_| {}).unwrap();
    let body = json!({
        "model": NAME,
        "max_tokens": 6,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(names[0])}},
            {"type": "image_url", "image_url": {"url": data_uri(names[1])}},
            {"type": "text", "text": "which is taller?"}
        ]}],
    });
    let (status, v) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(content(&v), want[0].text);
    assert_eq!(v["usage"]["prompt_tokens"], model.question_ids("which is taller?", 2).unwrap().len());
    let body = json!({"model": NAME, "max_tokens": 6, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(names[0])}}]}]});
    let (status, v) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(content(&v), alone(&model, names[0], "", &opts).text, "caption");
}
