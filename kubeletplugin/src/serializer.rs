//! Running prepare and unprepare calls one at a time.
//!
//! The kubelet may call `NodePrepareResources` and `NodeUnprepareResources` concurrently, and
//! during a rolling update two plugin instances serve the same node. A [`Serializer`] lets one
//! call into the driver at a time: within the process through a mutex, and across instances
//! through an exclusive `flock` on a lock file in the plugin data directory (the Go helper's
//! `serialize.lock`, see [`crate::sockets::SERIALIZE_LOCK_FILE`]).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{Mutex, OwnedMutexGuard};

/// Errors of taking the serialisation lock.
#[derive(Debug, thiserror::Error)]
pub enum SerializeError {
    /// The lock file could not be opened or created.
    #[error("cannot open lock file {path}: {source}")]
    Open {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `flock` failed.
    #[error("cannot lock {path}: {errno}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        errno: Errno,
    },
    /// The blocking task waiting for the lock died.
    #[error("waiting for lock {path} failed: {reason}")]
    Wait {
        /// The lock file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Makes prepare/unprepare calls run one at a time.
#[derive(Debug)]
pub struct Serializer {
    mutex: Arc<Mutex<()>>,
    lock_file: Option<PathBuf>,
}

/// Held while one call runs in the driver; dropping it lets the next call in.
#[derive(Debug)]
pub struct SerialGuard {
    _file_lock: Option<Flock<File>>,
    _mutex: OwnedMutexGuard<()>,
}

impl Serializer {
    /// Serialises calls within this process only.
    pub fn in_process() -> Self {
        Self {
            mutex: Arc::new(Mutex::new(())),
            lock_file: None,
        }
    }

    /// Serialises calls within this process and, through an exclusive `flock` on `lock_file`,
    /// with every other instance using the same file (rolling updates share the plugin data
    /// directory). The file is created when missing.
    pub fn across_instances(lock_file: &Path) -> Self {
        Self {
            mutex: Arc::new(Mutex::new(())),
            lock_file: Some(lock_file.to_path_buf()),
        }
    }

    /// Waits until no other call runs, here or in another instance.
    pub async fn acquire(&self) -> Result<SerialGuard, SerializeError> {
        // The in-process mutex first: only one task per process then waits on the file lock,
        // and the blocking thread pool is not filled with waiters.
        let mutex = Arc::clone(&self.mutex).lock_owned().await;
        let file_lock = match &self.lock_file {
            None => None,
            Some(path) => {
                let path = path.clone();
                let wait_path = path.clone();
                let locked = tokio::task::spawn_blocking(move || lock_file(&path))
                    .await
                    .map_err(|e| SerializeError::Wait {
                        path: wait_path,
                        reason: e.to_string(),
                    })??;
                Some(locked)
            }
        };
        Ok(SerialGuard {
            _file_lock: file_lock,
            _mutex: mutex,
        })
    }
}

fn lock_file(path: &Path) -> Result<Flock<File>, SerializeError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| SerializeError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(locked) => return Ok(locked),
            Err((returned, Errno::EINTR)) => file = returned,
            Err((_, errno)) => {
                return Err(SerializeError::Lock {
                    path: path.to_path_buf(),
                    errno,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::SERIALIZE_LOCK_FILE;

    #[tokio::test]
    async fn the_file_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SERIALIZE_LOCK_FILE);
        let first = Serializer::across_instances(&path);
        let second = Serializer::across_instances(&path);
        let guard = first.acquire().await.unwrap();
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(200), second.acquire()).await;
        assert!(
            waiting.is_err(),
            "a second instance got the lock while it was held"
        );
        drop(guard);
        let taken = tokio::time::timeout(std::time::Duration::from_secs(5), second.acquire()).await;
        assert!(taken.is_ok(), "the lock was not released");
    }
}
