//! Where the plugin's unix sockets live, and how they are bound and removed.
//!
//! Layout (the kubelet's conventions, `dra-api.md` §1.4):
//! - DRA service socket: `<plugins-dir>/<driver>/dra.sock`, or `dra-<podUID>.sock` when rolling
//!   updates are on, so that the old and the new instance can serve side by side;
//! - registration socket: `<registrar-dir>/<driver>-reg.sock`, or with rolling updates a name
//!   unique to the pod, shortened by hashing until the path fits a unix socket address.
//!
//! A socket file is ours only at our own path: a stale one there (left by a crash) is replaced,
//! and at shutdown we remove it only if it is still the one we bound, never another
//! instance's.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use tokio::net::UnixListener;

/// File name of the DRA service socket without rolling updates.
pub const DRA_SOCKET_FILE: &str = "dra.sock";

/// File name, in the plugin data directory, of the lock that serialises prepare/unprepare
/// across plugin instances during a rolling update.
pub const SERIALIZE_LOCK_FILE: &str = "serialize.lock";

/// The longest socket path, in bytes, that can be bound here.
///
/// `sun_path` has 108 bytes; the kubelet's Go helper accepts paths of exactly 108 bytes
/// (no terminating NUL), but Rust's socket address conversion insists on the NUL, so one byte
/// less is the real limit here.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Errors of socket naming, binding and removal.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A name that becomes a path component is empty or contains `/` or NUL.
    #[error("{what} {value:?} cannot be used in a socket path: {reason}")]
    InvalidName {
        /// Which input (driver name, pod UID).
        what: &'static str,
        /// The rejected value.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The socket path does not fit a unix socket address.
    #[error(
        "socket path {path} is {len} bytes; unix sockets allow at most {MAX_SOCKET_PATH_BYTES}"
    )]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Something that is not a socket occupies our socket path; it is left alone.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A file-system operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl SocketError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The paths the plugin uses, derived from the driver name, the kubelet's directories and,
/// with rolling updates, the plugin pod's UID.
///
/// ```
/// use std::path::Path;
/// use dra_kubeletplugin::sockets::SocketLayout;
///
/// let layout = SocketLayout::new(
///     "dra.example",
///     Path::new("/var/lib/kubelet/plugins"),
///     Path::new("/var/lib/kubelet/plugins_registry"),
///     None,
/// )
/// .unwrap();
/// assert_eq!(layout.service_socket, Path::new("/var/lib/kubelet/plugins/dra.example/dra.sock"));
/// assert_eq!(
///     layout.registration_socket,
///     Path::new("/var/lib/kubelet/plugins_registry/dra.example-reg.sock")
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketLayout {
    /// `<plugins-dir>/<driver>`: holds the service socket and state shared between instances.
    pub plugin_data_dir: PathBuf,
    /// Absolute path of the DRA service socket (advertised to the kubelet as the endpoint).
    pub service_socket: PathBuf,
    /// Absolute path of the registration socket the kubelet discovers.
    pub registration_socket: PathBuf,
    /// Whether the names are unique to this instance (rolling updates on).
    pub rolling_update: bool,
}

impl SocketLayout {
    /// Computes the layout. `pod_uid` turns rolling-update naming on. Relative directories are
    /// made absolute against the current directory, since the kubelet needs an absolute
    /// endpoint.
    pub fn new(
        driver_name: &str,
        plugins_dir: &Path,
        registrar_dir: &Path,
        pod_uid: Option<&str>,
    ) -> Result<Self, SocketError> {
        check_component("driver name", driver_name)?;
        if let Some(uid) = pod_uid {
            check_component("pod UID", uid)?;
        }
        let plugins_dir = normalise(plugins_dir)?;
        let registrar_dir = normalise(registrar_dir)?;
        let plugin_data_dir = plugins_dir.join(driver_name);
        let (service_file, registration_file) = match pod_uid {
            None => (
                DRA_SOCKET_FILE.to_owned(),
                format!("{driver_name}-reg.sock"),
            ),
            Some(uid) => (
                format!("dra-{uid}.sock"),
                rolling_update_registration_file(&registrar_dir, driver_name, uid),
            ),
        };
        let layout = Self {
            service_socket: plugin_data_dir.join(service_file),
            registration_socket: registrar_dir.join(registration_file),
            plugin_data_dir,
            rolling_update: pod_uid.is_some(),
        };
        check_length(&layout.service_socket)?;
        check_length(&layout.registration_socket)?;
        Ok(layout)
    }

    /// `<plugin-data-dir>/serialize.lock`.
    pub fn serialize_lock(&self) -> PathBuf {
        self.plugin_data_dir.join(SERIALIZE_LOCK_FILE)
    }
}

/// The registration socket's file name for one instance during rolling updates.
///
/// The kubelet only needs the names to be unique per instance; like the Go helper (v0.37), the
/// most readable form that fits is used:
/// 1. `<driver>-<podUID>-reg.sock`;
/// 2. `<driver>-<h1>-reg.sock`, `h1` = unpadded base64url of the first 8 bytes of
///    SHA-256(podUID);
/// 3. `dra-<h2>-reg.sock`, `h2` = unpadded base64url of the first 16 bytes of
///    SHA-256(driver, NUL, podUID).
///
/// "Fits" means `<registrar_dir>/<name>` is at most [`MAX_SOCKET_PATH_BYTES`]. When not even
/// the third form fits, it is returned anyway and binding reports the length.
pub fn rolling_update_registration_file(
    registrar_dir: &Path,
    driver_name: &str,
    pod_uid: &str,
) -> String {
    let fits = |name: &str| registrar_dir.join(name).as_os_str().len() <= MAX_SOCKET_PATH_BYTES;

    let full = format!("{driver_name}-{pod_uid}-reg.sock");
    if fits(&full) {
        return full;
    }
    let uid_hash = Sha256::digest(pod_uid.as_bytes());
    let hashed_uid = format!(
        "{driver_name}-{}-reg.sock",
        URL_SAFE_NO_PAD.encode(&uid_hash[..8])
    );
    if fits(&hashed_uid) {
        return hashed_uid;
    }
    // The NUL separator keeps ("ab", "c") and ("a", "bc") apart.
    let mut hasher = Sha256::new();
    hasher.update(driver_name.as_bytes());
    hasher.update([0u8]);
    hasher.update(pod_uid.as_bytes());
    let both_hash = hasher.finalize();
    format!("dra-{}-reg.sock", URL_SAFE_NO_PAD.encode(&both_hash[..16]))
}

fn check_component(what: &'static str, value: &str) -> Result<(), SocketError> {
    let reason = if value.is_empty() {
        "it is empty"
    } else if value.contains('/') {
        "it contains '/'"
    } else if value.contains('\0') {
        "it contains NUL"
    } else if value == "." || value == ".." {
        "it is a relative path component"
    } else {
        return Ok(());
    };
    Err(SocketError::InvalidName {
        what,
        value: value.to_owned(),
        reason,
    })
}

/// Absolute, with `.` components and duplicate or trailing slashes dropped (as Go's
/// `path.Join` would), so that length checks see the path that is actually bound.
fn normalise(dir: &Path) -> Result<PathBuf, SocketError> {
    let absolute = std::path::absolute(dir).map_err(|e| SocketError::io("resolve", dir, e))?;
    Ok(absolute.components().collect())
}

fn check_length(path: &Path) -> Result<(), SocketError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH_BYTES {
        return Err(SocketError::PathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    Ok(())
}

/// A socket file this process bound; removed (if it is still ours) by
/// [`remove`](SocketFile::remove) or on drop.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// (device, inode) right after binding: tells our socket from a successor's at the same
    /// path.
    identity: (u64, u64),
    removed: bool,
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still the one we bound. Returns whether a file was
    /// removed. Calling it again does nothing.
    pub fn remove(&mut self) -> Result<bool, SocketError> {
        if self.removed {
            return Ok(false);
        }
        self.removed = true;
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.identity => {
                match std::fs::remove_file(&self.path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(SocketError::io("remove", &self.path, e)),
                }
            }
            Ok(_) => {
                tracing::info!(path = %self.path.display(), "socket was replaced by another instance; leaving it");
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(SocketError::io("inspect", &self.path, e)),
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(error) = self.remove() {
            tracing::warn!(%error, "could not remove socket");
        }
    }
}

/// Binds a listening unix socket at `path`, replacing a stale socket file left there (but
/// nothing that is not a socket). Must run inside a Tokio runtime.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    check_length(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| SocketError::io("remove stale", path, e))?;
            tracing::info!(path = %path.display(), "removed stale socket");
        }
        Ok(_) => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(SocketError::io("inspect", path, e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| SocketError::io("bind", path, e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| SocketError::io("inspect", path, e))?;
    let file = SocketFile {
        path: path.to_path_buf(),
        identity: (meta.dev(), meta.ino()),
        removed: false,
    };
    Ok((listener, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGISTRY: &str = "/var/lib/kubelet/plugins_registry";
    const UID: &str = "ad4af911-5bcd-47c5-a554-f35cea869472";

    fn path_len(dir: &str, name: &str) -> usize {
        Path::new(dir).join(name).as_os_str().len()
    }

    #[test]
    fn full_uid_is_kept_when_it_fits() {
        let name = rolling_update_registration_file(Path::new(REGISTRY), "dra.example", UID);
        assert_eq!(name, format!("dra.example-{UID}-reg.sock"));
    }

    #[test]
    fn long_driver_name_hashes_the_uid() {
        let driver = "gpu.dra-example-driver.sigs.k8s.io";
        let name = rolling_update_registration_file(Path::new(REGISTRY), driver, UID);
        assert!(name.starts_with(&format!("{driver}-")), "{name}");
        assert!(name.ends_with("-reg.sock"), "{name}");
        assert!(!name.contains(UID), "{name}");
        // 8 bytes of hash are 11 unpadded base64url characters.
        assert_eq!(name.len(), driver.len() + 1 + 11 + "-reg.sock".len());
        assert!(path_len(REGISTRY, &name) <= MAX_SOCKET_PATH_BYTES);
    }

    #[test]
    fn very_long_driver_name_falls_back_to_the_short_form() {
        let driver = "a".repeat(100);
        let name = rolling_update_registration_file(Path::new(REGISTRY), &driver, UID);
        assert!(
            name.starts_with("dra-") && name.ends_with("-reg.sock"),
            "{name}"
        );
        assert!(!name.contains(&driver));
        // 16 bytes of hash are 22 unpadded base64url characters.
        assert_eq!(name.len(), 4 + 22 + 9);
        assert!(path_len(REGISTRY, &name) <= MAX_SOCKET_PATH_BYTES);
    }

    #[test]
    fn boundary_is_the_bindable_length() {
        // A 34-byte driver name: the hashed-UID form is 55 bytes. Pick directories so that the
        // path is exactly at, and one byte over, the limit.
        let driver = format!("{}.example.org", "a".repeat(22));
        let hashed_len = driver.len() + 21;
        let at_limit = format!("/{}", "r".repeat(MAX_SOCKET_PATH_BYTES - hashed_len - 2));
        let name = rolling_update_registration_file(Path::new(&at_limit), &driver, UID);
        assert!(name.starts_with(&format!("{driver}-")), "{name}");
        assert_eq!(path_len(&at_limit, &name), MAX_SOCKET_PATH_BYTES);

        let over = format!("{at_limit}r");
        let name = rolling_update_registration_file(Path::new(&over), &driver, UID);
        assert!(name.starts_with("dra-"), "{name}");
    }

    #[test]
    fn names_are_deterministic_and_distinct() {
        let dir = Path::new("/x").join("y".repeat(60));
        let a = rolling_update_registration_file(&dir, "driver.one", UID);
        assert_eq!(a, rolling_update_registration_file(&dir, "driver.one", UID));
        assert!(a.starts_with("driver.one-") && !a.contains(UID), "{a}");
        let other_uid = "ffffffff-ffff-ffff-ffff-ffffffffffff";
        assert_ne!(
            a,
            rolling_update_registration_file(&dir, "driver.one", other_uid)
        );
        // The short form mixes in the driver name as well: 30-byte names leave no room for
        // the hashed-UID form under this 63-byte directory.
        let (one, two) = (
            format!("{}.one", "d".repeat(26)),
            format!("{}.two", "d".repeat(26)),
        );
        let b = rolling_update_registration_file(&dir, &one, UID);
        let c = rolling_update_registration_file(&dir, &two, UID);
        assert!(b.starts_with("dra-") && c.starts_with("dra-"), "{b} {c}");
        assert_ne!(b, c);
    }

    #[test]
    fn layout_without_rolling_update() {
        let layout = SocketLayout::new(
            "dra.example",
            Path::new("/var/lib/kubelet/plugins/"),
            Path::new("/var/lib/kubelet/./plugins_registry"),
            None,
        )
        .unwrap();
        assert_eq!(
            layout.service_socket,
            Path::new("/var/lib/kubelet/plugins/dra.example/dra.sock")
        );
        assert_eq!(
            layout.registration_socket,
            Path::new("/var/lib/kubelet/plugins_registry/dra.example-reg.sock")
        );
        assert_eq!(
            layout.serialize_lock(),
            Path::new("/var/lib/kubelet/plugins/dra.example/serialize.lock")
        );
        assert!(!layout.rolling_update);
    }

    #[test]
    fn layout_with_rolling_update_is_unique_per_pod() {
        let plugins = Path::new("/var/lib/kubelet/plugins");
        let registry = Path::new(REGISTRY);
        let layout = SocketLayout::new("dra.example", plugins, registry, Some(UID)).unwrap();
        assert_eq!(
            layout.service_socket,
            plugins.join("dra.example").join(format!("dra-{UID}.sock"))
        );
        assert_eq!(
            layout.registration_socket,
            registry.join(format!("dra.example-{UID}-reg.sock"))
        );
        assert!(layout.rolling_update);
        let other = SocketLayout::new("dra.example", plugins, registry, Some("b")).unwrap();
        assert_ne!(other.service_socket, layout.service_socket);
        assert_ne!(other.registration_socket, layout.registration_socket);
        assert_eq!(other.plugin_data_dir, layout.plugin_data_dir);
    }

    #[test]
    fn layout_rejects_unusable_names_and_paths() {
        let dir = Path::new("/tmp");
        for bad in ["", "a/b", "..", "a\0b"] {
            let error = SocketLayout::new(bad, dir, dir, None).unwrap_err();
            assert!(matches!(
                error,
                SocketError::InvalidName {
                    what: "driver name",
                    ..
                }
            ));
        }
        let error = SocketLayout::new("dra.example", dir, dir, Some("x/y")).unwrap_err();
        assert!(matches!(
            error,
            SocketError::InvalidName {
                what: "pod UID",
                ..
            }
        ));

        let deep = Path::new("/").join("d".repeat(100));
        let error = SocketLayout::new("dra.example", &deep, dir, None).unwrap_err();
        assert!(matches!(error, SocketError::PathTooLong { .. }), "{error}");
    }
}
