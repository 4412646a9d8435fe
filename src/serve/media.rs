//! Image bytes of an `image_url`: `data:` URIs (base64), `file://` paths only under
//! `--allowed-local-media` (canonicalized, so `..` and symlinks cannot leave it), and never a
//! remote URL (the server makes no outgoing requests). Every read is bounded.

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine;

use super::error::ApiError;

/// Where images may come from, and how large one may be.
#[derive(Debug, Clone)]
pub struct MediaPolicy {
    /// Canonical `--allowed-local-media` folder.
    pub local_root: Option<PathBuf>,
    pub max_bytes: u64,
}

impl MediaPolicy {
    /// `root` canonicalized (it must be a folder).
    pub fn new(root: Option<&Path>, max_bytes: u64) -> crate::Result<Self> {
        let local_root = match root {
            None => None,
            Some(r) => {
                let c = r.canonicalize().map_err(|e| crate::Error::io(r, e))?;
                if !c.is_dir() {
                    return Err(crate::Error::InvalidInput(format!(
                        "--allowed-local-media {} is not a folder: name the folder file:// images may come from",
                        r.display()
                    )));
                }
                Some(c)
            }
        };
        Ok(Self { local_root, max_bytes })
    }

    /// The encoded image bytes `url` names; errors are 400s about `param`.
    pub fn load(&self, url: &str, param: &str) -> Result<Vec<u8>, ApiError> {
        let bad = |msg: String| ApiError::invalid(param, msg);
        if let Some(rest) = url.strip_prefix("data:") {
            return decode_data_uri(rest).map_err(bad);
        }
        if let Some(path) = url.strip_prefix("file://") {
            return self.read_local(path).map_err(bad);
        }
        let scheme = url.split_once(':').map_or("", |(s, _)| s).to_ascii_lowercase();
        if scheme == "http" || scheme == "https" {
            return Err(bad(format!(
                "remote image URLs are not fetched ({}): send the image as a data: URI (data:image/png;base64,...){}",
                cut(url),
                self.local_hint()
            )));
        }
        Err(bad(format!(
            "the image URL {} is neither a data: URI nor a file:// path: send data:image/png;base64,...{}",
            cut(url),
            self.local_hint()
        )))
    }

    fn local_hint(&self) -> &'static str {
        match self.local_root {
            Some(_) => " or a file:// path under --allowed-local-media",
            None => "",
        }
    }

    fn read_local(&self, raw: &str) -> Result<Vec<u8>, String> {
        let Some(root) = &self.local_root else {
            return Err(
                "file:// images are refused: start the server with --allowed-local-media DIR to allow files under DIR"
                    .into(),
            );
        };
        let path = PathBuf::from(percent_decode(raw)?);
        if !path.is_absolute() {
            return Err(format!("file://{raw} is not an absolute path: write file:///abs/path"));
        }
        // Canonical: `..` and symlinks resolved before the check, so neither can leave the root.
        let canonical = path.canonicalize().map_err(|e| format!("file://{raw}: {e}"))?;
        if !canonical.starts_with(root) {
            return Err(format!(
                "file://{raw} is outside --allowed-local-media {}: only files under it are read",
                root.display()
            ));
        }
        let file = std::fs::File::open(&canonical).map_err(|e| format!("file://{raw}: {e}"))?;
        if !file.metadata().map_err(|e| format!("file://{raw}: {e}"))?.is_file() {
            return Err(format!("file://{raw} is not a regular file"));
        }
        let mut bytes = Vec::new();
        file.take(self.max_bytes + 1).read_to_end(&mut bytes).map_err(|e| format!("file://{raw}: {e}"))?;
        if bytes.len() as u64 > self.max_bytes {
            return Err(format!("file://{raw} is over {} bytes (--max-body-bytes)", self.max_bytes));
        }
        Ok(bytes)
    }
}

/// `[<media type>][;base64],<data>` of a `data:` URI, base64 required and an image type.
fn decode_data_uri(rest: &str) -> Result<Vec<u8>, String> {
    let (meta, data) =
        rest.split_once(',').ok_or("the data: URI has no `,` before its data: write data:image/png;base64,<base64>")?;
    let mut fields = meta.split(';');
    let media = fields.next().unwrap_or("").trim().to_ascii_lowercase();
    if !media.is_empty() && !media.starts_with("image/") {
        return Err(format!("the data: URI holds {media:?}, not an image: use image/png, image/jpeg or image/webp"));
    }
    if !fields.any(|f| f.trim().eq_ignore_ascii_case("base64")) {
        return Err("the data: URI is not base64: write data:image/png;base64,<base64>".into());
    }
    // Clients wrap long base64 lines now and then: whitespace is not data.
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| format!("the data: URI's base64 does not decode ({e}): send standard base64 with padding"))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let v = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("file://{s}: a `%` is not followed by two hex digits"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("file://{s} is not UTF-8 once %-decoded"))
}

/// A URL shown in an error, cut to a readable length (a data: URI may be megabytes).
fn cut(url: &str) -> String {
    match url.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &url[..i]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(root: Option<&Path>) -> MediaPolicy {
        MediaPolicy::new(root, 1 << 20).unwrap()
    }

    #[test]
    fn data_uris_decode_and_bad_ones_say_why() {
        let p = policy(None);
        assert_eq!(p.load("data:image/png;base64,aGk=", "x").unwrap(), b"hi");
        assert_eq!(p.load("data:image/png;base64,aG\nk=", "x").unwrap(), b"hi");
        let msg = |url: &str| p.load(url, "x").unwrap_err().message;
        assert!(msg("data:image/png;base64,***").contains("does not decode"));
        assert!(msg("data:text/plain;base64,aGk=").contains("not an image"));
        assert!(msg("data:image/png,hi").contains("not base64"));
        assert!(msg("data:image/png;base64").contains("no `,`"));
        assert!(msg("https://example.com/cat.png").contains("remote image URLs are not fetched"));
        assert!(msg("ftp://x").contains("neither a data: URI"));
        assert!(msg("file:///etc/hostname").contains("--allowed-local-media"));
    }

    #[test]
    fn local_files_stay_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("media");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("a b.png"), b"img").unwrap();
        std::fs::write(dir.path().join("secret.png"), b"no").unwrap();
        let p = policy(Some(&root));
        let url = |path: &Path| format!("file://{}", path.display());
        assert_eq!(p.load(&url(&root.join("a b.png")), "x").unwrap(), b"img");
        assert_eq!(p.load(&format!("file://{}/a%20b.png", root.display()), "x").unwrap(), b"img");
        let escape = p.load(&url(&root.join("../secret.png")), "x").unwrap_err();
        assert!(escape.message.contains("outside --allowed-local-media"), "{}", escape.message);
        assert!(p.load("file://relative.png", "x").unwrap_err().message.contains("absolute"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret.png"), root.join("link.png")).unwrap();
            assert!(p.load(&url(&root.join("link.png")), "x").unwrap_err().message.contains("outside"));
        }
        let small = MediaPolicy { max_bytes: 2, ..p };
        assert!(small.load(&url(&root.join("a b.png")), "x").unwrap_err().message.contains("over 2 bytes"));
    }
}
