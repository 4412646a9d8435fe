//! `glimpse._glimpse`: the native half of the Python package. The pure-Python `glimpse` package
//! (python/glimpse/__init__.py) turns paths, bytes, PIL images and numpy arrays into the tagged
//! tuples taken here, and parses the JSON records returned here, which are built field for field
//! as the CLI's `--json` records. Every model call runs with the GIL released.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use glimpse::generate::stream::TextStreamer;
use glimpse::generate::{EarlyStopping, GenerationOverrides};
use glimpse::image::PixelValues;
use glimpse::models::ModelConfig;
use glimpse::{Cancel, Device, EmbedModel, Error, GenerateOptions, ImageInput, Model, Output, TokenEvent};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple, PyType};
use serde_json::{json, Map, Value};

/// A failure as Python sees it: the exception class of glimpse/_errors.py and the message (the
/// CLI's message for the same error). Cloneable, as a failed batch fails each of its inputs.
#[derive(Debug, Clone)]
struct Failure {
    class: &'static str,
    msg: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let class = match &e {
            Error::Image { .. } => "ImageError",
            Error::MissingFile { .. } => "MissingFileError",
            Error::InvalidInput(_) | Error::Tokenizer(_) => "InvalidInputError",
            Error::Unsupported(_) => "UnsupportedError",
            _ => "GlimpseError",
        };
        Failure { class, msg: e.to_string() }
    }
}

impl Failure {
    fn invalid(msg: String) -> Self {
        Failure { class: "InvalidInputError", msg }
    }

    fn into_py(self, py: Python<'_>) -> PyErr {
        match py.import("glimpse._errors").and_then(|m| m.getattr(self.class)) {
            Ok(class) => match class.downcast_into::<PyType>() {
                Ok(class) => PyErr::from_type(class, self.msg),
                Err(e) => e.into(),
            },
            Err(e) => e,
        }
    }
}

type Res<T> = Result<T, Failure>;

/// One image argument: `("path", PATH, NAME or None)`, `("bytes", NAME, BYTES)` or
/// `("rgb", NAME, WIDTH, HEIGHT, BYTES)` (HWC uint8), as the Python wrapper builds them.
enum Img {
    Path { path: PathBuf, name: Option<String> },
    Bytes { name: String, data: Vec<u8> },
    Rgb { name: String, width: usize, height: usize, data: Vec<u8> },
}

impl<'py> FromPyObject<'py> for Img {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let t = ob.downcast::<PyTuple>()?;
        let tag: String = t.get_item(0)?.extract()?;
        let bytes =
            |i: usize| -> PyResult<Vec<u8>> { Ok(t.get_item(i)?.downcast_into::<PyBytes>()?.as_bytes().to_vec()) };
        match tag.as_str() {
            "path" => Ok(Img::Path { path: t.get_item(1)?.extract()?, name: t.get_item(2)?.extract()? }),
            "bytes" => Ok(Img::Bytes { name: t.get_item(1)?.extract()?, data: bytes(2)? }),
            "rgb" => Ok(Img::Rgb {
                name: t.get_item(1)?.extract()?,
                width: t.get_item(2)?.extract()?,
                height: t.get_item(3)?.extract()?,
                data: bytes(4)?,
            }),
            other => Err(pyo3::exceptions::PyValueError::new_err(format!(
                "image argument tagged `{other}`: expected path, bytes or rgb"
            ))),
        }
    }
}

impl Img {
    fn input(&self) -> ImageInput<'_> {
        match self {
            Img::Path { path, .. } => ImageInput::Path(path),
            Img::Bytes { name, data } => ImageInput::Bytes { bytes: data, name },
            Img::Rgb { name, width, height, data } => ImageInput::Rgb { width: *width, height: *height, data, name },
        }
    }

    /// The record's `image` field: the name given, else the path as given (as the CLI
    /// prints it).
    fn name(&self) -> String {
        match self {
            Img::Path { name: Some(name), .. } => name.clone(),
            other => other.input().name(),
        }
    }
}

/// transformers-style keyword arguments over the checkpoint's defaults (`Model::default_options`),
/// the rule of the CLI's flags: each option given replaces the default, `None` keeps it.
fn options(model: &Model, kwargs: Option<&Bound<'_, PyDict>>) -> Res<GenerateOptions> {
    let mut o = GenerationOverrides::default();
    for (key, value) in kwargs.into_iter().flat_map(|d| d.iter()) {
        let key: String = key.extract().map_err(|_| Failure::invalid("generation option names are strings".into()))?;
        if value.is_none() {
            continue;
        }
        let v = &value;
        match key.as_str() {
            "max_new_tokens" => o.max_new_tokens = Some(arg(&key, v, "a positive integer")?),
            "max_length" => o.max_length = Some(arg(&key, v, "a positive integer")?),
            "min_new_tokens" => o.min_new_tokens = Some(arg(&key, v, "an integer >= 0")?),
            "num_beams" => o.num_beams = Some(arg(&key, v, "a positive integer")?),
            "do_sample" => o.do_sample = Some(arg(&key, v, "True or False")?),
            "temperature" => o.temperature = Some(arg(&key, v, "a number")?),
            "top_k" => o.top_k = Some(arg(&key, v, "an integer >= 0")?),
            "top_p" => o.top_p = Some(arg(&key, v, "a number")?),
            "min_p" => o.min_p = Some(arg(&key, v, "a number")?),
            "repetition_penalty" => o.repetition_penalty = Some(arg(&key, v, "a number")?),
            "no_repeat_ngram_size" => o.no_repeat_ngram_size = Some(arg(&key, v, "an integer >= 0")?),
            "length_penalty" => o.length_penalty = Some(arg(&key, v, "a number")?),
            "num_return_sequences" => o.num_return_sequences = Some(arg(&key, v, "a positive integer")?),
            "seed" => o.seed = Some(arg(&key, v, "an integer >= 0")?),
            "eos_token_id" => {
                o.eos_token_ids = Some(match v.extract::<u32>() {
                    Ok(one) => vec![one],
                    Err(_) => arg(&key, v, "a token id or a list of token ids")?,
                })
            }
            "stop_strings" => {
                o.stop_strings = Some(match v.extract::<String>() {
                    Ok(one) => vec![one],
                    Err(_) => arg(&key, v, "a string or a list of strings")?,
                })
            }
            "early_stopping" => {
                o.early_stopping = Some(match v.extract::<bool>() {
                    Ok(true) => EarlyStopping::Done,
                    Ok(false) => EarlyStopping::Heuristic,
                    Err(_) => arg::<String>(&key, v, "True, False or \"never\"")?.parse()?,
                })
            }
            _ => {
                return Err(Failure::invalid(format!(
                    "unknown generation option `{key}`: glimpse takes {}",
                    OPTION_NAMES.join(", ")
                )))
            }
        }
    }
    Ok(model.options(&o)?)
}

const OPTION_NAMES: &[&str] = &[
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "num_beams",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "seed",
    "eos_token_id",
    "stop_strings",
];

/// One option's value, or an error naming the option, the value and what it takes.
fn arg<'py, T: FromPyObject<'py>>(key: &str, v: &Bound<'py, PyAny>, what: &str) -> Res<T> {
    v.extract().map_err(|_| {
        let shown = v.repr().map(|r| r.to_string()).unwrap_or_else(|_| "?".into());
        Failure::invalid(format!("generation option {key}={shown}: expected {what}"))
    })
}

/// The CLI's `--json` record of one generated output (`glimpse caption/ask --json`).
fn output_record(image: Value, out: &Output, load_seconds: f64) -> String {
    glimpse::dataset::json_record(image, out, load_seconds).to_string()
}

/// A failed input's record, as the CLI writes it: `{"image": NAME, "error": MESSAGE}`.
fn error_record(key: &str, name: &str, f: &Failure) -> String {
    json!({ key: name, "error": f.msg }).to_string()
}

/// The two kinds of model a folder holds.
enum Loaded {
    Generates(Arc<Model>),
    Embeds(Arc<EmbedModel>),
}

/// A loaded model folder (`glimpse.Model` holds one).
#[pyclass(frozen, module = "glimpse._glimpse")]
struct NativeModel {
    loaded: Loaded,
    dir: PathBuf,
    architecture: String,
}

#[pyfunction]
#[pyo3(signature = (model, device = "auto", revision = None, offline = None, quantize = None))]
fn load(
    py: Python<'_>,
    model: String,
    device: &str,
    revision: Option<String>,
    offline: Option<bool>,
    quantize: Option<String>,
) -> PyResult<NativeModel> {
    let run = || -> Res<NativeModel> {
        let device = device.parse::<Device>()?;
        let quantize = quantize.as_deref().map(str::parse::<glimpse::Quantize>).transpose()?;
        let mut hub = glimpse::hub::HubOptions::from_env();
        if let Some(r) = revision {
            hub.revision = r;
        }
        hub.offline |= offline.unwrap_or(false);
        let dir = glimpse::hub::resolve_model_with(&model, &hub)?;
        // Which kind of model decides the loader; a config that does not parse is reported by the
        // loader itself, as the CLI reports it.
        let config = ModelConfig::load(&dir.join("config.json")).ok();
        let architecture = config.as_ref().map(|c| c.architecture().to_string()).unwrap_or_default();
        let loaded = if config.as_ref().is_some_and(ModelConfig::embeds) {
            if let Some(q) = quantize {
                return Err(glimpse::Error::Unsupported(format!(
                    "quantize={q:?} applies to generating models (their language decoder); {} is an embedding model: load it without quantize",
                    dir.display(),
                    q = q.name()
                ))
                .into());
            }
            Loaded::Embeds(Arc::new(EmbedModel::load(&dir, device)?))
        } else {
            let options = glimpse::LoadOptions { quantize };
            Loaded::Generates(Arc::new(Model::load_with(&dir, device, options)?))
        };
        Ok(NativeModel { loaded, dir, architecture })
    };
    py.allow_threads(run).map_err(|f| f.into_py(py))
}

impl NativeModel {
    fn generator(&self, method: &str) -> Res<&Arc<Model>> {
        match &self.loaded {
            Loaded::Generates(m) => Ok(m),
            Loaded::Embeds(_) => Err(Failure {
                class: "UnsupportedError",
                msg: format!(
                    "{}: {} embeds images and texts, it does not generate text: {method}() needs a captioning model; use embed() or classify()",
                    self.dir.display(),
                    self.architecture
                ),
            }),
        }
    }

    fn embedder(&self, method: &str) -> Res<&Arc<EmbedModel>> {
        match &self.loaded {
            Loaded::Embeds(m) => Ok(m),
            Loaded::Generates(_) => Err(Failure {
                class: "UnsupportedError",
                msg: format!(
                    "{}: {} generates text, it does not embed images or texts: {method}() needs an embedding model (CLIP); use caption() or ask()",
                    self.dir.display(),
                    self.architecture
                ),
            }),
        }
    }
}

/// Runs each image alone (a caption, or the answer to its question), in order, as the CLI does:
/// one record per image. `raise_errors`: the first failure is returned; else it becomes that
/// image's error record and the rest still run.
fn generate_each(
    model: &Model,
    images: &[Img],
    questions: Option<&[String]>,
    opts: &GenerateOptions,
    raise: bool,
) -> Res<Vec<String>> {
    let mut records = Vec::with_capacity(images.len());
    for (i, img) in images.iter().enumerate() {
        let result = (|| -> Res<String> {
            let pixels = model.preprocess_input(&img.input())?;
            let out = match questions {
                Some(q) => model.ask_pixels(&[pixels], &q[i], opts, &mut |_| {})?,
                None => model.caption_pixels(&pixels, opts, &mut |_| {})?,
            };
            Ok(output_record(img.name().into(), &out, model.load_seconds))
        })();
        match result {
            Ok(r) => records.push(r),
            Err(f) if raise => return Err(f),
            Err(f) => records.push(error_record("image", &img.name(), &f)),
        }
    }
    Ok(records)
}

/// Runs `run` over `count` inputs `batch` at a time; a failed input fails alone, a failed batch
/// fails each of its inputs (as the CLI's embed and classify). Returns one record per input.
fn batched(
    names: &[String],
    key: &str,
    batch: usize,
    raise: bool,
    mut run: impl FnMut(Range<usize>) -> Vec<Res<Map<String, Value>>>,
) -> Res<Vec<String>> {
    let mut records = Vec::with_capacity(names.len());
    let mut start = 0;
    while start < names.len() {
        let end = (start + batch.max(1)).min(names.len());
        for (name, result) in names[start..end].iter().zip(run(start..end)) {
            match result {
                Ok(fields) => {
                    let mut obj = Map::new();
                    obj.insert(key.into(), name.clone().into());
                    obj.extend(fields);
                    records.push(Value::Object(obj).to_string());
                }
                Err(f) if raise => return Err(f),
                Err(f) => records.push(error_record(key, name, &f)),
            }
        }
        start = end;
    }
    Ok(records)
}

/// Runs `f` once on the inputs that are still `Ok`; when it fails, each of them gets its error.
fn run_oks<X, Y>(items: Vec<Res<X>>, f: impl FnOnce(&[X]) -> glimpse::Result<Vec<Y>>) -> Vec<Res<Y>> {
    let mut ok = Vec::new();
    let slots: Vec<Res<()>> = items.into_iter().map(|r| r.map(|x| ok.push(x))).collect();
    let mut results = match f(&ok) {
        Ok(ys) => ys.into_iter().map(Ok).collect::<Vec<_>>(),
        Err(e) => {
            let f = Failure::from(e);
            (0..ok.len()).map(|_| Err(f.clone())).collect()
        }
    }
    .into_iter();
    slots
        .into_iter()
        .map(|s| s.and_then(|()| results.next().unwrap_or_else(|| Err(Failure::invalid("no result".into())))))
        .collect()
}

fn fields(pairs: Vec<(&str, Value)>) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[pymethods]
impl NativeModel {
    /// "generate" (caption, ask) or "embed" (embed, classify).
    #[getter]
    fn kind(&self) -> &'static str {
        match self.loaded {
            Loaded::Generates(_) => "generate",
            Loaded::Embeds(_) => "embed",
        }
    }

    /// config.json's architecture (e.g. Blip2ForConditionalGeneration).
    #[getter]
    fn architecture(&self) -> String {
        self.architecture.clone()
    }

    /// The model folder (a hub id's snapshot folder).
    #[getter]
    fn path(&self) -> PathBuf {
        self.dir.clone()
    }

    /// "cpu" or "cuda:<name>".
    #[getter]
    fn device(&self) -> String {
        match &self.loaded {
            Loaded::Generates(m) => m.backend_name(),
            Loaded::Embeds(m) => m.backend_name(),
        }
    }

    #[getter]
    fn load_seconds(&self) -> f64 {
        match &self.loaded {
            Loaded::Generates(m) => m.load_seconds,
            Loaded::Embeds(m) => m.load_seconds,
        }
    }

    /// The generation options a call without keyword arguments uses, as JSON.
    #[pyo3(signature = (**kwargs))]
    fn options(&self, py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
        let run = || -> Res<String> {
            let o = options(self.generator("options")?, kwargs)?;
            let early = match o.early_stopping {
                EarlyStopping::Heuristic => json!(false),
                EarlyStopping::Done => json!(true),
                EarlyStopping::Never => json!("never"),
            };
            Ok(json!({
                "max_new_tokens": o.max_new_tokens, "max_length": o.max_length,
                "min_new_tokens": o.min_new_tokens, "num_beams": o.num_beams, "do_sample": o.do_sample,
                "temperature": o.temperature, "top_k": o.top_k, "top_p": o.top_p, "min_p": o.min_p,
                "repetition_penalty": o.repetition_penalty, "no_repeat_ngram_size": o.no_repeat_ngram_size,
                "length_penalty": o.length_penalty, "early_stopping": early,
                "num_return_sequences": o.num_return_sequences, "seed": o.seed,
                "eos_token_id": o.eos_token_ids, "stop_strings": o.stop_strings,
            })
            .to_string())
        };
        run().map_err(|f| f.into_py(py))
    }

    /// Captions (`questions` None) or answers each image's question: one JSON record per image.
    #[pyo3(signature = (images, questions, raise_errors, **kwargs))]
    fn generate(
        &self,
        py: Python<'_>,
        images: Vec<Img>,
        questions: Option<Vec<String>>,
        raise_errors: bool,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<String>> {
        let method = if questions.is_some() { "ask" } else { "caption" };
        let prepared = self.generator(method).and_then(|m| Ok((m, options(m, kwargs)?)));
        let (model, opts) = prepared.map_err(|f| f.into_py(py))?;
        if let Some(q) = &questions {
            if q.len() != images.len() {
                let f = Failure::invalid(format!(
                    "{} questions for {} images: pass one question, or one per image",
                    q.len(),
                    images.len()
                ));
                return Err(f.into_py(py));
            }
        }
        py.allow_threads(|| generate_each(model, &images, questions.as_deref(), &opts, raise_errors))
            .map_err(|f| f.into_py(py))
    }

    /// One question about several images together (chat families): one JSON record whose
    /// `image` lists every image, as `glimpse ask --image A --image B --json`.
    #[pyo3(signature = (images, question, **kwargs))]
    fn ask_images(
        &self,
        py: Python<'_>,
        images: Vec<Img>,
        question: String,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let run = || -> Res<String> {
            let model = self.generator("ask_images")?;
            let opts = options(model, kwargs)?;
            py.allow_threads(|| {
                let pixels =
                    images.iter().map(|i| model.preprocess_input(&i.input())).collect::<glimpse::Result<Vec<_>>>()?;
                let out = model.ask_pixels(&pixels, &question, &opts, &mut |_| {})?;
                let names: Vec<String> = images.iter().map(Img::name).collect();
                Ok(output_record(names.into(), &out, model.load_seconds))
            })
        };
        run().map_err(|f| f.into_py(py))
    }

    /// The processor's own prompt text (one `<image>` per image) over every image: one JSON
    /// record, as `glimpse ask --image A --image B --prompt TEXT --json`.
    #[pyo3(signature = (images, prompt, **kwargs))]
    fn ask_prompt(
        &self,
        py: Python<'_>,
        images: Vec<Img>,
        prompt: String,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let run = || -> Res<String> {
            let model = self.generator("ask")?;
            let opts = options(model, kwargs)?;
            py.allow_threads(|| {
                let pixels =
                    images.iter().map(|i| model.preprocess_input(&i.input())).collect::<glimpse::Result<Vec<_>>>()?;
                let request = glimpse::api::Request::new(&pixels, glimpse::api::Prompt::Raw(Some(&prompt)), &opts);
                let mut outs = model.generate(&request, &mut |_| {})?;
                if outs.len() != 1 {
                    return Err(glimpse::Error::InvalidInput(format!(
                        "the prompt holds {} <image> placeholders for {} images, which makes {} answers: give one <image> per image",
                        prompt.matches("<image>").count(),
                        images.len(),
                        outs.len()
                    ))
                    .into());
                }
                let names: Vec<String> = images.iter().map(Img::name).collect();
                Ok(output_record(names.into(), &outs.remove(0), model.load_seconds))
            })
        };
        run().map_err(|f| f.into_py(py))
    }

    /// Streams one image's caption (or answer) as text pieces, generated on a worker thread.
    #[pyo3(signature = (image, question, **kwargs))]
    fn stream(
        &self,
        py: Python<'_>,
        image: Img,
        question: Option<String>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Stream> {
        let start = || -> Res<Stream> {
            let model = Arc::clone(self.generator("stream")?);
            let opts = options(&model, kwargs)?;
            if opts.num_beams > 1 {
                return Err(Failure::invalid(format!(
                    "stream=True with num_beams={}: beam search only knows its best hypothesis at the end; drop stream or use one beam",
                    opts.num_beams
                )));
            }
            // A bounded channel: the worker runs at most a few pieces ahead of the consumer, and
            // a consumer that goes away (iterator dropped or closed) cancels the request.
            let (tx, rx) = mpsc::sync_channel(STREAM_AHEAD);
            let cancel = Cancel::new();
            let opts = GenerateOptions { cancel: Some(cancel.clone()), ..opts };
            std::thread::Builder::new()
                .name("glimpse-stream".into())
                .spawn(move || {
                    let done = stream_one(&model, &image, question.as_deref(), &opts, &tx);
                    let _ = tx.send(match done {
                        Ok(record) => Piece::Done(record),
                        Err(f) => Piece::Failed(f),
                    });
                })
                .map_err(|e| Failure {
                    class: "GlimpseError",
                    msg: format!("cannot start the stream's thread: {e}"),
                })?;
            Ok(Stream { rx: Mutex::new(Some(rx)), result: Mutex::new(None), cancel })
        };
        start().map_err(|f| f.into_py(py))
    }

    /// Unit-length image embeddings, `batch_size` images per forward pass: JSON records
    /// `{"image", "embedding"}` as `glimpse embed --json`.
    #[pyo3(signature = (images, batch_size, raise_errors))]
    fn embed_images(
        &self,
        py: Python<'_>,
        images: Vec<Img>,
        batch_size: usize,
        raise_errors: bool,
    ) -> PyResult<Vec<String>> {
        let run = || -> Res<Vec<String>> {
            let model = self.embedder("embed")?;
            let names: Vec<String> = images.iter().map(Img::name).collect();
            py.allow_threads(|| {
                batched(&names, "image", batch_size, raise_errors, |r| {
                    let px: Vec<Res<PixelValues>> =
                        images[r].iter().map(|i| model.preprocess_input(&i.input()).map_err(Failure::from)).collect();
                    run_oks(px, |px| model.embed_images(px))
                        .into_iter()
                        .map(|e| e.map(|e| fields(vec![("embedding", json!(e))])))
                        .collect()
                })
            })
        };
        run().map_err(|f| f.into_py(py))
    }

    /// Unit-length text embeddings: JSON records `{"text", "embedding"}` as
    /// `glimpse embed --text ... --json`.
    #[pyo3(signature = (texts, batch_size, raise_errors))]
    fn embed_texts(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        batch_size: usize,
        raise_errors: bool,
    ) -> PyResult<Vec<String>> {
        let run = || -> Res<Vec<String>> {
            let model = self.embedder("embed")?;
            py.allow_threads(|| {
                batched(&texts, "text", batch_size, raise_errors, |r| {
                    let ids: Vec<Res<Vec<u32>>> =
                        texts[r].iter().map(|t| model.text_ids(t).map_err(Failure::from)).collect();
                    run_oks(ids, |ids| model.embed_text_ids(ids))
                        .into_iter()
                        .map(|e| e.map(|e| fields(vec![("embedding", json!(e))])))
                        .collect()
                })
            })
        };
        run().map_err(|f| f.into_py(py))
    }

    /// Zero-shot classification: JSON records `{"image", "labels", "probs"}` as
    /// `glimpse classify --json`.
    #[pyo3(signature = (images, labels, batch_size, raise_errors))]
    fn classify(
        &self,
        py: Python<'_>,
        images: Vec<Img>,
        labels: Vec<String>,
        batch_size: usize,
        raise_errors: bool,
    ) -> PyResult<Vec<String>> {
        let run = || -> Res<Vec<String>> {
            let model = self.embedder("classify")?;
            let names: Vec<String> = images.iter().map(Img::name).collect();
            py.allow_threads(|| {
                let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                if refs.is_empty() {
                    return Err(Failure::invalid("no labels given: pass at least one".into()));
                }
                let label_embeds = model.embed_texts(&refs)?;
                batched(&names, "image", batch_size, raise_errors, |r| {
                    let px: Vec<Res<PixelValues>> =
                        images[r].iter().map(|i| model.preprocess_input(&i.input()).map_err(Failure::from)).collect();
                    run_oks(px, |px| {
                        let logits = model.logits(&model.embed_images(px)?, &label_embeds)?;
                        Ok(logits.iter().map(|row| glimpse::api::softmax(row)).collect::<Vec<_>>())
                    })
                    .into_iter()
                    .map(|p| p.map(|p| fields(vec![("labels", json!(labels)), ("probs", json!(p))])))
                    .collect()
                })
            })
        };
        run().map_err(|f| f.into_py(py))
    }
}

/// Text pieces the stream's worker may send before the consumer takes them.
const STREAM_AHEAD: usize = 4;

/// What the stream's worker thread sends.
enum Piece {
    Text(String),
    /// The finished request's JSON record.
    Done(String),
    Failed(Failure),
}

/// Generates one image's text, sending each released piece (transformers' `TextStreamer`
/// rules, so the pieces join to the record's text); returns the JSON record.
fn stream_one(
    model: &Model,
    image: &Img,
    question: Option<&str>,
    opts: &GenerateOptions,
    tx: &mpsc::SyncSender<Piece>,
) -> Res<String> {
    let pixels = model.preprocess_input(&image.input())?;
    let mut streamer = TextStreamer::new(&model.tokenizer);
    let mut failed: Option<Error> = None;
    let mut on_token = |ev: &TokenEvent| {
        if failed.is_some() || ev.sequence != 0 {
            return;
        }
        match streamer.put(ev.token) {
            // The consumer went away: stop the request before its next step.
            Ok(text) if !text.is_empty() => {
                if tx.send(Piece::Text(text)).is_err() {
                    if let Some(c) = &opts.cancel {
                        c.cancel();
                    }
                }
            }
            Ok(_) => {}
            Err(e) => failed = Some(e),
        }
    };
    let out = match question {
        Some(q) => model.ask_pixels(std::slice::from_ref(&pixels), q, opts, &mut on_token)?,
        None => model.caption_pixels(&pixels, opts, &mut on_token)?,
    };
    if let Some(e) = failed {
        return Err(e.into());
    }
    let rest = streamer.end()?;
    if !rest.is_empty() {
        let _ = tx.send(Piece::Text(rest));
    }
    Ok(output_record(image.name().into(), &out, model.load_seconds))
}

/// An iterator of text pieces (`glimpse.Stream` wraps it); `result` is the JSON record once
/// the iteration ended.
#[pyclass(frozen, module = "glimpse._glimpse")]
struct Stream {
    /// None once closed.
    rx: Mutex<Option<mpsc::Receiver<Piece>>>,
    result: Mutex<Option<String>>,
    cancel: Cancel,
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        // Waits for the worker with the GIL released.
        let piece = py.allow_threads(|| match self.rx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(rx) => rx.recv(),
            None => Err(mpsc::RecvError),
        });
        match piece {
            Ok(Piece::Text(t)) => Ok(Some(t)),
            Ok(Piece::Done(record)) => {
                *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
                Ok(None)
            }
            Ok(Piece::Failed(f)) => Err(f.into_py(py)),
            // The worker is gone: the stream ended earlier (after its record or its error).
            Err(_) => Ok(None),
        }
    }

    /// The finished request's JSON record (None until the iteration ended).
    #[getter]
    fn result(&self) -> Option<String> {
        self.result.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the request at its next step and waits for the worker to finish: `result` is
    /// then the record of what was generated so far (None if it failed). Iterating afterwards
    /// ends at once. Dropping the stream also cancels, without waiting.
    fn close(&self, py: Python<'_>) {
        self.cancel.cancel();
        let Some(rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        // Drain until the worker's last message (its record or its error), GIL released.
        let record = py.allow_threads(move || {
            rx.iter().find_map(|piece| match piece {
                Piece::Text(_) => None,
                Piece::Done(record) => Some(Some(record)),
                Piece::Failed(_) => Some(None),
            })
        });
        if let Some(Some(record)) = record {
            *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The version of glimpse this module was built from.
#[pyfunction]
fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

#[pymodule]
fn _glimpse(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeModel>()?;
    m.add_class::<Stream>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
