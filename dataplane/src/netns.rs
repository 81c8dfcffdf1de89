//! Network namespaces: handles that keep a namespace alive and run work inside it.
//!
//! A netlink socket belongs to the namespace of the thread that created it, and `setns`
//! changes only the calling thread. So work inside another namespace runs on a short-lived,
//! dedicated thread: never a pooled thread, which could later run unrelated work in the
//! wrong namespace.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// Errors from opening or entering a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened: the process is gone, or the path is wrong.
    #[error(
        "network namespace {path} cannot be opened (is the process or namespace gone?): {source}"
    )]
    Open {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a network namespace.
    #[error("{path} is not a network namespace")]
    NotNetns {
        /// The path that was opened.
        path: PathBuf,
    },
    /// Entering the namespace failed.
    #[error("cannot enter network namespace {label}: {source}")]
    Enter {
        /// Where the namespace came from.
        label: String,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
    /// The worker thread running inside the namespace panicked.
    #[error("the worker thread inside network namespace {label} panicked")]
    WorkerPanicked {
        /// Where the namespace came from.
        label: String,
    },
}

/// An open network namespace. Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct Netns {
    file: File,
    label: String,
    id: NetnsId,
}

/// The identity of a network namespace (device and inode of its nsfs file).
///
/// Two handles refer to the same namespace exactly when their ids are equal; this is how a
/// new pod sandbox (a new namespace) is told apart from a second container of the same pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId {
    /// Device number of the nsfs file.
    pub dev: u64,
    /// Inode number of the nsfs file.
    pub ino: u64,
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

// From linux/magic.h: the filesystem of /proc/<pid>/ns/* files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

impl Netns {
    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open(Path::new("/proc/thread-self/ns/net"), "current".to_string())
    }

    /// The namespace of a process, through `/proc/<pid>/ns/net`.
    pub fn from_pid(pid: u32) -> Result<Self, NetnsError> {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        Self::open(&path, format!("of pid {pid}"))
    }

    /// A namespace file, such as `/run/netns/NAME` or `/proc/<pid>/ns/net`.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref();
        Self::open(path, path.display().to_string())
    }

    fn open(path: &Path, label: String) -> Result<Self, NetnsError> {
        let open_error = |source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_error)?;
        let stat = nix::sys::statfs::fstatfs(&file)
            .map_err(|errno| open_error(std::io::Error::from(errno)))?;
        // Reject anything but an nsfs file, so a wrong path fails here and not at setns.
        #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
        if stat.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(NetnsError::NotNetns {
                path: path.to_path_buf(),
            });
        }
        let meta = file.metadata().map_err(open_error)?;
        let id = NetnsId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        Ok(Self { file, label, id })
    }

    /// The namespace's identity.
    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// A human-readable description of where the namespace came from, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Runs `work` on a fresh thread that has entered this namespace, and returns its result.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), can_dra_dataplane::netns::NetnsError> {
    /// use can_dra_dataplane::netns::Netns;
    /// let pod = Netns::from_pid(4242)?;
    /// let inside = pod.run(|| Netns::current().map(|ns| ns.id()))?;
    /// assert_eq!(inside.ok(), Some(pod.id()));
    /// # Ok(()) }
    /// ```
    pub fn run<T, F>(&self, work: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                    NetnsError::Enter {
                        label: self.label.clone(),
                        source,
                    }
                })?;
                Ok(work())
            });
            worker.join().unwrap_or_else(|_| {
                Err(NetnsError::WorkerPanicked {
                    label: self.label.clone(),
                })
            })
        })
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
