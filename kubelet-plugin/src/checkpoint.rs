//! The daemon's checkpoint: what it has prepared, persisted so that a restarted (or a newer,
//! rolling-updated) daemon knows every claim and can reconcile the kernel against it.
//!
//! The file is a small versioned envelope, `{"apiVersion": "checkpoint.can.dra.dev/v1",
//! "kind": "Checkpoint", "state": …}`, written atomically. A file this version cannot read is
//! an error, never silently replaced: forgetting prepared claims would orphan kernel state and
//! cut running pods off their bus.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::files;

/// The envelope's `apiVersion`.
pub const CHECKPOINT_API_VERSION: &str = "checkpoint.can.dra.dev/v1";
/// The envelope's `kind`.
pub const CHECKPOINT_KIND: &str = "Checkpoint";

/// Errors reading or writing the checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read or written.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The checkpoint file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a checkpoint this daemon understands.
    #[error(
        "checkpoint {path} cannot be read ({detail}); it was left untouched: \
         fix or remove it by hand, knowing that its claims will then be re-prepared from scratch"
    )]
    Unreadable {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The state could not be encoded.
    #[error("encoding checkpoint: {0}")]
    Encode(#[source] serde_json::Error),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Envelope<T> {
    api_version: String,
    kind: String,
    state: T,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: String,
    kind: String,
}

/// The checkpoint file of one daemon.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    path: PathBuf,
}

impl CheckpointStore {
    /// A store at `path` (conventionally `<plugins-dir>/<driver>/checkpoint.json`).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state; a missing file is the default (empty) state.
    pub fn load<T: DeserializeOwned + Default>(&self) -> Result<T, CheckpointError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(T::default()),
            Err(source) => {
                return Err(CheckpointError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let unreadable = |detail: String| CheckpointError::Unreadable {
            path: self.path.clone(),
            detail,
        };
        // Check the version first so a future format gets a clear message, not a field error.
        let header: Header =
            serde_json::from_slice(&bytes).map_err(|error| unreadable(error.to_string()))?;
        if header.api_version != CHECKPOINT_API_VERSION || header.kind != CHECKPOINT_KIND {
            return Err(unreadable(format!(
                "it is {}/{}, this daemon reads {CHECKPOINT_API_VERSION}/{CHECKPOINT_KIND}",
                header.api_version, header.kind
            )));
        }
        let envelope: Envelope<T> =
            serde_json::from_slice(&bytes).map_err(|error| unreadable(error.to_string()))?;
        Ok(envelope.state)
    }

    /// Removes the temporary files of checkpoint writes that a killed daemon left behind (see
    /// [`files::remove_stale_temporaries`]); returns them.
    pub fn remove_stale_temporaries(&self) -> Result<Vec<PathBuf>, CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: self.path.clone(),
            source,
        };
        let directory = self.path.parent().unwrap_or(Path::new("."));
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        files::remove_stale_temporaries(directory, &name).map_err(io)
    }

    /// Writes the state atomically (temporary file, fsync, rename, directory fsync).
    pub fn save<T: Serialize>(&self, state: &T) -> Result<(), CheckpointError> {
        let envelope = Envelope {
            api_version: CHECKPOINT_API_VERSION.to_string(),
            kind: CHECKPOINT_KIND.to_string(),
            state,
        };
        let bytes = serde_json::to_vec_pretty(&envelope).map_err(CheckpointError::Encode)?;
        files::write_atomically(&self.path, &bytes).map_err(|source| CheckpointError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    type State = BTreeMap<String, Vec<u32>>;

    #[test]
    fn a_missing_file_is_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path().join("checkpoint.json"));
        assert_eq!(store.load::<State>().unwrap(), State::new());
    }

    #[test]
    fn state_round_trips_inside_a_versioned_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path().join("checkpoint.json"));
        let state = State::from([("uid-1".to_string(), vec![1, 2])]);
        store.save(&state).unwrap();
        assert_eq!(store.load::<State>().unwrap(), state);
        let raw: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.path()).unwrap()).unwrap();
        assert_eq!(raw["apiVersion"], CHECKPOINT_API_VERSION);
        assert_eq!(raw["kind"], CHECKPOINT_KIND);
    }

    #[test]
    fn an_unknown_version_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path().join("checkpoint.json"));
        let future =
            br#"{"apiVersion":"checkpoint.can.dra.dev/v9","kind":"Checkpoint","state":{}}"#;
        std::fs::write(store.path(), future).unwrap();
        let error = store.load::<State>().unwrap_err();
        assert!(
            error.to_string().contains("checkpoint.can.dra.dev/v9"),
            "{error}"
        );
        assert_eq!(std::fs::read(store.path()).unwrap(), future);
    }

    #[test]
    fn a_torn_or_foreign_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path().join("checkpoint.json"));
        std::fs::write(store.path(), b"{\"apiVersion\":").unwrap();
        let error = store.load::<State>().unwrap_err();
        assert!(
            matches!(error, CheckpointError::Unreadable { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("checkpoint.json"), "{error}");
    }
}
