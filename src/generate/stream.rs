//! Incremental detokenization for streaming, as transformers' `TextStreamer` (skip special
//! tokens): the token cache is decoded whole each time and only text that can no longer change
//! is released: everything up to a newline, or up to a CJK character, else up to the last
//! space. A byte-level token that ends inside a UTF-8 character decodes to U+FFFD, which is
//! never followed by a space until the character is complete, so it is held back with its word.
//! On top of that the stream is stripped as the final text is (Python's `str.strip()`): leading
//! whitespace is dropped and whitespace is only released once something follows it.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

pub struct TextStreamer<'t> {
    tokenizer: &'t Tokenizer,
    cache: Vec<u32>,
    /// Characters of the cache's text already released (TextStreamer's `print_len`).
    printed: usize,
    started: bool,
    /// Whitespace released by the streamer but held until something non-blank follows.
    pending: String,
}

impl<'t> TextStreamer<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        Self { tokenizer, cache: Vec::new(), printed: 0, started: false, pending: String::new() }
    }

    /// Adds one generated token; returns the text it releases (often empty).
    pub fn put(&mut self, token: u32) -> Result<String> {
        self.cache.push(token);
        let text = self.tokenizer.decode(&self.cache, true)?;
        let chars: Vec<char> = text.chars().collect();
        let from = self.printed.min(chars.len());
        let printable: String = if text.ends_with('\n') {
            self.cache.clear();
            self.printed = 0;
            chars[from..].iter().collect()
        } else if chars.last().is_some_and(|&c| is_cjk(c)) {
            self.printed = chars.len();
            chars[from..].iter().collect()
        } else {
            // Up to and including the last space (Python's `text.rfind(" ") + 1`).
            let end = chars.iter().rposition(|&c| c == ' ').map_or(0, |i| i + 1).max(from);
            self.printed = end;
            chars[from..end].iter().collect()
        };
        Ok(self.strip(&printable))
    }

    /// Releases what is left once generation ended.
    pub fn end(&mut self) -> Result<String> {
        let rest = if self.cache.is_empty() {
            String::new()
        } else {
            let text = self.tokenizer.decode(&self.cache, true)?;
            text.chars().skip(self.printed).collect()
        };
        self.cache.clear();
        self.printed = 0;
        let out = self.strip(&rest);
        self.pending.clear();
        Ok(out)
    }

    fn strip(&mut self, chunk: &str) -> String {
        let mut out = String::new();
        for c in chunk.chars() {
            if is_py_space(c) {
                if self.started {
                    self.pending.push(c);
                }
            } else {
                self.started = true;
                out.push_str(&self.pending);
                self.pending.clear();
                out.push(c);
            }
        }
        out
    }
}

/// Python's `str.isspace` (what `str.strip()` removes).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// transformers' `TextStreamer._is_chinese_char`: the CJK Unified Ideographs blocks.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}
