//! Decoding JSON and YAML documents with field paths in every error.
//!
//! YAML goes through `serde_yaml::Value` first: that parser already refuses duplicate keys and
//! multiple documents, and deserialising from a value keeps serde_yaml's own path and position
//! decorations out of the messages, so all three entry points report errors the same way.

use serde::de::DeserializeOwned;

use crate::error::{ConfigError, FieldPath};

/// The `apiVersion` of every document in this crate.
pub const API_VERSION: &str = "can.dra.dev/v1alpha1";

/// Decodes a JSON text, refusing trailing content and duplicate keys.
pub(crate) fn json_str<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        let message = inner.to_string();
        // serde_json appends the position; the field path already says where.
        let position = format!(" at line {} column {}", inner.line(), inner.column());
        let message = message.strip_suffix(&position).unwrap_or(&message);
        ConfigError::from_serde(e.path(), message)
    })?;
    de.end()
        .map_err(|e| ConfigError::new("", format!("trailing content after the object: {e}")))?;
    Ok(value)
}

/// Decodes an already parsed JSON value (for example a Kubernetes `RawExtension`).
pub(crate) fn json_value<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ConfigError> {
    if value.is_null() {
        return Err(ConfigError::new("", "is empty"));
    }
    serde_path_to_error::deserialize(value)
        .map_err(|e| ConfigError::from_serde(e.path(), &e.inner().to_string()))
}

/// Decodes a single YAML document.
pub(crate) fn yaml_str<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| ConfigError::new("", e.to_string()))?;
    if value.is_null() {
        return Err(ConfigError::new("", "is empty"));
    }
    serde_path_to_error::deserialize(value)
        .map_err(|e| ConfigError::from_serde(e.path(), &e.inner().to_string()))
}

/// Checks the `apiVersion` and `kind` of a document.
pub(crate) fn check_type_meta(
    api_version: &str,
    kind: &str,
    expected_kind: &str,
) -> Result<(), ConfigError> {
    let root = FieldPath::root();
    for (field, actual, expected) in [
        ("apiVersion", api_version, API_VERSION),
        ("kind", kind, expected_kind),
    ] {
        if actual.is_empty() {
            return Err(root
                .key(field)
                .error(format!("is required and must be {expected:?}")));
        }
        if actual != expected {
            return Err(root.key(field).error(format!(
                "{actual:?} is not supported; expected {expected:?}"
            )));
        }
    }
    Ok(())
}
