//! Loading YAML resources with errors that point at file:line.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Config files are small; anything larger is a mistake or an attack.
const MAX_FILE_BYTES: usize = 4 << 20;

/// A rejected config: which file, where in it (when known), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub message: String,
}

impl ConfigError {
    pub fn new(
        file: &Path,
        at: Option<serde_saphyr::Location>,
        message: impl Into<String>,
    ) -> Self {
        // serde-saphyr uses line 0 for "unknown".
        let at = at.filter(|l| l.line() > 0);
        Self {
            file: file.to_path_buf(),
            line: at.map(|l| l.line()),
            column: at.map(|l| l.column()),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::new(path, None, format!("cannot read: {e}")))?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(ConfigError::new(
            path,
            None,
            format!(
                "file is {} bytes; the limit is {MAX_FILE_BYTES}",
                bytes.len()
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| ConfigError::new(path, None, format!("not UTF-8: {e}")))
}

/// Parses one YAML document. `file` is only used to name the source in errors.
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let options = serde_saphyr::options! {
        with_snippet: false,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
    };
    serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| ConfigError::new(file, e.location(), strip_location(&e.to_string())))
}

/// Parses every `---`-separated document of a file.
pub fn parse_multiple<T: DeserializeOwned>(file: &Path, text: &str) -> Result<Vec<T>, ConfigError> {
    let options = serde_saphyr::options! {
        with_snippet: false,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
    };
    serde_saphyr::from_multiple_with_options(text, options)
        .map_err(|e| ConfigError::new(file, e.location(), strip_location(&e.to_string())))
}

/// serde-saphyr appends " at line L column C" to its messages; we print the position as
/// file:line:col in front instead, so drop the tail.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains("column") => msg[..i].to_string(),
        _ => msg.to_string(),
    }
}
