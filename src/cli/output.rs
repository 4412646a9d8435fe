//! What the CLI writes: results on stdout (never `println!`, which panics when stdout is closed
//! or full), diagnostics on stderr, and the per-image record formats.
//!
//! Records: every input image yields one record, in input order.
//! - `--json`: one object per line, `{"image", "text", "tokens", ...}` or `{"image", "error"}`.
//! - plain, several images: `IMAGE<TAB>TEXT`, or `IMAGE<TAB>error: MESSAGE` for a failed image.
//! - plain, one image: `TEXT` alone; a failure prints nothing on stdout (only the `error:` line).
//!
//! Plain fields are escaped by [`escape`] so that one record is always one line.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{ErrorKind, Write};
use std::path::Path;

/// Why output stopped: the reader went away (a closed pipe: `| head -1`), or a write failed
/// (`> /dev/full`, a broken disk).
#[derive(Debug)]
pub enum Stop {
    Closed,
    Failed(std::io::Error),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Closed => write!(f, "standard output was closed"),
            Stop::Failed(e) => write!(f, "cannot write to standard output: {e}"),
        }
    }
}

/// stdout, line by line: each line is flushed at once, so a record shows as soon as it is
/// known and a write error is seen at the record that caused it.
pub struct Stdout(std::io::StdoutLock<'static>);

impl Stdout {
    pub fn new() -> Self {
        Stdout(std::io::stdout().lock())
    }

    /// Writes `text` (one or more lines) and a final newline.
    pub fn line(&mut self, text: &str) -> Result<(), Stop> {
        let r = self.0.write_all(text.as_bytes()).and_then(|()| self.0.write_all(b"\n")).and_then(|()| self.0.flush());
        r.map_err(|e| if e.kind() == ErrorKind::BrokenPipe { Stop::Closed } else { Stop::Failed(e) })
    }

    /// Writes `text` as is (it ends with its own newline, or the caller adds none on purpose).
    pub fn text(&mut self, text: &str) -> Result<(), Stop> {
        let r = self.0.write_all(text.as_bytes()).and_then(|()| self.0.flush());
        r.map_err(|e| if e.kind() == ErrorKind::BrokenPipe { Stop::Closed } else { Stop::Failed(e) })
    }
}

/// One diagnostic line on stderr. A stderr that cannot be written to has nowhere to report
/// that, so its errors are ignored rather than panicking as `eprintln!` would.
pub fn diagnostic(kind: &str, msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{kind}: {}", one_line(msg));
}

/// `msg` on one line: line breaks become "; " so each diagnostic stays one line.
fn one_line(msg: &str) -> Cow<'_, str> {
    if msg.contains(['\n', '\r']) {
        Cow::Owned(msg.split(['\n', '\r']).map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; "))
    } else {
        Cow::Borrowed(msg)
    }
}

/// Escapes a plain-output field so it is one line without terminal control sequences:
/// `\` -> `\\`, newline -> `\n`, carriage return -> `\r`, tab -> `\t`, and every other control
/// character (C0, DEL, C1) or bidirectional-text control -> `\u{HEX}`. Everything else,
/// including all printable non-ASCII text, is kept as is.
pub fn escape(s: &str) -> Cow<'_, str> {
    let needs = |c: char| c == '\\' || c.is_control() || is_bidi_control(c);
    if !s.chars().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Characters that reorder displayed text (the "Trojan Source" set): invisible, so escaped.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{061c}')
}

/// The plain record of one image: `None` when nothing goes to stdout (a failed single image).
pub fn plain_record(image: &Path, result: Result<&str, &str>, several: bool) -> Option<String> {
    let name = image.display().to_string();
    match (several, result) {
        (false, Ok(text)) => Some(escape(text).into_owned()),
        (false, Err(_)) => None,
        (true, Ok(text)) => Some(format!("{}\t{}", escape(&name), escape(text))),
        (true, Err(msg)) => Some(format!("{}\terror: {}", escape(&name), escape(msg))),
    }
}

/// The `--json` record of one image that failed.
pub fn json_error_record(image: &Path, msg: &str) -> String {
    let mut fields = image_fields(image);
    fields.insert("error".into(), msg.into());
    serde_json::Value::Object(fields).to_string()
}

/// The fields that name an input file in a `--json` record, as dataset records name it:
/// `image`, the path as text (a byte that is not part of a UTF-8 character written `\xHH`),
/// and, when that text cannot hold the path exactly, `image_bytes`: its bytes in base64.
pub fn image_fields(image: &Path) -> serde_json::Map<String, serde_json::Value> {
    let (label, raw) = glimpse::dataset::input::path_label(image.as_os_str().as_encoded_bytes());
    let mut fields = serde_json::Map::new();
    fields.insert("image".into(), label.into());
    if let Some(raw) = raw {
        let field = glimpse::dataset::input::RAW_PATH_FIELD;
        fields.insert(field.into(), glimpse::dataset::output::base64(&raw).into());
    }
    fields
}

/// The stderr message for a failed image: the error itself when it already names the image,
/// else prefixed with the image's path.
pub fn image_error(image: &Path, msg: &str) -> String {
    let name = image.display().to_string();
    if msg.contains(&name) {
        msg.to_string()
    } else {
        format!("{name}: {msg}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_plain_text_and_escapes_the_rest() {
        assert_eq!(escape("a cat on a mat"), "a cat on a mat");
        assert_eq!(escape("café ☕ 猫"), "café ☕ 猫");
        assert_eq!(escape("two\nlines\tand\\slash\r"), "two\\nlines\\tand\\\\slash\\r");
        assert_eq!(escape("\u{1b}[31mred\u{7f}\u{85}"), "\\u{1b}[31mred\\u{7f}\\u{85}");
        assert_eq!(escape("abc\u{202e}def"), "abc\\u{202e}def");
    }

    #[test]
    fn records_are_one_line_each() {
        let p = Path::new("dir/a\tb.png");
        assert_eq!(plain_record(p, Ok("x\ny"), true).unwrap(), "dir/a\\tb.png\tx\\ny");
        assert_eq!(plain_record(p, Err("bad\nthing"), true).unwrap(), "dir/a\\tb.png\terror: bad\\nthing");
        assert_eq!(plain_record(p, Ok("x\ny"), false).unwrap(), "x\\ny");
        assert_eq!(plain_record(p, Err("bad"), false), None);
        let v: serde_json::Value = serde_json::from_str(&json_error_record(p, "bad")).unwrap();
        assert_eq!((v["image"].as_str(), v["error"].as_str()), (Some("dir/a\tb.png"), Some("bad")));
    }

    #[test]
    fn image_errors_name_the_image_once() {
        assert_eq!(image_error(Path::new("/x/a.png"), "image /x/a.png: corrupt"), "image /x/a.png: corrupt");
        assert_eq!(image_error(Path::new("/x/a.png"), "too long"), "/x/a.png: too long");
        assert_eq!(one_line("a\n  b\n"), "a; b");
    }
}
