//! The text a client sees of one generated sequence: the final text is `decode_text` of every
//! token cut before the first `stop` sequence (OpenAI leaves the stop sequence out); streamed
//! deltas are released from the same decode of the tokens so far, holding back what may still
//! change (trailing whitespace, an unfinished UTF-8 character, a possible start of a stop
//! sequence), so the deltas always add up to the final text.

/// The text before the first occurrence of any stop sequence, and whether one occurred.
pub fn cut_at_stop<'a>(text: &'a str, stops: &[String]) -> (&'a str, bool) {
    match stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(i) => (&text[..i], true),
        None => (text, false),
    }
}

/// Streamed text of one sequence: [`Release::update`] with the decode of every token so far,
/// [`Release::finish`] with the final text.
#[derive(Debug, Default)]
pub struct Release {
    sent: String,
    /// A stop sequence was reached: nothing more is released.
    stopped: bool,
}

impl Release {
    /// The new text that can no longer change, given the decode of every token so far.
    pub fn update(&mut self, decoded: &str, stops: &[String]) -> String {
        if self.stopped {
            return String::new();
        }
        let (text, stopped) = cut_at_stop(decoded, stops);
        let stable = if stopped {
            self.stopped = true;
            text
        } else {
            // Held back: a suffix that may grow into a stop sequence, then what a later token
            // may still strip or complete (whitespace, an unfinished UTF-8 character).
            let keep = text.len() - longest_stop_prefix_suffix(text, stops);
            text[..keep].trim_end_matches(|c: char| is_py_space(c) || c == '\u{fffd}')
        };
        self.take(stable)
    }

    /// What is left to send once the sequence ended, given its final (already cut) text.
    pub fn finish(&mut self, final_text: &str) -> String {
        self.stopped = true;
        self.take(final_text)
    }

    /// Everything sent so far.
    #[cfg(test)]
    pub fn sent(&self) -> &str {
        &self.sent
    }

    /// `stable`'s part past what was sent, when what was sent is its prefix (it is unless the
    /// tokenizer's decode rewrote released text; then nothing more is sent rather than text
    /// that contradicts it).
    fn take(&mut self, stable: &str) -> String {
        match stable.strip_prefix(self.sent.as_str()) {
            Some(new) if !new.is_empty() => {
                let new = new.to_string();
                self.sent.push_str(&new);
                new
            }
            _ => String::new(),
        }
    }
}

/// Python's `str.isspace`, what the final text's strip removes.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Bytes at the end of `text` that are a proper prefix of some stop sequence.
fn longest_stop_prefix_suffix(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| (1..s.len()).rev().filter(|&n| s.is_char_boundary(n) && text.ends_with(&s[..n])).take(1))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_first_stop_sequence_cuts_the_text() {
        assert_eq!(cut_at_stop("a cat. A dog.", &stops(&["dog", "."])), ("a cat", true));
        assert_eq!(cut_at_stop("a cat", &stops(&["dog"])), ("a cat", false));
        assert_eq!(cut_at_stop("a cat", &[]), ("a cat", false));
    }

    /// Deltas add up to the final text, whatever the decode steps were.
    fn stream(steps: &[&str], stop: &[&str]) -> (Vec<String>, String) {
        let stop = stops(stop);
        let mut r = Release::default();
        let mut deltas: Vec<String> = steps.iter().map(|s| r.update(s, &stop)).collect();
        let last = steps.last().copied().unwrap_or("");
        let final_text = cut_at_stop(last.trim(), &stop).0.to_string();
        deltas.push(r.finish(&final_text));
        assert_eq!(deltas.concat(), final_text);
        (deltas, final_text)
    }

    #[test]
    fn whitespace_and_unfinished_characters_wait() {
        let (d, _) = stream(&["a", "a ", "a c", "a ca\u{fffd}", "a caé", "a caé "], &[]);
        assert_eq!(d, ["a", "", " c", "a", "é", "", ""]);
    }

    #[test]
    fn a_possible_stop_sequence_waits_and_a_real_one_ends_the_stream() {
        let (d, f) = stream(&["a", "a E", "a EN", "a EX", "a EXa END", "a EXa END more"], &["END"]);
        assert_eq!(f, "a EXa ");
        assert_eq!(d, ["a", "", "", " EX", "a ", "", ""]);
        // A false start is released once it can no longer be a stop sequence.
        let (d, _) = stream(&["x E", "x Ey"], &["END"]);
        assert_eq!(d, ["x", " Ey", ""]);
    }

    #[test]
    fn rewritten_text_is_not_contradicted() {
        let mut r = Release::default();
        assert_eq!(r.update("ab c", &[]), "ab c");
        assert_eq!(r.update("ab. d", &[]), "");
        assert_eq!(r.finish("ab. d"), "");
        assert_eq!(r.sent(), "ab c");
    }
}
