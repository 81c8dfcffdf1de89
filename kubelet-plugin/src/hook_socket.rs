//! The channel between the CDI hook and the node daemon.
//!
//! The container runtime runs `can-dra-cdi-hook` as a `createRuntime` hook, with the OCI state
//! of the new container on stdin. The hook cannot do the work itself (it runs in the runtime's
//! context, briefly), so it asks the daemon, over a root-only unix socket, to attach one claim
//! device to the network namespace of the container's process, and waits for the answer.
//!
//! The protocol is one JSON request line and one JSON response line per connection. Every step
//! is bounded in time, and every failure is an error with a message: the hook fails closed, so a
//! container never starts without its bus.
//!
//! A hook that gave up (its time ran out, or the runtime killed it) must not leave a member
//! behind for a container that never runs: the request carries the hook's deadline, and the
//! daemon hands the attacher a [`Requester`] that says whether the hook is still waiting
//! (deadline not passed, connection not closed), checked before the work starts and again
//! before it is committed.
//!
//! Every string of a request comes from outside the daemon (the OCI state, the CDI spec): the
//! claim, pool and device must not hold control characters, and the container id is logged
//! with them escaped, so no input can forge a line of the daemon's log.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::Instrument;

/// The socket's file name inside the daemon's plugin directory.
pub const HOOK_SOCKET_NAME: &str = "hook.sock";

/// How long the hook waits for the daemon to attach a member.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest request or response line accepted (a request is a few hundred bytes).
const MAX_LINE: usize = 64 * 1024;

/// Errors of the hook channel.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The OCI state on stdin is not usable.
    #[error("invalid OCI state on stdin: {0}")]
    InvalidState(String),
    /// The daemon could not be reached.
    #[error(
        "cannot reach the can-dra node daemon at {path}: {source} (is the can-dra kubelet plugin running on this node?)"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the daemon failed.
    #[error("talking to the can-dra node daemon: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon did not answer in time.
    #[error("the can-dra node daemon did not answer within {0:?}")]
    Timeout(Duration),
    /// A message could not be decoded.
    #[error("malformed message on the hook socket: {0}")]
    Malformed(String),
    /// The daemon refused or failed to attach.
    #[error("{0}")]
    Refused(String),
}

/// The part of the OCI runtime state the hook needs (runtime-spec `state.json`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    /// The container id.
    pub id: String,
    /// The container's init process; its network namespace is the pod's.
    pub pid: Option<i64>,
    /// The container's bundle directory.
    #[serde(default)]
    pub bundle: String,
}

impl OciState {
    /// Parses the OCI state and checks the fields the hook relies on.
    ///
    /// ```
    /// use can_dra_kubelet_plugin::hook_socket::OciState;
    /// let state = OciState::parse(br#"{"ociVersion":"1.2.0","id":"c1","status":"creating","pid":4242,"bundle":"/b"}"#)?;
    /// assert_eq!(state.process_id()?, 4242);
    /// # Ok::<(), can_dra_kubelet_plugin::hook_socket::HookError>(())
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<Self, HookError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(HookError::InvalidState(
                "stdin is empty; the hook must be run by an OCI runtime".to_string(),
            ));
        }
        serde_json::from_slice(bytes).map_err(|error| HookError::InvalidState(error.to_string()))
    }

    /// The container process id, which must be a positive number.
    pub fn process_id(&self) -> Result<u32, HookError> {
        match self.pid {
            Some(pid) if pid > 0 => u32::try_from(pid)
                .map_err(|_| HookError::InvalidState(format!("pid {pid} is out of range"))),
            Some(pid) => Err(HookError::InvalidState(format!(
                "pid {pid} is not a process id"
            ))),
            None => Err(HookError::InvalidState(
                "no pid: the hook must run at createRuntime, after the container process exists"
                    .to_string(),
            )),
        }
    }
}

/// What the hook asks the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachRequest {
    /// The claim UID.
    pub claim_uid: String,
    /// The device's pool.
    pub pool: String,
    /// The device name.
    pub device: String,
    /// The container's process id; its network namespace receives the member.
    pub pid: u32,
    /// The container id, for logs.
    pub container_id: String,
    /// When the hook gives up waiting, in milliseconds since the Unix epoch: a request found
    /// past it is refused, and an attach that finishes past it is rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix_ms: Option<u64>,
}

impl AttachRequest {
    /// Refuses a request whose claim, pool or device holds a control character: none of them
    /// can name a prepared device, and they end up in logs and messages.
    pub fn check(&self) -> Result<(), HookError> {
        for (field, value) in [
            ("claimUid", &self.claim_uid),
            ("pool", &self.pool),
            ("device", &self.device),
        ] {
            if value.chars().any(char::is_control) {
                return Err(HookError::Malformed(format!(
                    "{field} {} contains a control character",
                    escape_controls(value)
                )));
            }
        }
        Ok(())
    }
}

/// `value` with every control character escaped (`\n`, `\u{1b}`, ...), for logs and messages.
///
/// ```
/// use can_dra_kubelet_plugin::hook_socket::escape_controls;
/// assert_eq!(escape_controls("ctr-1"), "ctr-1");
/// assert_eq!(escape_controls("a\nb\x1b"), "a\\nb\\u{1b}");
/// ```
pub fn escape_controls(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(value);
    }
    std::borrow::Cow::Owned(
        value
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Milliseconds since the Unix epoch of `at` (0 before it).
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The hook that sent a request, as far as the daemon can tell whether it is still waiting.
#[derive(Debug, Clone, Default)]
pub struct Requester {
    deadline_unix_ms: Option<u64>,
    connection: Option<Arc<OwnedFd>>,
}

impl Requester {
    /// A requester with this deadline whose connection is `connection` (a duplicate of the
    /// daemon's end of the hook's socket).
    pub fn new(deadline_unix_ms: Option<u64>, connection: Option<OwnedFd>) -> Self {
        Self {
            deadline_unix_ms,
            connection: connection.map(Arc::new),
        }
    }

    /// Why the hook is no longer waiting, if it is not: its deadline passed, or it closed its
    /// connection (it exited or was killed). `None` while it waits.
    pub fn gone(&self) -> Option<String> {
        if let Some(deadline) = self.deadline_unix_ms {
            let now = unix_ms(SystemTime::now());
            if now >= deadline {
                return Some(format!(
                    "the hook's deadline passed {} ms ago; it has given up",
                    now - deadline
                ));
            }
        }
        let fd = self.connection.as_ref()?;
        // POLLHUP: the peer closed its end entirely (a hook only half-closes while it waits).
        let mut polled = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::empty(),
        )];
        match nix::poll::poll(&mut polled, nix::poll::PollTimeout::ZERO) {
            Ok(_) => polled[0]
                .revents()
                .filter(|r| {
                    r.intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLERR)
                })
                .map(|_| "the hook closed its connection; it has given up".to_owned()),
            Err(error) => Some(format!("cannot tell whether the hook still waits: {error}")),
        }
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachResponse {
    /// Whether the member is attached in the container's namespace.
    pub attached: bool,
    /// What happened (created, already there, recreated) or what went wrong.
    pub message: String,
}

/// Sends one request to the daemon at `socket` and waits for the answer, at most `timeout`.
pub async fn request_attach(
    socket: &Path,
    request: &AttachRequest,
    timeout: Duration,
) -> Result<AttachResponse, HookError> {
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| HookError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        let (reader, mut writer) = stream.into_split();
        let mut line =
            serde_json::to_vec(request).map_err(|e| HookError::Malformed(e.to_string()))?;
        line.push(b'\n');
        writer.write_all(&line).await?;
        writer.shutdown().await?;
        let answer = read_line(reader).await?;
        serde_json::from_str::<AttachResponse>(&answer)
            .map_err(|error| HookError::Malformed(error.to_string()))
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HookError::Timeout(timeout))??;
    if response.attached {
        Ok(response)
    } else {
        Err(HookError::Refused(response.message))
    }
}

async fn read_line<R: tokio::io::AsyncRead + Unpin>(reader: R) -> Result<String, HookError> {
    let mut reader = BufReader::new(reader.take(MAX_LINE as u64));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if !line.ends_with('\n') {
        return Err(HookError::Malformed(if line.is_empty() {
            "the connection closed without a message".to_string()
        } else {
            format!("a message longer than {MAX_LINE} bytes or not terminated")
        }));
    }
    Ok(line)
}

/// The daemon's side: what to do with an attach request.
pub trait Attacher: Send + Sync + 'static {
    /// Why an attach failed. Its message is the whole answer the hook gets (and hands to the
    /// container runtime), so it names the problem: the container's process or namespace is
    /// gone, the device is not prepared, and so on.
    type Error: std::fmt::Display + Send;

    /// Attaches the device (idempotently) and says what happened, or why it could not. When
    /// `requester` is [gone](Requester::gone) before the attach is committed, nothing of it may
    /// remain.
    fn attach(
        &self,
        request: AttachRequest,
        requester: Requester,
    ) -> impl std::future::Future<Output = Result<String, Self::Error>> + Send;
}

/// Binds the hook socket at `path` (replacing a stale one), readable and writable by root only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    crate::files::remove_if_present(path)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves attach requests on `listener` until `shutdown` resolves. Each connection is handled
/// on its own task; a malformed request gets an error answer and never disturbs the others.
pub async fn serve<A: Attacher>(
    listener: UnixListener,
    attacher: std::sync::Arc<A>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let attacher = attacher.clone();
                    tokio::spawn(async move { answer(stream, attacher).await });
                }
                Err(error) => tracing::warn!(%error, "accepting a hook connection failed"),
            },
        }
    }
}

async fn answer<A: Attacher>(stream: UnixStream, attacher: std::sync::Arc<A>) {
    let connection = match stream.as_fd().try_clone_to_owned() {
        Ok(fd) => Some(fd),
        Err(error) => {
            tracing::warn!(%error, "cannot watch the hook's connection");
            None
        }
    };
    let (reader, mut writer) = stream.into_split();
    let request = read_line(reader).await.and_then(|line| {
        let request = serde_json::from_str::<AttachRequest>(&line)
            .map_err(|error| HookError::Malformed(error.to_string()))?;
        request.check()?;
        Ok(request)
    });
    let response = match request {
        Ok(request) => {
            let span = tracing::info_span!(
                "attach",
                claim = %request.claim_uid,
                device = %request.device,
                pid = request.pid,
                container = %escape_controls(&request.container_id)
            );
            let requester = Requester::new(request.deadline_unix_ms, connection);
            async {
                if let Some(why) = requester.gone() {
                    tracing::warn!(reason = %why, "not attaching for a hook that has given up");
                    return AttachResponse {
                        attached: false,
                        message: why,
                    };
                }
                match attacher.attach(request, requester).await {
                    Ok(message) => {
                        tracing::info!(%message, "attached");
                        AttachResponse {
                            attached: true,
                            message,
                        }
                    }
                    Err(error) => {
                        let message = error.to_string();
                        tracing::warn!(%message, "attach failed");
                        AttachResponse {
                            attached: false,
                            message,
                        }
                    }
                }
            }
            .instrument(span)
            .await
        }
        Err(error) => {
            // The decoder quotes what it could not read (an unknown field's name, say).
            let error = escape_controls(&error.to_string()).into_owned();
            tracing::warn!(%error, "rejected a malformed hook request");
            AttachResponse {
                attached: false,
                message: error,
            }
        }
    };
    if let Ok(mut line) = serde_json::to_vec(&response) {
        line.push(b'\n');
        if let Err(error) = writer.write_all(&line).await {
            tracing::warn!(%error, "the hook went away before the answer");
        }
    }
}
