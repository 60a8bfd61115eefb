//! Loading YAML resources with errors that point at file:line.

use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::{Location, Spanned};

/// Config files are small; anything larger is a mistake or an attack.
pub const MAX_FILE_BYTES: usize = 4 << 20;

/// One resource document, wherever it comes from (a file, `sigil apply`, a snapshot). The
/// largest policy of the benchmarks is a few KiB; a 50 MB `purpose` string once cost the
/// sidecar 113 MB of RSS to parse. Checked on the text, before any parsing.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

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

impl ConfigError {
    /// The same error for a text that starts `lines` lines further down its file.
    pub(crate) fn shifted(mut self, lines: u64) -> Self {
        if let Some(l) = self.line.as_mut() {
            *l += lines;
        }
        self
    }
}

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

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        with_snippet: false,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
    }
}

/// Parses one YAML document. `file` is only used to name the source in errors.
///
/// An empty or null document (`---`, `~`, `null`, a lone tag) reaches `T` as null: read it as
/// `Spanned<Option<_>>` to refuse it at its line.
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    check_sizes(file, text)?;
    serde_saphyr::from_str_with_options(text, options()).map_err(|e| error(file, text, &e))
}

/// Refuses, at its first line, a document larger than `MAX_DOCUMENT_BYTES`.
fn check_sizes(file: &Path, text: &str) -> Result<(), ConfigError> {
    if text.len() <= MAX_DOCUMENT_BYTES {
        return Ok(());
    }
    match documents(text)
        .into_iter()
        .find(|d| d.text.len() > MAX_DOCUMENT_BYTES)
    {
        None => Ok(()),
        Some(d) => Err(ConfigError {
            file: file.to_path_buf(),
            line: Some(d.content_line.unwrap_or(d.first_line)),
            column: None,
            message: format!(
                "document is {} bytes; the limit is {MAX_DOCUMENT_BYTES} (1 MiB) per resource",
                d.text.len()
            ),
        }),
    }
}

/// Parses every `---`-separated document of a file, each with where it is. `kind` names what
/// the documents must be, in errors.
///
/// Documents with nothing but blank lines and comments are skipped: a leading or trailing
/// `---`, or a resource commented out whole, means "nothing here". A null document (`~`,
/// `null`, a lone tag) is refused: it is content, not a resource, and more likely a mistake
/// (a template that rendered nothing, a lost indentation) than a way to say "nothing".
/// `Resource::parse_all` reads files the same way.
pub fn parse_multiple<T: DeserializeOwned>(
    file: &Path,
    text: &str,
    kind: &str,
) -> Result<Vec<Spanned<T>>, ConfigError> {
    check_sizes(file, text)?;
    let docs: Vec<Spanned<T>> = serde_saphyr::from_multiple_with_options(text, options())
        .map_err(|e| error(file, text, &e))?;
    // serde-saphyr skips null documents without a word. Each document it returned has its
    // root inside one of ours; a document of ours with content and no root was null.
    let roots: Vec<u64> = docs.iter().map(|d| d.referenced.line()).collect();
    if roots.contains(&0) {
        return Ok(docs); // a position unknown: nothing to compare with
    }
    for doc in documents(text) {
        let Some(line) = doc.content_line else {
            continue;
        };
        let next_root = roots.partition_point(|&r| r < doc.first_line);
        if roots.get(next_root).is_none_or(|&r| r >= doc.end_line) {
            return Err(null_document(file, line, kind));
        }
    }
    Ok(docs)
}

/// The error for a document that is null where `what` was expected.
pub(crate) fn null_document(file: &Path, line: u64, what: &str) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: Some(line),
        column: None,
        message: format!("document is null (~, null or a lone tag); expected {what}"),
    }
}

/// One document of a YAML stream, as text.
pub(crate) struct Document<'a> {
    /// From its first line through its last, without a bare `---` line before it.
    pub(crate) text: &'a str,
    /// The line of the file that `text` starts on (1-based).
    pub(crate) first_line: u64,
    /// The line after its last.
    pub(crate) end_line: u64,
    /// Its first line with content; None when it has only blank lines, comments, directives
    /// and document markers.
    pub(crate) content_line: Option<u64>,
}

/// The documents of a YAML stream, split where YAML splits them: at a `---` or `...` line
/// (three characters at the start of a line, then a space, a tab or the line's end; no
/// content can begin that way, YAML 1.2 §9.1.4). A bare `---` line belongs to no document;
/// one with content after it (`--- {kind: Policy, ...}`) starts its document, and a `...`
/// line ends its own. Lines end at `\n`, `\r\n` or a lone `\r`, as YAML counts them.
pub(crate) fn documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let (mut start, mut first_line, mut content_line) = (0, 1, None);
    let mut line_no = 0u64;
    let mut at = 0;
    while at < text.len() {
        let rest = &text[at..];
        let len = rest.find(['\n', '\r']).unwrap_or(rest.len());
        let brk = match &rest.as_bytes()[len..] {
            [b'\r', b'\n', ..] => 2,
            [] => 0,
            _ => 1,
        };
        let (line, next) = (&rest[..len], at + len + brk);
        line_no += 1;
        let bare = line.strip_prefix('\u{feff}').unwrap_or(line);
        let marker = |m: &str| {
            bare.strip_prefix(m)
                .filter(|r| r.is_empty() || r.starts_with([' ', '\t']))
        };
        if let Some(after) = marker("---") {
            docs.push(Document {
                text: &text[start..at],
                first_line,
                end_line: line_no,
                content_line,
            });
            if has_content(after) {
                (start, first_line, content_line) = (at, line_no, Some(line_no));
            } else {
                (start, first_line, content_line) = (next, line_no + 1, None);
            }
        } else if marker("...").is_some() {
            docs.push(Document {
                text: &text[start..next],
                first_line,
                end_line: line_no + 1,
                content_line,
            });
            (start, first_line, content_line) = (next, line_no + 1, None);
        } else if content_line.is_none() && !bare.starts_with('%') && has_content(bare) {
            content_line = Some(line_no);
        }
        at = next;
    }
    docs.push(Document {
        text: &text[start..],
        first_line,
        end_line: line_no + 1,
        content_line,
    });
    docs
}

/// Whether a line (or the rest of one) holds more than blanks and a comment.
fn has_content(line: &str) -> bool {
    let line = line.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    !line.is_empty() && !line.starts_with('#')
}

fn error(file: &Path, text: &str, e: &serde_saphyr::Error) -> ConfigError {
    // The formatter for people who write YAML, not for the Rust programmer (whose hints name
    // serde-saphyr's options and types).
    let message = strip_location(&e.render_with_formatter(&serde_saphyr::UserMessageFormatter));
    let mut err = ConfigError::new(file, e.location(), message);
    if err.line.is_none() {
        if let Some((line, column)) = repeated_top_level_key(text, &err.message) {
            (err.line, err.column) = (Some(line), Some(column));
        }
    }
    err
}

/// serde-saphyr gives every error a position but one: a top-level key repeated behind a tag
/// (`kind: A`, then `!x kind: B`) passes its duplicate-key check, which compares tagged
/// nodes, and serde's derive then refuses it as "duplicate field `kind`" with no position.
/// This finds that key (its second occurrence) in the document that repeats it.
fn repeated_top_level_key(text: &str, message: &str) -> Option<(u64, u64)> {
    let key = message
        .strip_prefix("duplicate field `")?
        .strip_suffix('`')?;
    documents(text).iter().find_map(|doc| {
        let found = Cell::new(None);
        // What follows the repeat may not parse (serde stopped at the repeat): the pass
        // stops there too, and its result beyond `found` does not matter.
        let _ = serde_saphyr::with_deserializer_from_str_with_options(doc.text, options(), |de| {
            de.deserialize_map(SecondOccurrence { key, found: &found })
        });
        let at: Location = found.get()?;
        Some((at.line().checked_sub(1)? + doc.first_line, at.column()))
    })
}

/// Reads a mapping's keys until `key` comes a second time, and notes where.
struct SecondOccurrence<'a> {
    key: &'a str,
    found: &'a Cell<Option<Location>>,
}

impl<'de> Visitor<'de> for SecondOccurrence<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = false;
        while let Some(k) = map.next_key::<Spanned<KeyName>>()? {
            if k.value.0.as_deref() == Some(self.key) {
                if seen {
                    self.found.set(Some(k.referenced));
                    return Ok(());
                }
                seen = true;
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

/// A mapping key's text; None for a key that is not text (null, a number, a collection).
struct KeyName(Option<String>);

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Key;
        impl<'de> Visitor<'de> for Key {
            type Value = KeyName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyName, E> {
                Ok(KeyName(Some(v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<KeyName, E> {
                Ok(KeyName(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<KeyName, D::Error> {
                KeyName::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyName, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(KeyName(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyName, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(KeyName(None))
            }
        }
        d.deserialize_any(Key)
    }
}

/// serde-saphyr appends " at line L column C" to its messages; we print the position as
/// file:line:col in front instead, so drop the tail.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains("column") => msg[..i].to_string(),
        _ => msg.to_string(),
    }
}
