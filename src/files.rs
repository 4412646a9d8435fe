//! Reading the small files of a model folder (config.json, generation_config.json, processor
//! configs, tokenizer.json, chat templates, hub refs): only regular files, and never more than a
//! stated size, as images are read (src/image/decode.rs). A path to /dev/zero, a FIFO or a
//! folder then fails at once, naming the file, instead of reading without end or blocking.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// The largest config or tokenizer file read: tokenizer.json of a large vocabulary is tens of
/// MB; nothing a model folder holds besides weights comes near.
pub const MAX_CONFIG_BYTES: u64 = 256 << 20;

/// Refuses `path` unless it is a regular file (checked before opening: opening a FIFO blocks
/// until something writes to it).
pub fn check_regular(path: &Path) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a folder" } else { "a device, FIFO or socket" };
        return Err(Error::InvalidInput(format!(
            "{} is not a regular file ({what}): glimpse reads model files only from regular files; replace it with the file",
            path.display()
        )));
    }
    Ok(meta)
}

/// The bytes of the regular file `path`, refused past `max` bytes.
pub fn read(path: &Path, max: u64) -> Result<Vec<u8>> {
    check_regular(path)?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // The path may have been replaced between the two calls: check what was opened.
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let too_big = || {
        Error::InvalidInput(format!(
            "{} is larger than the {} MiB glimpse reads for such a file: it is not a model file of this kind",
            path.display(),
            max >> 20
        ))
    };
    if !meta.is_file() {
        return Err(Error::InvalidInput(format!("{} is not a regular file", path.display())));
    }
    if meta.len() > max {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(too_big());
    }
    Ok(bytes)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: &Path, max: u64) -> Result<String> {
    String::from_utf8(read(path, max)?)
        .map_err(|e| Error::InvalidInput(format!("{} is not UTF-8 text: {e}", path.display())))
}
