//! The error type of every document in this crate, and its translation from serde errors.

use std::fmt;

/// A configuration document was rejected.
///
/// It names the field (a path such as `shaping.rx.loss` or `receiveFilters[2].id`) and the rule that
/// was broken; `Display` prints `<field path>: <what is wrong>`. Problems with the document as a whole
/// (YAML syntax, an empty document) have an empty path and print as `document: <what is wrong>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", if field.is_empty() { "document" } else { field.as_str() })]
pub struct ConfigError {
    field: String,
    message: String,
}

impl ConfigError {
    /// Builds an error for a field path and a message.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The path of the offending field, such as `shaping.rx.loss`; empty for the whole document.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong, without the field path.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Translates a path-tracked serde error into the `<path>: <rule>` form.
    ///
    /// serde's messages mention the offending key again (`unknown field `x``) or point at the parent
    /// (`missing field `id``); both are rewritten so the path names the field itself.
    pub(crate) fn from_serde(path: &serde_path_to_error::Path, message: &str) -> Self {
        let path = path.to_string();
        let path = if path == "." { String::new() } else { path };
        if let Some(rest) = message.strip_prefix("missing field `")
            && let Some((name, _)) = rest.split_once('`')
        {
            return Self::new(join(&path, name), "is required");
        }
        if let Some(rest) = message.strip_prefix("unknown field `")
            && let Some((_, expected)) = rest.split_once('`')
        {
            let expected = expected.trim_start_matches(',').trim();
            let message = match expected {
                "" => "unknown field".to_owned(),
                "there are no fields" => "unknown field (this object takes no fields)".to_owned(),
                e => format!("unknown field ({e})"),
            };
            return Self::new(path, message);
        }
        if let Some(rest) = message.strip_prefix("duplicate field `")
            && let Some((name, _)) = rest.split_once('`')
        {
            return Self::new(join(&path, name), "is given twice");
        }
        Self::new(path, message)
    }
}

/// Appends a key to a field path.
pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// A field path under construction, so validators can name nested fields cheaply.
#[derive(Debug, Clone)]
pub(crate) struct FieldPath(String);

impl FieldPath {
    pub(crate) fn root() -> Self {
        Self(String::new())
    }

    pub(crate) fn key(&self, key: &str) -> Self {
        Self(join(&self.0, key))
    }

    pub(crate) fn index(&self, i: usize) -> Self {
        Self(format!("{}[{i}]", self.0))
    }

    pub(crate) fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.0.clone(), message)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
