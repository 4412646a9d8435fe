//! `IdeficsProcessor` (transformers 5.17) as far as the text goes: the prompt built from an
//! interleaved list of texts and images, and which image each token may attend to
//! (`image_attention_mask`). The pixels are the generic resize-to-square processor's
//! (`IdeficsImageProcessor`: bicubic to `image_size` x `image_size`, rescale, normalize).

/// The processor's image token.
pub const IMAGE_TOKEN: &str = "<image>";
/// The token around each run of images.
pub const FAKE_TOKEN: &str = "<fake_token_around_image>";
/// The end-of-utterance token of the instruct models' prompts.
pub const END_OF_UTTERANCE: &str = "<end_of_utterance>";

/// One element of a prompt as `IdeficsProcessor` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    Text(&'a str),
    Image,
}

/// The processor's text for `items`: `bos`, then each text with its leading and trailing spaces
/// stripped (newlines and inner spaces stay) and each image as
/// `<fake_token_around_image><image><fake_token_around_image>`, where an image right after an
/// image only adds `<image><fake_token_around_image>` (the fake token between them is shared).
/// (`<end_of_utterance>` is not inserted between texts: transformers 5.17's tokenizers no longer
/// list it among `additional_special_tokens`, which that rule reads.)
pub fn prompt_text(bos: &str, items: &[Item<'_>]) -> String {
    let mut text = bos.to_string();
    let mut last_was_image = false;
    for item in items {
        match item {
            Item::Text(t) => {
                text.push_str(t.trim_matches(' '));
                last_was_image = false;
            }
            Item::Image => {
                if !last_was_image {
                    text.push_str(FAKE_TOKEN);
                }
                text.push_str(IMAGE_TOKEN);
                text.push_str(FAKE_TOKEN);
                last_was_image = true;
            }
        }
    }
    text
}

/// The interleaved items of a `--prompt` text: split at each `<image>` placeholder, empty texts
/// dropped (`"User:<image>Describe.\nAssistant:"` -> `["User:", image, "Describe.\nAssistant:"]`).
pub fn split_prompt(text: &str) -> Vec<Item<'_>> {
    let mut items = Vec::new();
    for (i, part) in text.split(IMAGE_TOKEN).enumerate() {
        if i > 0 {
            items.push(Item::Image);
        }
        if !part.is_empty() {
            items.push(Item::Text(part));
        }
    }
    items
}

/// idefics-9b-instruct's question form: `["User:", images..., question, "<end_of_utterance>",
/// "\nAssistant:"]`.
pub fn question_items(question: &str, images: usize) -> Vec<Item<'_>> {
    let mut items = vec![Item::Text("User:")];
    items.extend(std::iter::repeat_n(Item::Image, images));
    items.extend([Item::Text(question), Item::Text(END_OF_UTTERANCE), Item::Text("\nAssistant:")]);
    items
}

/// The image each token of `ids` attends to (`image_attention_mask_for_packed_input_ids`): the
/// count of `image` tokens so far minus one (the `<image>` token itself included, so tokens
/// before the first image get -1), and -1 after an `eos` token until the next image token.
/// Indices at or past `images` are -1 too (`incremental_to_binary_attention_mask`).
pub fn image_index(ids: &[u32], image: u32, eos: Option<u32>, images: usize) -> Vec<i64> {
    let (mut count, mut seen_eos) = (-1i64, false);
    ids.iter()
        .map(|&t| {
            if t == image {
                count += 1;
                seen_eos = false;
            }
            let index = if seen_eos || count >= images as i64 { -1 } else { count };
            if Some(t) == eos {
                seen_eos = true;
            }
            index
        })
        .collect()
}

/// The additive cross-attention mask of one token over `images` images of `rows` rows each:
/// 0 on the rows of image `index`, `finfo(float32).min` elsewhere (everywhere for -1).
pub fn mask_row(index: i64, images: usize, rows: usize) -> impl Iterator<Item = f32> {
    (0..images * rows).map(move |j| if index >= 0 && (j / rows) as i64 == index { 0.0 } else { f32::MIN })
}
