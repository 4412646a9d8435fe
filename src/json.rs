//! JSON files as glimpse reads them: bounded reads, Python's repeated-key rule, and errors that
//! name the file and the field.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

/// Reads and parses a JSON file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = crate::files::read(path, crate::files::MAX_CONFIG_BYTES)?;
    from_json_slice(&bytes, path)
}

/// Parses JSON bytes as `T`. The text goes through a [`Value`] first, so a repeated key keeps
/// its last value as Python's `json` does; type errors name the field (`vision_config.image_size`).
pub fn from_json_slice<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| Error::Json { path: path.to_path_buf(), msg: e.to_string() })?;
    from_json_value(&value, path)
}

/// `value` without its sub-config sections `names`, and each section (None when absent or `null`):
/// the top-level fields then parse apart from the sections, whose errors name their own fields.
pub fn split_sections<const N: usize>(value: &Value, names: [&str; N]) -> (Value, [Option<Value>; N]) {
    let mut rest = value.clone();
    let sections = names.map(|n| rest.as_object_mut().and_then(|o| o.remove(n)).filter(|v| !v.is_null()));
    (rest, sections)
}

/// A sub-config section from [`split_sections`], its field names prefixed with `prefix`
/// (`vision_config.`) in errors; `default()` when absent.
pub fn section_or<T: DeserializeOwned>(
    section: Option<Value>,
    path: &Path,
    prefix: &str,
    default: impl FnOnce() -> T,
) -> Result<T> {
    match section {
        Some(v) => from_json_value_at(&v, path, prefix),
        None => Ok(default()),
    }
}

/// Deserializes an already parsed JSON value, naming the offending field in the error.
pub fn from_json_value<T: DeserializeOwned>(value: &Value, path: &Path) -> Result<T> {
    from_json_value_at(value, path, "")
}

/// [`from_json_value`] for a section of a file: field names in errors get `prefix` (`text_config.`).
pub fn from_json_value_at<T: DeserializeOwned>(value: &Value, path: &Path, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        // Valid JSON holding a value of the wrong type: a config error about that field.
        let msg = match (field.as_str(), prefix) {
            (".", "") => e.inner().to_string(),
            (".", p) => format!("`{}`: {}", p.trim_end_matches('.'), e.inner()),
            (f, p) => format!("`{p}{f}`: {}", e.inner()),
        };
        Error::config(path, msg)
    })
}
