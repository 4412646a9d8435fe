//! The bounded queue and the one worker thread that runs the model.
//!
//! Request-level batching: the worker takes the oldest waiting request and up to
//! `--max-batch - 1` more that can share its model call (same kind of prompt, same settings,
//! greedy), and runs them as ONE batched [`Model::generate`]; each gets exactly what it gets
//! alone, because the CPU executor's batched rows are computed as single rows are. A request
//! that arrives while a batch runs waits for the next call: requests do not join a running
//! decode (iteration-level continuous batching is the next step, not done here).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::cache::{ImageCache, ImageKey};
use super::error::ApiError;
use super::metrics::Metrics;
use super::text::{cut_at_stop, Release};
use super::Served;
use crate::api::{EmbedModel, Model, Prompt, Request};
use crate::generate::{Cancel, GenerateOptions, TokenEvent};
use crate::image::PixelValues;

/// What a generation request asks the model, checked and preprocessed.
#[derive(Debug, Clone)]
pub struct GenJob {
    pub images: Vec<PixelValues>,
    /// The image cache's key of each image (the SHA-256 of its bytes).
    pub image_keys: Vec<ImageKey>,
    pub prompt: PromptSpec,
    /// Resolved settings; `max_new_tokens` is always set (what the request gets alone), so
    /// requests that share a call share it.
    pub options: GenerateOptions,
    pub prompt_tokens: usize,
    pub logprobs: bool,
    /// Send each token's text as it is generated.
    pub stream: bool,
    /// Different questions may share a call, left-padded to one length: true where padding is
    /// exact (BLIP-2). Not where the encoders read the question too (InstructBLIP's Q-Former):
    /// there padded batches do not yet equal each question alone, so only identical
    /// questions share a call.
    pub pad_questions: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PromptSpec {
    /// Non-chat families: a caption (no question).
    Caption,
    /// Non-chat families: a question, through the family's template.
    Question(String),
    /// Chat families: the rendered chat template (image placeholders not yet expanded).
    Chat(String),
}

#[derive(Debug, Clone)]
pub enum EmbedItem {
    Text(Vec<u32>),
    Image(PixelValues),
}

#[derive(Debug)]
pub enum Work {
    Generate(Box<GenJob>),
    /// Inputs in request order (texts as token ids).
    Embed(Vec<EmbedItem>),
}

/// Where a request's results go.
#[derive(Debug)]
pub struct Reply {
    pub events: UnboundedSender<Event>,
    pub queued_at: Instant,
}

impl Reply {
    /// The handler stopped listening: its client went away or its time ran out.
    fn gone(&self) -> bool {
        self.events.is_closed()
    }

    fn send(&self, e: Event) {
        let _ = self.events.send(e);
    }
}

#[derive(Debug)]
pub struct Job {
    pub work: Work,
    pub reply: Reply,
}

/// A token's text and log-probability (`logprobs`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub text: String,
    /// `stop` (EOS or a stop sequence) or `length`.
    pub finish_reason: &'static str,
    pub tokens: usize,
    pub logprobs: Option<Vec<TokenLogprob>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub choices: Vec<Choice>,
    pub prompt_tokens: usize,
}

#[derive(Debug)]
pub enum Event {
    /// Streaming: new text of the first choice (maybe empty) and the token that released it.
    Delta {
        text: String,
        token: Option<TokenLogprob>,
    },
    Generated(Generated),
    Embedded(Vec<Vec<f32>>),
    Failed(ApiError),
}

/// Why a request was not queued.
#[derive(Debug, PartialEq)]
pub enum Rejected {
    Full,
    Closed,
}

pub struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
    metrics: Arc<Metrics>,
}

struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl Queue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            state: Mutex::new(QueueState { jobs: VecDeque::new(), closed: false }),
            ready: Condvar::new(),
            capacity,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when a request would be refused now (checked before preprocessing its images).
    pub fn is_full(&self) -> bool {
        self.lock().jobs.len() >= self.capacity
    }

    pub fn submit(&self, job: Job) -> Result<(), Rejected> {
        let mut s = self.lock();
        if s.closed {
            return Err(Rejected::Closed);
        }
        if s.jobs.len() >= self.capacity {
            return Err(Rejected::Full);
        }
        s.jobs.push_back(job);
        self.metrics.queue_depth.store(s.jobs.len() as u64, Ordering::Relaxed);
        self.ready.notify_one();
        Ok(())
    }

    /// No more requests: the worker drains what is queued, then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// The next batch: the oldest live request and up to `max - 1` later ones that can share
    /// its call. Requests whose client went away are dropped here, before they run. None once
    /// closed and empty.
    fn next_batch(&self, max: usize) -> Option<Vec<Job>> {
        let mut s = self.lock();
        loop {
            let before = s.jobs.len();
            s.jobs.retain(|j| !j.reply.gone());
            self.metrics.dropped_before_run.fetch_add((before - s.jobs.len()) as u64, Ordering::Relaxed);
            if let Some(first) = s.jobs.pop_front() {
                let mut batch = vec![first];
                let mut i = 0;
                while batch.len() < max && i < s.jobs.len() {
                    if can_share(&batch[0].work, &s.jobs[i].work) {
                        batch.extend(s.jobs.remove(i));
                    } else {
                        i += 1;
                    }
                }
                self.metrics.queue_depth.store(s.jobs.len() as u64, Ordering::Relaxed);
                return Some(batch);
            }
            self.metrics.queue_depth.store(0, Ordering::Relaxed);
            if s.closed {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Whether `b` can run in `a`'s model call with each getting what it gets alone: greedy or
/// beam search (sampling draws from per-row random streams, so a row's draws depend on its
/// place in the batch), one choice each, the same settings, and prompts the family batches in
/// one call (captions with captions, questions with questions where padding is exact, else the
/// same question, chat prompts with the same text and image count).
pub fn can_share(a: &Work, b: &Work) -> bool {
    let (Work::Generate(a), Work::Generate(b)) = (a, b) else { return false };
    let alone = |j: &GenJob| j.options.do_sample || j.options.num_return_sequences > 1;
    if alone(a) || alone(b) || a.options != b.options {
        return false;
    }
    match (&a.prompt, &b.prompt) {
        (PromptSpec::Caption, PromptSpec::Caption) => true,
        // One image each (a question about several images, IDEFICS', runs alone).
        (PromptSpec::Question(x), PromptSpec::Question(y)) if a.images.len() == 1 && b.images.len() == 1 => {
            x == y || (a.pad_questions && b.pad_questions)
        }
        (PromptSpec::Chat(x), PromptSpec::Chat(y)) => x == y && a.images.len() == b.images.len(),
        _ => false,
    }
}

/// The worker: owns the model calls, one batch at a time.
pub struct Worker {
    pub served: Served,
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    pub max_batch: usize,
    /// Image features by image bytes (None: off).
    pub cache: Option<ImageCache>,
    /// Testing only (`--debug-token-delay-ms`): a pause after each generated token, so tests
    /// can hold the worker busy.
    pub token_delay: Duration,
}

impl Worker {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("glimpse-serve-worker".into()).spawn(move || self.run())
    }

    fn run(self) {
        while let Some(batch) = self.queue.next_batch(self.max_batch) {
            self.metrics.running.store(batch.len() as u64, Ordering::Relaxed);
            self.metrics.batch_size.observe(batch.len() as f64);
            match &self.served {
                Served::Generate(model) => {
                    let jobs = batch
                        .into_iter()
                        .filter_map(|j| match j.work {
                            Work::Generate(g) => Some((*g, j.reply)),
                            Work::Embed(_) => {
                                j.reply.send(Event::Failed(ApiError::server(
                                    "an embedding request reached a generating model",
                                )));
                                None
                            }
                        })
                        .collect();
                    self.generate(model, jobs);
                }
                Served::Embed(model) => {
                    for job in batch {
                        let event = match job.work {
                            Work::Embed(items) => embed(model, items),
                            Work::Generate(_) => {
                                Event::Failed(ApiError::server("a generation request reached an embedding model"))
                            }
                        };
                        job.reply.send(event);
                    }
                }
            }
            self.metrics.running.store(0, Ordering::Relaxed);
        }
    }

    /// Runs `jobs` as one call; when that call fails before any token (a plan that does not
    /// fit the padded batch, say), each runs alone, so one request's failure is its own.
    fn generate(&self, model: &Model, jobs: Vec<(GenJob, Reply)>) {
        match self.try_generate(model, &jobs) {
            Ok(()) => {}
            Err((_, false)) if jobs.len() > 1 => {
                for job in jobs {
                    self.generate(model, vec![job]);
                }
            }
            Err((e, _)) => {
                for (_, reply) in &jobs {
                    reply.send(Event::Failed(e.clone()));
                }
            }
        }
    }

    /// One model call for every job; Err carries whether any token was produced.
    fn try_generate(&self, model: &Model, jobs: &[(GenJob, Reply)]) -> Result<(), (ApiError, bool)> {
        let first = &jobs[0].0;
        let cancel = Cancel::new();
        let options = GenerateOptions { cancel: Some(cancel.clone()), ..first.options.clone() };
        let images: Vec<PixelValues> = jobs.iter().flat_map(|(j, _)| j.images.iter().cloned()).collect();
        let keys: Vec<ImageKey> = jobs.iter().flat_map(|(j, _)| j.image_keys.iter().copied()).collect();
        // The image cache's features, or the pixels alone where it is off or fails (the answer
        // is the same either way).
        let features = self
            .cache
            .as_ref()
            .filter(|_| keys.len() == images.len())
            .and_then(|c| c.features(model, &keys, &images, &self.metrics).ok());
        let questions: Vec<&str> = jobs
            .iter()
            .map(|(j, _)| match &j.prompt {
                PromptSpec::Question(q) => q.as_str(),
                _ => "",
            })
            .collect();
        let prompt = match &first.prompt {
            PromptSpec::Caption => Prompt::Caption,
            PromptSpec::Question(q) if first.images.len() != 1 => Prompt::Question(q),
            PromptSpec::Question(_) => Prompt::PerImage(&questions),
            PromptSpec::Chat(text) => Prompt::Raw(Some(text)),
        };
        let mut live: Vec<Live> = jobs.iter().map(|(j, r)| Live::new(j, r)).collect();
        let mut any_token = false;
        let result = {
            let mut on_token = |ev: &TokenEvent| {
                any_token = true;
                if let Some(l) = live.get_mut(ev.sequence) {
                    l.token(model, ev, &self.metrics);
                }
                if live.iter().all(|l| l.reply.gone()) {
                    cancel.cancel(); // nobody listens: stop at the next step
                }
                if !self.token_delay.is_zero() {
                    std::thread::sleep(self.token_delay);
                }
            };
            let request = Request { features: features.as_deref(), ..Request::new(&images, prompt, &options) };
            std::panic::catch_unwind(AssertUnwindSafe(|| model.generate(&request, &mut on_token)))
        };
        let outputs = match result {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(e)) => return Err((ApiError::from_glimpse(&e, None), any_token)),
            Err(_) => {
                return Err((ApiError::server("the model call panicked (a glimpse bug: please report it)"), any_token))
            }
        };
        if outputs.len() != jobs.len() {
            let msg = format!("the model returned {} outputs for {} requests", outputs.len(), jobs.len());
            return Err((ApiError::server(msg), any_token));
        }
        for ((job, reply), (out, mut l)) in jobs.iter().zip(outputs.into_iter().zip(live)) {
            let opts = &job.options;
            let mut choices =
                vec![choice(model, opts, &out.text, &out.tokens, job.logprobs.then_some(&out.logprobs[..]))];
            choices.extend(out.alternatives.iter().map(|h| choice(model, opts, &h.text, &h.tokens, None)));
            if job.stream {
                let rest = l.release.finish(&choices[0].text);
                if !rest.is_empty() {
                    reply.send(Event::Delta { text: rest, token: None });
                }
            }
            let tokens: usize = choices.iter().map(|c| c.tokens).sum();
            self.metrics.generated_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
            self.metrics.prompt_tokens.fetch_add(job.prompt_tokens as u64, Ordering::Relaxed);
            reply.send(Event::Generated(Generated { choices, prompt_tokens: job.prompt_tokens }));
        }
        Ok(())
    }
}

/// One request's state during its call: tokens so far, streamed text, token timing.
struct Live<'a> {
    job: &'a GenJob,
    reply: &'a Reply,
    tokens: Vec<u32>,
    release: Release,
    last: Option<Instant>,
}

impl<'a> Live<'a> {
    fn new(job: &'a GenJob, reply: &'a Reply) -> Self {
        Self { job, reply, tokens: Vec::new(), release: Release::default(), last: None }
    }

    fn token(&mut self, model: &Model, ev: &TokenEvent, metrics: &Metrics) {
        let now = Instant::now();
        match self.last {
            None => metrics.time_to_first_token.observe((now - self.reply.queued_at).as_secs_f64()),
            Some(t) => metrics.inter_token_latency.observe((now - t).as_secs_f64()),
        }
        self.last = Some(now);
        self.tokens.push(ev.token);
        if !self.job.stream || self.reply.gone() {
            return;
        }
        // The decode of every token so far: deltas then add up to the final text exactly.
        let text = match model.tokenizer.decode_text(&self.tokens) {
            Ok(decoded) => self.release.update(&decoded, &self.job.options.stop_strings),
            Err(_) => String::new(), // the final text reports it
        };
        let token = self.job.logprobs.then(|| token_logprob(model, ev.token, ev.logprob));
        self.reply.send(Event::Delta { text, token });
    }
}

fn token_logprob(model: &Model, token: u32, logprob: f64) -> TokenLogprob {
    TokenLogprob { token: model.tokenizer.decode(&[token], false).unwrap_or_default(), logprob }
}

/// A finished sequence as a choice: its text cut before the first stop sequence, and why it
/// ended (`length` when it used every token it was allowed without EOS or a stop sequence).
fn choice(model: &Model, opts: &GenerateOptions, text: &str, tokens: &[u32], logprobs: Option<&[f64]>) -> Choice {
    let (cut, stopped) = cut_at_stop(text, &opts.stop_strings);
    let eos = tokens.last().is_some_and(|t| opts.eos_token_ids.contains(t));
    let full = tokens.len() >= opts.max_new_tokens.unwrap_or(usize::MAX);
    Choice {
        text: cut.to_string(),
        finish_reason: if full && !eos && !stopped { "length" } else { "stop" },
        tokens: tokens.len(),
        logprobs: logprobs.map(|lp| tokens.iter().zip(lp).map(|(&t, &l)| token_logprob(model, t, l)).collect()),
    }
}

/// One embeddings request: its texts as one batch and its images as one batch, as
/// `glimpse embed` runs them; results in request order.
fn embed(model: &EmbedModel, items: Vec<EmbedItem>) -> Event {
    let mut ids = Vec::new();
    let mut images = Vec::new();
    for item in &items {
        match item {
            EmbedItem::Text(t) => ids.push(t.clone()),
            EmbedItem::Image(p) => images.push(p.clone()),
        }
    }
    let run = || -> crate::Result<Vec<Vec<f32>>> {
        let texts = if ids.is_empty() { Vec::new() } else { model.embed_text_ids(&ids)? };
        let pictures = if images.is_empty() { Vec::new() } else { model.embed_images(&images)? };
        let (mut t, mut p) = (texts.into_iter(), pictures.into_iter());
        Ok(items
            .iter()
            .filter_map(|i| match i {
                EmbedItem::Text(_) => t.next(),
                EmbedItem::Image(_) => p.next(),
            })
            .collect())
    };
    match std::panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(v)) if v.len() == items.len() => Event::Embedded(v),
        Ok(Ok(v)) => Event::Failed(ApiError::server(format!("{} embeddings for {} inputs", v.len(), items.len()))),
        Ok(Err(e)) => Event::Failed(ApiError::from_glimpse(&e, Some("input"))),
        Err(_) => Event::Failed(ApiError::server("the model call panicked (a glimpse bug: please report it)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(prompt: PromptSpec, images: usize, options: GenerateOptions) -> Work {
        job_padded(prompt, images, options, true)
    }

    fn job_padded(prompt: PromptSpec, images: usize, options: GenerateOptions, pad_questions: bool) -> Work {
        let px = PixelValues::frame(1, 1, vec![0.0; 3]);
        Work::Generate(Box::new(GenJob {
            images: vec![px; images],
            image_keys: vec![ImageKey::of(b""); images],
            prompt,
            options,
            prompt_tokens: 1,
            logprobs: false,
            stream: false,
            pad_questions,
        }))
    }

    fn greedy() -> GenerateOptions {
        GenerateOptions { max_new_tokens: Some(5), ..GenerateOptions::default() }
    }

    #[test]
    fn only_greedy_requests_with_the_same_settings_and_prompt_kind_share_a_call() {
        let q = |s: &str| PromptSpec::Question(s.into());
        assert!(can_share(&job(q("a"), 1, greedy()), &job(q("b"), 1, greedy())));
        assert!(can_share(&job(PromptSpec::Caption, 1, greedy()), &job(PromptSpec::Caption, 1, greedy())));
        assert!(!can_share(&job(PromptSpec::Caption, 1, greedy()), &job(q("b"), 1, greedy())));
        // Where padding is not exact, only the same question shares a call.
        let unpadded = |s: &str| job_padded(q(s), 1, greedy(), false);
        assert!(!can_share(&unpadded("a"), &unpadded("b")));
        assert!(can_share(&unpadded("a"), &unpadded("a")));
        let longer = GenerateOptions { max_new_tokens: Some(6), ..greedy() };
        assert!(!can_share(&job(q("a"), 1, greedy()), &job(q("a"), 1, longer)));
        let sampled = GenerateOptions { do_sample: true, seed: Some(1), ..greedy() };
        assert!(!can_share(&job(q("a"), 1, sampled.clone()), &job(q("a"), 1, sampled)));
        let chat = |t: &str| PromptSpec::Chat(t.into());
        assert!(can_share(&job(chat("x"), 1, greedy()), &job(chat("x"), 1, greedy())));
        assert!(!can_share(&job(chat("x"), 1, greedy()), &job(chat("y"), 1, greedy())));
        assert!(!can_share(&job(chat("x"), 1, greedy()), &job(chat("x"), 2, greedy())));
        assert!(!can_share(&Work::Embed(vec![]), &Work::Embed(vec![])));
    }

    fn queued(q: &Queue, work: Work) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        q.submit(Job { work, reply: Reply { events: tx, queued_at: Instant::now() } }).unwrap();
        rx
    }

    #[test]
    fn the_queue_is_bounded_batches_compatible_requests_and_drops_abandoned_ones() {
        let metrics = Arc::new(Metrics::default());
        let q = Queue::new(4, metrics.clone());
        let q1 = |s: &str| PromptSpec::Question(s.into());
        let _a = queued(&q, job(q1("a"), 1, greedy()));
        let gone = queued(&q, job(q1("b"), 1, greedy()));
        let _c = queued(&q, job(PromptSpec::Caption, 1, greedy()));
        let _d = queued(&q, job(q1("d"), 1, greedy()));
        assert!(q.is_full());
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let extra = Job { work: job(q1("e"), 1, greedy()), reply: Reply { events: tx, queued_at: Instant::now() } };
        assert_eq!(q.submit(extra).unwrap_err(), Rejected::Full);
        drop(gone);
        let batch = q.next_batch(8).unwrap();
        let prompts: Vec<PromptSpec> = batch
            .iter()
            .map(|j| match &j.work {
                Work::Generate(g) => g.prompt.clone(),
                Work::Embed(_) => unreachable!(),
            })
            .collect();
        assert_eq!(prompts, vec![q1("a"), q1("d")]);
        assert_eq!(metrics.dropped_before_run.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.queue_depth.load(Ordering::Relaxed), 1);
        q.close();
        assert_eq!(q.next_batch(8).unwrap().len(), 1, "a closed queue still drains");
        assert!(q.next_batch(8).is_none());
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let late = Job { work: job(q1("f"), 1, greedy()), reply: Reply { events: tx, queued_at: Instant::now() } };
        assert_eq!(q.submit(late).unwrap_err(), Rejected::Closed);
    }
}
