//! A parsed request made ready for the worker, on a blocking thread before it is queued:
//! images fetched and preprocessed, the prompt rendered and tokenized, settings resolved and
//! validated. Whatever is wrong with a request is its own 400 here, never its batch's.

use serde_json::{json, Value};

use super::cache::ImageKey;
use super::error::ApiError;
use super::media::MediaPolicy;
use super::openai::{ChatRequest, EmbedInput, EmbeddingsRequest, Part, Role};
use super::scheduler::{EmbedItem, GenJob, PromptSpec};
use crate::api::{EmbedModel, Model};
use crate::generate::{GenerationOverrides, StopStrings};
use crate::image::{ImageInput, PixelValues};

/// An image's pixels and its image cache key.
fn image(
    model_preprocess: impl Fn(&ImageInput<'_>) -> crate::Result<PixelValues>,
    media: &MediaPolicy,
    url: &str,
    param: &str,
) -> Result<(PixelValues, ImageKey), ApiError> {
    let bytes = media.load(url, param)?;
    let pixels = model_preprocess(&ImageInput::Bytes { bytes: &bytes, name: param })
        .map_err(|e| ApiError::from_glimpse(&e, Some(param)))?;
    Ok((pixels, ImageKey::of(&bytes)))
}

/// A chat completion request as a generation job.
pub fn chat_job(model: &Model, req: &ChatRequest, media: &MediaPolicy) -> Result<GenJob, ApiError> {
    let image_parts: Vec<(&str, &str)> = req
        .messages
        .iter()
        .flat_map(|m| &m.parts)
        .filter_map(|p| match p {
            Part::Image { url, param } => Some((url.as_str(), param.as_str())),
            Part::Text(_) => None,
        })
        .collect();
    let (prompt, ids) = match &model.chat {
        Some(chat) => {
            if image_parts.is_empty() {
                return Err(ApiError::invalid(
                    "messages",
                    "the messages hold no image: this model answers about images, give at least one `image_url` part (text-only chat is not supported)",
                ));
            }
            let rendered =
                chat.render(&hf_messages(req), true).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
            // The ids come once the images are read: a family may expand each image by its size.
            (PromptSpec::Chat(rendered), None)
        }
        None => {
            let several = model.interleaves_images() && !image_parts.is_empty();
            if image_parts.len() != 1 && !several {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "the messages hold {} images: this model answers about exactly one image per request (several images need a chat model such as LLaVA)",
                        image_parts.len()
                    ),
                ));
            }
            // The last user message's text is the question; no text asks for a caption.
            let question = req
                .messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map(|m| {
                    m.parts
                        .iter()
                        .filter_map(|p| match p {
                            Part::Text(t) => Some(t.as_str()),
                            Part::Image { .. } => None,
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            if question.trim().is_empty() {
                if image_parts.len() != 1 {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("the messages hold {} images and no text: a caption is of one image, ask a question about several", image_parts.len()),
                    ));
                }
                let ids = model.input_ids(None).map_err(|e| ApiError::from_glimpse(&e, Some("messages")))?;
                (PromptSpec::Caption, Some(ids))
            } else {
                let ids = model
                    .question_ids(&question, image_parts.len())
                    .map_err(|e| ApiError::from_glimpse(&e, Some("messages")))?;
                (PromptSpec::Question(question), Some(ids))
            }
        }
    };
    // n > 1 samples unless the request asked for greedy decoding, which gives one answer.
    if req.n > 1 && req.temperature == Some(0.0) {
        return Err(ApiError::invalid(
            "n",
            format!("`n` is {} but `temperature` is 0 (greedy decoding gives one answer): set temperature > 0 to draw {0} samples", req.n),
        ));
    }
    let (images, image_keys): (Vec<PixelValues>, Vec<ImageKey>) = image_parts
        .iter()
        .map(|(url, param)| image(|i| model.preprocess_input(i), media, url, param))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    let ids = match ids {
        Some(ids) => ids,
        None => {
            let rendered = match &prompt {
                PromptSpec::Chat(rendered) => Some(rendered.as_str()),
                _ => None,
            };
            model.input_ids_for(rendered, &images).map_err(|e| ApiError::from_glimpse(&e, Some("messages")))?
        }
    };
    let mut options = model.options(&overrides(req)).map_err(|e| ApiError::from_glimpse(&e, None))?;
    // The length it gets alone, fixed now: batched with longer prompts it must stay the same.
    let new_tokens = options
        .new_tokens(ids.len(), model.family.max_positions())
        .map_err(|e| ApiError::from_glimpse(&e, Some("max_tokens")))?;
    options.max_new_tokens = Some(new_tokens);
    if !options.stop_strings.is_empty() {
        StopStrings::new(&options.stop_strings, &model.tokenizer)
            .map_err(|e| ApiError::from_glimpse(&e, Some("stop")))?;
    }
    if model.chat.is_some() {
        // One sequence: every image placeholder of the prompt gets one of the request's images.
        let frames = images.iter().map(PixelValues::frames).sum();
        let sequences =
            model.family.sequences_for(frames, &ids).map_err(|e| ApiError::from_glimpse(&e, Some("messages")))?;
        if sequences != 1 {
            return Err(ApiError::invalid(
                "messages",
                format!("the prompt makes {sequences} sequences of these images: give each image once"),
            ));
        }
    }
    // Encoders that read the prompt (InstructBLIP's Q-Former) make padded batches inexact.
    let pad_questions = model.chat.is_none()
        && model.family.text_inputs(&[""]).map_err(|e| ApiError::from_glimpse(&e, None))?.is_none();
    Ok(GenJob {
        images,
        image_keys,
        prompt,
        options,
        prompt_tokens: ids.len(),
        logprobs: req.logprobs,
        stream: req.stream,
        pad_questions,
    })
}

/// The request's settings over the model's defaults (generation_config.json, as `glimpse ask`).
/// `temperature` 0 is greedy; a temperature above 0, a `top_p` or `n` > 1 samples.
fn overrides(req: &ChatRequest) -> GenerationOverrides {
    let do_sample = match req.temperature {
        Some(t) => Some(t > 0.0),
        None if req.top_p.is_some() || req.n > 1 => Some(true),
        None => None,
    };
    GenerationOverrides {
        max_new_tokens: req.max_tokens,
        do_sample,
        temperature: req.temperature.filter(|&t| t > 0.0),
        top_p: req.top_p,
        top_k: req.top_k,
        seed: req.seed,
        stop_strings: (!req.stop.is_empty()).then(|| req.stop.clone()),
        num_return_sequences: (req.n > 1).then_some(req.n),
        ..GenerationOverrides::default()
    }
}

/// The messages as transformers' chat templates take them: content as a list of `image` and
/// `text` entries, in the order given.
fn hf_messages(req: &ChatRequest) -> Value {
    Value::Array(
        req.messages
            .iter()
            .map(|m| {
                let content: Vec<Value> = m
                    .parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => json!({"type": "text", "text": t}),
                        Part::Image { .. } => json!({"type": "image"}),
                    })
                    .collect();
                json!({"role": m.role.as_str(), "content": content})
            })
            .collect(),
    )
}

/// An embeddings request as the worker runs it, with its text token count.
pub fn embed_job(
    model: &EmbedModel,
    req: &EmbeddingsRequest,
    media: &MediaPolicy,
) -> Result<(Vec<EmbedItem>, usize), ApiError> {
    let dim = model.family.embed_dim();
    if let Some(d) = req.dimensions.filter(|&d| d != dim) {
        return Err(ApiError::invalid(
            "dimensions",
            format!("`dimensions` is {d}: this model's embeddings have {dim} (leave it out)"),
        ));
    }
    let mut tokens = 0;
    let items = req
        .inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let param = format!("input[{i}]");
            match input {
                EmbedInput::Text(t) => {
                    let ids = model.text_ids(t).map_err(|e| ApiError::from_glimpse(&e, Some(&param)))?;
                    tokens += ids.len();
                    Ok(EmbedItem::Text(ids))
                }
                EmbedInput::Image(url) => {
                    Ok(EmbedItem::Image(image(|i| model.preprocess_input(i), media, url, &param)?.0))
                }
            }
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok((items, tokens))
}
