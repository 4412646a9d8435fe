//! transformers 5.17's `StopStringCriteria`: a sequence stops once a stop string appears at the
//! end of its tokens' text, matched token by token on the tokenizer's own token strings (not on
//! decoded text): the stop string must overlap the last token (the last token may run past its
//! end, e.g. "zo" stops at "zoo"), and the tokens before it must continue it backwards (a stop
//! string may span tokens, and the first of them may start before it). The token that completes
//! it stays in the output. The history is transformers' `input_ids` (prompt included), of which
//! only the last `max(len(stop string))` tokens are looked at.
//!
//! Token strings are cleaned as `StopStringCriteria.clean_tokenizer_vocab` does: byte-level BPE
//! tokens (GPT-2, OPT) become their bytes and stop strings are matched as UTF-8 bytes;
//! byte-fallback vocabularies (LLaMA) turn `<0xNN>` tokens into that byte and every other token
//! into its decoded text's bytes; other tokenizers are matched in characters. transformers
//! precomputes a table over the vocabulary for tensor ops; the check here walks the few tokens at
//! the end directly, with the same result.

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// How tokens and stop strings are compared (`_get_stop_string_matching_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchingMode {
    /// The decoder is (or contains) ByteLevel: tokens are GPT-2's byte-to-unicode alphabet.
    ByteLevel,
    /// The decoder contains ByteFallback: `<0xNN>` tokens are one byte.
    ByteFallback,
    /// Neither: Python string characters.
    Chars,
}

/// Resolved stop strings over one tokenizer's vocabulary.
#[derive(Debug, Clone)]
pub struct StopStrings {
    /// Each stop string in matching units (bytes, or code points in `Chars` mode).
    stops: Vec<Vec<u32>>,
    /// The clean string of each token id in matching units; None for ids the vocabulary lacks
    /// (they never match, as transformers' `-1` rows).
    tokens: Vec<Option<Vec<u32>>>,
    /// Tokens looked at from the end: the longest stop string (`maximum_token_len`).
    window: usize,
}

impl StopStrings {
    /// `stop_strings` over `tokenizer`'s vocabulary (added tokens included, as `get_vocab()`).
    pub fn new(stop_strings: &[String], tokenizer: &Tokenizer) -> Result<Self> {
        let tk = tokenizer.backend();
        let mode = tk.get_decoder().map_or(MatchingMode::Chars, |d| {
            let v = serde_json::to_value(d).unwrap_or_default();
            if v.get("type").and_then(|t| t.as_str()) == Some("ByteLevel") {
                MatchingMode::ByteLevel
            } else if has_type(&v, "ByteFallback") {
                MatchingMode::ByteFallback
            } else if has_type(&v, "ByteLevel") {
                MatchingMode::ByteLevel
            } else {
                MatchingMode::Chars
            }
        });
        // The static-prefix trick of clean_tokenizer_vocab: decode "abcdef"'s tokens followed by
        // the token and keep what follows "abcdef", so decoders that strip a leading space or
        // add one at the start of a text do not alter the token.
        const PREFIX: &str = "abcdef";
        let base: Vec<String> = tk
            .encode(PREFIX, false)
            .map_err(|e| Error::Tokenizer(format!("tokenizing the stop-string prefix {PREFIX:?}: {e}")))?
            .get_ids()
            .iter()
            .filter_map(|&id| tk.id_to_token(id))
            .collect();
        let byte_decoder = byte_level_decoder();
        let vocab = tk.get_vocab(true);
        let size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let mut tokens = vec![None; size];
        for (token, id) in vocab {
            let direct = match mode {
                MatchingMode::ByteLevel => {
                    token.chars().map(|c| byte_decoder.get(&c).map(|&b| b as u32)).collect::<Option<Vec<u32>>>()
                }
                MatchingMode::ByteFallback => byte_fallback(&token).map(|b| vec![b as u32]),
                MatchingMode::Chars => None,
            };
            let units = match direct {
                Some(u) => u,
                None => {
                    let mut parts = base.clone();
                    parts.push(token.clone());
                    let text = match tk.get_decoder() {
                        Some(d) => tokenizers::Decoder::decode(d, parts)
                            .map_err(|e| Error::Tokenizer(format!("decoding token {token:?} for stop strings: {e}")))?,
                        None => parts.join(" "),
                    };
                    let rest = text.find(PREFIX).map_or("", |i| &text[i + PREFIX.len()..]);
                    units(rest, mode)
                }
            };
            tokens[id as usize] = Some(units);
        }
        Self::from_parts(stop_strings, mode, tokens)
    }

    /// Stop strings over an explicit table of clean token strings (in `mode`'s units), for tests
    /// and tokenizers built elsewhere.
    pub fn from_parts(stop_strings: &[String], mode: MatchingMode, tokens: Vec<Option<Vec<u32>>>) -> Result<Self> {
        let stops: Vec<Vec<u32>> = stop_strings.iter().map(|s| units(s, mode)).collect();
        let window = stops.iter().map(Vec::len).max().unwrap_or(0);
        let s = Self { stops, tokens, window };
        // transformers refuses stop strings no token can end (none has an end overlap).
        let any_end =
            s.stops.iter().any(|stop| s.tokens.iter().flatten().any(|t| end_overlaps(t, stop).next().is_some()));
        if !any_end {
            return Err(Error::InvalidInput(format!(
                "no token of the vocabulary can complete the stop strings {stop_strings:?} (as transformers: they hold characters the tokenizer's vocabulary lacks): use other stop strings"
            )));
        }
        Ok(s)
    }

    /// True when the sequence `ids` (prompt and generated tokens) ends with a stop string that
    /// overlaps its last token.
    pub fn matches(&self, ids: &[u32]) -> bool {
        let window = &ids[ids.len().saturating_sub(self.window)..];
        let Some((last, before)) = window.split_last() else { return false };
        let Some(last) = self.token(*last) else { return false };
        self.stops.iter().any(|stop| {
            end_overlaps(last, stop).any(|end| {
                let mut pos = end;
                if pos >= stop.len() {
                    return true;
                }
                for &id in before.iter().rev() {
                    match self.token(id) {
                        Some(t) if fits_at(t, stop, pos) => pos += t.len(),
                        _ => return false,
                    }
                    if pos >= stop.len() {
                        return true;
                    }
                }
                false
            })
        })
    }

    fn token(&self, id: u32) -> Option<&[u32]> {
        self.tokens.get(id as usize).and_then(|t| t.as_deref())
    }
}

/// The lengths by which a prefix of `token` covers the end of `stop`
/// (`_stop_string_get_matching_positions`'s `possible_end_lengths`, only the positive ones: an
/// empty stop string never matches, as in transformers).
fn end_overlaps<'a>(token: &'a [u32], stop: &'a [u32]) -> impl Iterator<Item = usize> + 'a {
    (1..=token.len()).filter_map(move |n| {
        let m = n.min(stop.len());
        // The token's first n units, reversed, start with the stop string's last m reversed.
        let tok = token[..n].iter().rev();
        let st = stop[stop.len() - m..].iter().rev();
        (m > 0 && tok.take(m).eq(st)).then_some(m)
    })
}

/// Whether `token` continues a match with `pos` units of `stop` already matched at its end: it
/// ends right before them, running off the stop string's start if it is longer (a valid position,
/// `1 <= pos < len(stop)`).
fn fits_at(token: &[u32], stop: &[u32], pos: usize) -> bool {
    if pos == 0 || pos >= stop.len() {
        return false;
    }
    let end = stop.len() - pos;
    let m = token.len().min(end);
    token[token.len() - m..] == stop[end - m..end]
}

fn has_type(v: &serde_json::Value, ty: &str) -> bool {
    match v {
        serde_json::Value::Object(m) => {
            m.get("type").and_then(|t| t.as_str()) == Some(ty) || m.values().any(|x| has_type(x, ty))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| has_type(x, ty)),
        _ => false,
    }
}

/// `text` in `mode`'s matching units.
fn units(text: &str, mode: MatchingMode) -> Vec<u32> {
    match mode {
        MatchingMode::Chars => text.chars().map(|c| c as u32).collect(),
        _ => text.bytes().map(u32::from).collect(),
    }
}

/// `<0xNN>` to its byte.
fn byte_fallback(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// GPT-2's `bytes_to_unicode`, inverted: the printable bytes stand for themselves, the others
/// for code points from 256 up, in byte order.
pub fn byte_level_decoder() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                b as u32
            } else {
                next += 1;
                next - 1
            };
            (char::from_u32(c).expect("below 512"), b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(tokens: &[&str]) -> Vec<Option<Vec<u32>>> {
        tokens.iter().map(|t| Some(units(t, MatchingMode::Chars))).collect()
    }

    /// The examples of transformers' docstring, for the stop string "stop".
    #[test]
    fn docstring_examples() {
        let vocab = ["st", "op", "stop", "opera", "sto", "pper", "las", "topper", "s", "to", "pped", "at", "tion"];
        let s = StopStrings::from_parts(&["stop".into()], MatchingMode::Chars, table(&vocab)).unwrap();
        let id = |t: &str| vocab.iter().position(|v| *v == t).unwrap() as u32;
        let seq = |ts: &[&str]| ts.iter().map(|t| id(t)).collect::<Vec<_>>();
        for hit in
            [&["st", "op"][..], &["stop"], &["st", "opera"], &["sto", "pper"], &["las", "topper"], &["s", "to", "pped"]]
        {
            assert!(s.matches(&seq(hit)), "{hit:?} must match");
        }
        for miss in [&["stop", "at"][..], &["st", "op", "at"], &["st", "opera", "tion"], &["to", "pped"], &["op"]] {
            assert!(!s.matches(&seq(miss)), "{miss:?} must not match");
        }
    }

    #[test]
    fn byte_level_alphabet_is_gpt2s() {
        let d = byte_level_decoder();
        assert_eq!(d.len(), 256);
        assert_eq!(d[&'Ġ'], b' ');
        assert_eq!(d[&'Ċ'], b'\n');
        assert_eq!(d[&'a'], b'a');
        assert_eq!(byte_fallback("<0x0A>"), Some(10));
        assert_eq!(byte_fallback("<0xZZ>"), None);
    }

    #[test]
    fn empty_and_impossible_stop_strings() {
        let s = StopStrings::from_parts(&["".into(), "ab".into()], MatchingMode::Chars, table(&["a", "b"])).unwrap();
        assert!(!s.matches(&[0]), "the empty stop string never matches");
        assert!(s.matches(&[0, 1]));
        let e = StopStrings::from_parts(&["zz".into()], MatchingMode::Chars, table(&["a", "b"])).unwrap_err();
        assert!(e.to_string().contains("\"zz\""), "{e}");
    }
}
