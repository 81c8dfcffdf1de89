//! The running tunnel endpoint: one raw CAN socket, one UDP socket and a peer set that changes
//! at run time.
//!
//! Two tasks move frames:
//! - **CAN → peers**: read every frame the socket has and group them into MTU-bounded datagrams
//!   to every current peer, when [`crate::batching`] says (by default: at once on an idle link,
//!   one datagram per 1 ms window or per full datagram under load).
//! - **peers → CAN**: accept datagrams only from current peers, decode them (all or nothing),
//!   queue the frames in a bounded queue and write them to the CAN socket.
//!
//! Loop freedom: the CAN socket has `recv_own_msgs` off, so frames this endpoint writes (which
//! came from a peer) are never read back from CAN. Node peers form a full mesh; frames are
//! relayed only to and from external peers ([`relay`] has the table). On a node, the local can-gw
//! mesh does not echo them back either: the
//! frame enters the mesh through the vxcan peer of the endpoint's interface, each gw rule
//! forwards it once into a member, and with `max_hops=1` a forwarded frame is not forwarded
//! again, so nothing returns to the endpoint's interface.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use can_dra_dataplane::netns::{Netns, NetnsError};
use socketcan::frame::{can_frame_default, canfd_frame_default};
use socketcan::tokio::CanFdSocket;
use socketcan::{CanAnyFrame, EmbeddedFrame, Frame as _, SocketOptions};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::batching::{Batcher, Batching, Next};
use crate::codec::{self, CANFD_BRS, CANFD_ESI, Encoder, EncoderError, Frame, RejectReason};
use crate::socket_buffers::{self, Buffer, SocketBuffers};

mod relay;

pub use relay::PeerClass;
use relay::{Origin, Sender};

/// The cannelloni default port, used by [`EndpointConfig::new`] docs and examples.
pub const DEFAULT_PORT: u16 = 20000;

/// How an endpoint is set up. Build with [`EndpointConfig::new`] and adjust fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Where the UDP socket listens; it listens nowhere else. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The CAN interface the endpoint reads and writes (the tunnel end of the bus).
    pub interface: String,
    /// Largest UDP payload sent (1472 fits a 1500-byte IPv4 MTU without fragmentation).
    pub datagram_limit: usize,
    /// When frames read from CAN leave as a datagram ([`Batching::Adaptive`] with a 1 ms window
    /// by default).
    pub batching: Batching,
    /// Most frames read from CAN before a flush, whatever the window says.
    pub max_batch_frames: usize,
    /// Most frames from peers waiting for the CAN socket; more are dropped and counted.
    pub to_can_queue: usize,
    /// Receive buffer asked for on the UDP socket (4 MiB). With CAP_NET_ADMIN it is forced past
    /// `net.core.rmem_max`; without, the kernel caps it there.
    pub udp_receive_buffer: usize,
    /// Send buffer asked for on the UDP socket (1 MiB), the same way (`net.core.wmem_max`).
    pub udp_send_buffer: usize,
    /// Receive buffer asked for on the CAN socket, the same way: it absorbs bursts on the bus
    /// while a batch is being sent (4 MiB).
    pub can_receive_buffer: usize,
}

impl EndpointConfig {
    /// Defaults for a listen address and a CAN interface.
    ///
    /// ```
    /// use can_dra_tunnel::EndpointConfig;
    /// let config = EndpointConfig::new("0.0.0.0:20000".parse().unwrap(), "vxtun0");
    /// assert_eq!(config.datagram_limit, 1472);
    /// ```
    pub fn new(listen: SocketAddr, interface: impl Into<String>) -> Self {
        Self {
            listen,
            interface: interface.into(),
            datagram_limit: 1472,
            batching: Batching::default(),
            max_batch_frames: 512,
            to_can_queue: 4096,
            udp_receive_buffer: 4 << 20,
            udp_send_buffer: 1 << 20,
            can_receive_buffer: 4 << 20,
        }
    }

    fn validate(&self) -> Result<(), EndpointError> {
        let invalid =
            |field: &'static str, reason: String| EndpointError::InvalidConfig { field, reason };
        let name = self.interface.as_bytes();
        if name.is_empty() || name.len() > 15 || name.contains(&b'/') || name.contains(&0) {
            return Err(invalid(
                "interface",
                format!(
                    "{:?} is not an interface name (1-15 bytes, no '/' or NUL)",
                    self.interface
                ),
            ));
        }
        if self.max_batch_frames == 0 {
            return Err(invalid("max_batch_frames", "must be at least 1".into()));
        }
        if self.to_can_queue == 0 {
            return Err(invalid("to_can_queue", "must be at least 1".into()));
        }
        if self.batching.window() > Duration::from_secs(1) {
            return Err(invalid(
                "batching",
                format!(
                    "a window of {:?} is above the 1 s limit",
                    self.batching.window()
                ),
            ));
        }
        Ok(())
    }
}

/// Where the endpoint's sockets are created. `None` means the caller's namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct Namespaces<'a> {
    /// Namespace of the CAN interface.
    pub can: Option<&'a Netns>,
    /// Namespace the UDP socket lives in.
    pub udp: Option<&'a Netns>,
}

impl<'a> Namespaces<'a> {
    /// Both sockets inside `netns`.
    pub fn both(netns: &'a Netns) -> Self {
        Self {
            can: Some(netns),
            udp: Some(netns),
        }
    }
}

/// Errors from starting or stopping an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// A configuration value is out of range.
    #[error("invalid tunnel endpoint setting `{field}`: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The datagram limit is too small.
    #[error("invalid tunnel endpoint setting `datagram_limit`: {0}")]
    DatagramLimit(#[from] EncoderError),
    /// A namespace could not be entered.
    #[error("tunnel endpoint: {0}")]
    Netns(#[from] NetnsError),
    /// The UDP socket could not be bound.
    #[error("tunnel endpoint: binding UDP {addr}: {source}")]
    BindUdp {
        /// The listen address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The CAN interface does not exist (in the namespace where it was looked up).
    #[error("tunnel endpoint: opening a raw CAN socket on {interface}: interface not found")]
    InterfaceNotFound {
        /// The interface name.
        interface: String,
    },
    /// The kernel has no raw CAN sockets.
    #[error(
        "tunnel endpoint: opening a raw CAN socket on {interface}: CAN is not supported \
         (are the `can` and `can-raw` modules loaded?): {source}"
    )]
    CanUnsupported {
        /// The interface name.
        interface: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another failure opening or configuring the CAN socket.
    #[error("tunnel endpoint: opening a raw CAN socket on {interface}: {source}")]
    OpenCan {
        /// The interface name.
        interface: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A socket could not be registered with the tokio runtime.
    #[error("tunnel endpoint: registering the {socket} socket with the runtime: {source}")]
    Register {
        /// "CAN" or "UDP".
        socket: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A forwarding task panicked.
    #[error("tunnel endpoint: the {task} task failed: {detail}")]
    TaskFailed {
        /// Which task.
        task: &'static str,
        /// The join error.
        detail: String,
    },
}

/// Why the endpoint dropped something. Datagram reasons count datagrams, frame reasons frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// A datagram from an address that is not a current peer.
    UnknownSource,
    /// A malformed datagram from a peer.
    Rejected(RejectReason),
    /// An error frame from a peer: it describes the remote controller, not this bus.
    ErrorFrameFromPeer,
    /// An FD frame with the RTR flag from a peer (CAN FD has no remote frames); the rest of its
    /// datagram is delivered.
    FdRemoteFromPeer,
    /// A frame from a peer found the queue towards CAN full.
    ToCanQueueFull,
    /// The CAN socket refused a frame (an FD frame on a Classic-only interface, the interface
    /// down, ...).
    CanWriteFailed,
    /// A datagram could not be sent to a peer (counted once per peer and datagram).
    UdpSendFailed,
}

const FIXED_REASONS: [DropReason; 6] = [
    DropReason::UnknownSource,
    DropReason::ErrorFrameFromPeer,
    DropReason::ToCanQueueFull,
    DropReason::CanWriteFailed,
    DropReason::UdpSendFailed,
    DropReason::FdRemoteFromPeer,
];
const REASON_SLOTS: usize = FIXED_REASONS.len() + RejectReason::ALL.len();

impl DropReason {
    /// Every reason, in a stable order.
    pub fn all() -> impl Iterator<Item = DropReason> {
        FIXED_REASONS
            .into_iter()
            .chain(RejectReason::ALL.into_iter().map(DropReason::Rejected))
    }

    fn slot(self) -> usize {
        match self {
            DropReason::UnknownSource => 0,
            DropReason::ErrorFrameFromPeer => 1,
            DropReason::ToCanQueueFull => 2,
            DropReason::CanWriteFailed => 3,
            DropReason::UdpSendFailed => 4,
            DropReason::FdRemoteFromPeer => 5,
            DropReason::Rejected(reason) => FIXED_REASONS.len() + reason.index(),
        }
    }

    /// A stable snake_case name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownSource => "unknown_source",
            DropReason::Rejected(reason) => reason.as_str(),
            DropReason::ErrorFrameFromPeer => "error_frame_from_peer",
            DropReason::FdRemoteFromPeer => "fd_remote_from_peer",
            DropReason::ToCanQueueFull => "to_can_queue_full",
            DropReason::CanWriteFailed => "can_write_failed",
            DropReason::UdpSendFailed => "udp_send_failed",
        }
    }
}

/// Counters of one peer, as read by [`Endpoint::counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Frames received from the peer and accepted.
    pub frames_in: u64,
    /// Datagrams received from the peer and accepted.
    pub datagrams_in: u64,
    /// Datagrams received from the peer and rejected as malformed.
    pub datagrams_rejected: u64,
    /// Frames sent to the peer.
    pub frames_out: u64,
    /// Datagrams sent to the peer.
    pub datagrams_out: u64,
    /// Datagrams that could not be sent to the peer.
    pub send_failures: u64,
    /// Frames sent to the peer that came from another peer (included in `frames_out`).
    pub relayed_out: u64,
    /// What the peer is: another node's endpoint or an external peer.
    pub class: PeerClass,
}

/// All counters of an endpoint at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Frames read from the CAN interface.
    pub frames_from_can: u64,
    /// Frames written to the CAN interface.
    pub frames_to_can: u64,
    /// Failed reads on the CAN socket (the interface went down or away).
    pub can_read_errors: u64,
    /// Current peers and their counters.
    pub peers: BTreeMap<SocketAddr, PeerCounters>,
    /// Drops by reason; every reason is present, zeros included.
    pub drops: BTreeMap<DropReason, u64>,
}

impl CountersSnapshot {
    /// The count for one drop reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.get(&reason).copied().unwrap_or(0)
    }

    /// Datagrams rejected as malformed, all reasons together.
    pub fn rejected(&self) -> u64 {
        RejectReason::ALL
            .iter()
            .map(|reason| self.dropped(DropReason::Rejected(*reason)))
            .sum()
    }
}

#[derive(Debug, Default)]
struct PeerStats {
    frames_in: AtomicU64,
    datagrams_in: AtomicU64,
    datagrams_rejected: AtomicU64,
    frames_out: AtomicU64,
    datagrams_out: AtomicU64,
    send_failures: AtomicU64,
    relayed_out: AtomicU64,
}

impl PeerStats {
    fn snapshot(&self, class: PeerClass) -> PeerCounters {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PeerCounters {
            frames_in: read(&self.frames_in),
            datagrams_in: read(&self.datagrams_in),
            datagrams_rejected: read(&self.datagrams_rejected),
            frames_out: read(&self.frames_out),
            datagrams_out: read(&self.datagrams_out),
            send_failures: read(&self.send_failures),
            relayed_out: read(&self.relayed_out),
            class,
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// An IPv4 peer reached through an IPv6 socket shows up as `::ffff:a.b.c.d`: compare the
/// plain form so either spelling names the same peer.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddr,
    class: PeerClass,
    stats: Arc<PeerStats>,
}

/// The state both tasks and the handle share: the peer set and the counters.
#[derive(Debug)]
struct Shared {
    /// Copy on write: readers clone the `Arc` and never hold the lock while sending.
    peers: RwLock<Arc<Vec<Peer>>>,
    frames_from_can: AtomicU64,
    frames_to_can: AtomicU64,
    can_read_errors: AtomicU64,
    drops: [AtomicU64; REASON_SLOTS],
}

impl Shared {
    fn new() -> Self {
        Self {
            peers: RwLock::new(Arc::new(Vec::new())),
            frames_from_can: AtomicU64::new(0),
            frames_to_can: AtomicU64::new(0),
            can_read_errors: AtomicU64::new(0),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn peers(&self) -> Arc<Vec<Peer>> {
        Arc::clone(&self.peers.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the peer set with node peers; peers that stay keep their counters.
    fn set_peers(&self, addrs: impl IntoIterator<Item = SocketAddr>) {
        self.set_classified_peers(addrs.into_iter().map(|addr| (addr, PeerClass::Node)));
    }

    /// Replaces the peer set; peers that stay keep their counters (and take the new class). An
    /// address given twice counts once, with its first class.
    fn set_classified_peers(&self, peers: impl IntoIterator<Item = (SocketAddr, PeerClass)>) {
        let mut guard = self.peers.write().unwrap_or_else(PoisonError::into_inner);
        let mut next: Vec<Peer> = Vec::new();
        for (addr, class) in peers {
            let addr = canonical(addr);
            if next.iter().any(|peer| peer.addr == addr) {
                continue;
            }
            let stats = guard
                .iter()
                .find(|peer| peer.addr == addr)
                .map(|peer| Arc::clone(&peer.stats))
                .unwrap_or_default();
            next.push(Peer { addr, class, stats });
        }
        *guard = Arc::new(next);
    }

    /// The peer a datagram from `source` belongs to: the peer with exactly that address, else
    /// the first peer with the same IP (a cannelloni peer may send from another port than the
    /// one it listens on; cannelloni itself checks only the source IP).
    fn peer_for(&self, source: SocketAddr) -> Option<Peer> {
        let source = canonical(source);
        let peers = self.peers();
        peers
            .iter()
            .find(|peer| peer.addr == source)
            .or_else(|| peers.iter().find(|peer| peer.addr.ip() == source.ip()))
            .cloned()
    }

    fn drop_count(&self, reason: DropReason, by: u64) {
        bump(&self.drops[reason.slot()], by);
    }

    /// Admits one datagram: checks the source, decodes it and appends its forwardable frames
    /// to `queue` (bounded by `capacity`). Everything refused is counted. The forwardable frames
    /// stay in `scratch`, to be relayed as coming from the returned origin.
    fn admit(
        &self,
        source: SocketAddr,
        datagram: &[u8],
        scratch: &mut Vec<Frame>,
        queue: &mut VecDeque<Frame>,
        capacity: usize,
    ) -> Option<Origin> {
        scratch.clear();
        let Some(peer) = self.peer_for(source) else {
            self.drop_count(DropReason::UnknownSource, 1);
            tracing::trace!(%source, "datagram from a non-peer dropped");
            return None;
        };
        let header = match codec::decode(datagram, scratch) {
            Ok(header) => header,
            Err(error) => {
                scratch.clear();
                self.drop_count(DropReason::Rejected(error.reason()), 1);
                bump(&peer.stats.datagrams_rejected, 1);
                tracing::debug!(%source, %error, "malformed datagram dropped");
                return None;
            }
        };
        if header.fd_remote_dropped > 0 {
            self.drop_count(
                DropReason::FdRemoteFromPeer,
                u64::from(header.fd_remote_dropped),
            );
            tracing::debug!(%source, frames = header.fd_remote_dropped, "FD remote frames dropped");
        }
        if header.fd_len_rounded > 0 {
            tracing::trace!(%source, frames = header.fd_len_rounded, "FD lengths rounded up");
        }
        bump(&peer.stats.datagrams_in, 1);
        bump(&peer.stats.frames_in, scratch.len() as u64);
        scratch.retain(|frame| {
            if frame.is_error() {
                self.drop_count(DropReason::ErrorFrameFromPeer, 1);
            }
            !frame.is_error()
        });
        for frame in scratch.iter() {
            if queue.len() >= capacity {
                self.drop_count(DropReason::ToCanQueueFull, 1);
            } else {
                queue.push_back(*frame);
            }
        }
        Some(Origin::Peer(peer.addr, peer.class))
    }

    fn snapshot(&self) -> CountersSnapshot {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CountersSnapshot {
            frames_from_can: read(&self.frames_from_can),
            frames_to_can: read(&self.frames_to_can),
            can_read_errors: read(&self.can_read_errors),
            peers: self
                .peers()
                .iter()
                .map(|peer| (peer.addr, peer.stats.snapshot(peer.class)))
                .collect(),
            drops: DropReason::all()
                .map(|reason| (reason, read(&self.drops[reason.slot()])))
                .collect(),
        }
    }
}

/// A running tunnel endpoint. Stop it with [`Endpoint::shutdown`]; dropping it aborts its
/// tasks.
///
/// ```no_run
/// # async fn demo() -> Result<(), can_dra_tunnel::EndpointError> {
/// use can_dra_tunnel::{Endpoint, EndpointConfig, Namespaces};
/// let config = EndpointConfig::new("192.0.2.1:20000".parse().unwrap(), "vxtun0");
/// let endpoint = Endpoint::start(config, Namespaces::default()).await?;
/// endpoint.set_peers(["192.0.2.2:20000".parse().unwrap()]);
/// // ... later
/// endpoint.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Endpoint {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    buffers: SocketBuffers,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Endpoint {
    /// Opens the sockets (each inside its namespace, if given) and starts forwarding. Must be
    /// called inside a tokio runtime. The peer set starts empty.
    pub async fn start(
        config: EndpointConfig,
        namespaces: Namespaces<'_>,
    ) -> Result<Self, EndpointError> {
        config.validate()?;
        let encoder = Encoder::new(config.datagram_limit)?;

        // The socket belongs to the namespace of the thread that creates it; entering the
        // runtime there lets the socket register with this runtime's reactor.
        let runtime = tokio::runtime::Handle::current();
        let (can, can_receive) = in_namespace(namespaces.can, || {
            let _runtime = runtime.enter();
            open_can(&config.interface, config.can_receive_buffer)
        })??;
        let (udp, udp_receive, udp_send) = in_namespace(namespaces.udp, || {
            bind_udp(
                config.listen,
                config.udp_receive_buffer,
                config.udp_send_buffer,
            )
        })??;
        let buffers = SocketBuffers {
            udp_receive,
            udp_send,
            can_receive,
        };
        let udp = UdpSocket::from_std(udp).map_err(|source| EndpointError::Register {
            socket: "UDP",
            source,
        })?;
        let local_addr = udp.local_addr().map_err(|source| EndpointError::BindUdp {
            addr: config.listen,
            source,
        })?;

        let shared = Arc::new(Shared::new());
        let can = Arc::new(can);
        let udp = Arc::new(udp);
        let (stop, stopped) = watch::channel(false);
        let ipv6_socket = local_addr.is_ipv6();
        let outbound = CanToPeers {
            shared: Arc::clone(&shared),
            can: Arc::clone(&can),
            batcher: Batcher::new(config.batching, encoder.limit(), config.max_batch_frames),
            sender: Sender::new(Arc::clone(&udp), encoder.clone(), ipv6_socket),
        };
        let inbound = PeersToCan {
            shared: Arc::clone(&shared),
            can,
            sender: Sender::new(Arc::clone(&udp), encoder, ipv6_socket),
            udp,
            capacity: config.to_can_queue,
        };
        let tasks = vec![
            ("CAN to peers", tokio::spawn(outbound.run(stopped.clone()))),
            ("peers to CAN", tokio::spawn(inbound.run(stopped))),
        ];
        tracing::info!(
            interface = %config.interface,
            %local_addr,
            batching = %config.batching,
            ?buffers,
            "tunnel endpoint started"
        );
        Ok(Self {
            shared,
            local_addr,
            buffers,
            stop,
            tasks,
        })
    }

    /// The address the UDP socket is bound to (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The socket buffers the kernel granted (as it reports them: twice the usable size).
    pub fn socket_buffers(&self) -> SocketBuffers {
        self.buffers
    }

    /// Replaces the peer set with node peers (other can-dra endpoints of the bus). Frames go to
    /// exactly these peers from now on, and datagrams are accepted only from them. Peers that stay
    /// keep their counters; duplicates are ignored.
    pub fn set_peers(&self, peers: impl IntoIterator<Item = SocketAddr>) {
        self.shared.set_peers(peers);
        tracing::debug!(peers = ?self.peers(), "tunnel peers changed");
    }

    /// Replaces the peer set with peers of either class, as [`Endpoint::set_peers`] does; frames
    /// from external peers are relayed to every other peer, frames from node peers to the
    /// external peers (see [`PeerClass`]).
    pub fn set_classified_peers(&self, peers: impl IntoIterator<Item = (SocketAddr, PeerClass)>) {
        self.shared.set_classified_peers(peers);
        tracing::debug!(peers = ?self.peers(), "tunnel peers changed");
    }

    /// The current peers, in the order given to [`Endpoint::set_peers`].
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.shared.peers().iter().map(|peer| peer.addr).collect()
    }

    /// A snapshot of all counters.
    pub fn counters(&self) -> CountersSnapshot {
        self.shared.snapshot()
    }

    /// Stops both tasks and waits for them; frames still queued are discarded.
    pub async fn shutdown(mut self) -> Result<(), EndpointError> {
        // Ignored error: both receivers gone means both tasks already ended.
        let _ = self.stop.send(true);
        let mut result = Ok(());
        for (task, handle) in self.tasks.drain(..) {
            if let Err(error) = handle.await {
                result = Err(EndpointError::TaskFailed {
                    task,
                    detail: error.to_string(),
                });
            }
        }
        tracing::info!(local_addr = %self.local_addr, "tunnel endpoint stopped");
        result
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        for (_, handle) in &self.tasks {
            handle.abort();
        }
    }
}

fn in_namespace<T: Send>(
    netns: Option<&Netns>,
    work: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    match netns {
        Some(netns) => netns.run(work),
        None => Ok(work()),
    }
}

/// The CAN socket and the receive buffer the kernel granted it.
fn open_can(interface: &str, receive_buffer: usize) -> Result<(CanFdSocket, usize), EndpointError> {
    let failed = |source: io::Error| match source.raw_os_error() {
        Some(libc::ENODEV) => EndpointError::InterfaceNotFound {
            interface: interface.to_string(),
        },
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT) => EndpointError::CanUnsupported {
            interface: interface.to_string(),
            source,
        },
        _ => EndpointError::OpenCan {
            interface: interface.to_string(),
            source,
        },
    };
    let socket = CanFdSocket::open(interface).map_err(failed)?;
    // Off is the kernel default; set it anyway because loop freedom depends on it.
    socket.set_recv_own_msgs(false).map_err(failed)?;
    let granted =
        socket_buffers::request(&socket, Buffer::Receive, receive_buffer, "CAN").map_err(failed)?;
    Ok((socket, granted))
}

/// The UDP socket and the receive and send buffers the kernel granted it.
fn bind_udp(
    listen: SocketAddr,
    receive_buffer: usize,
    send_buffer: usize,
) -> Result<(std::net::UdpSocket, usize, usize), EndpointError> {
    let failed = |source| EndpointError::BindUdp {
        addr: listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(listen).map_err(failed)?;
    socket.set_nonblocking(true).map_err(failed)?;
    let options = socket_buffers::Options(&socket);
    let receive = socket_buffers::request(&options, Buffer::Receive, receive_buffer, "UDP")
        .map_err(failed)?;
    let send =
        socket_buffers::request(&options, Buffer::Send, send_buffer, "UDP").map_err(failed)?;
    Ok((socket, receive, send))
}

/// The codec frame for a frame read from the socket, `None` for error frames (not subscribed,
/// so not expected).
fn from_socket(frame: &CanAnyFrame) -> Option<Frame> {
    match frame {
        CanAnyFrame::Normal(data) => Frame::classic(data.id_word(), data.data()).ok(),
        CanAnyFrame::Remote(remote) => {
            Frame::remote(remote.id_word(), u8::try_from(remote.dlc()).ok()?).ok()
        }
        CanAnyFrame::Error(_) => None,
        CanAnyFrame::Fd(fd) => {
            let raw = fd.as_ref();
            let len = usize::from(raw.len).min(raw.data.len());
            // FDF is implied by the FD bit of `len` on the wire; keep the flags that matter.
            Frame::fd(
                raw.can_id,
                raw.flags & (CANFD_BRS | CANFD_ESI),
                &raw.data[..len],
            )
            .ok()
        }
    }
}

/// The socket frame for a codec frame.
fn to_socket(frame: &Frame) -> CanAnyFrame {
    match frame.fd_flags() {
        Some(flags) => {
            let mut raw = canfd_frame_default();
            raw.can_id = frame.can_id();
            raw.len = frame.len();
            raw.flags = flags;
            raw.data[..frame.data().len()].copy_from_slice(frame.data());
            CanAnyFrame::from(raw)
        }
        None => {
            let mut raw = can_frame_default();
            raw.can_id = frame.can_id();
            raw.can_dlc = frame.len();
            raw.data[..frame.data().len()].copy_from_slice(frame.data());
            CanAnyFrame::from(raw)
        }
    }
}

/// The CAN → peers task.
struct CanToPeers {
    shared: Arc<Shared>,
    can: Arc<CanFdSocket>,
    sender: Sender,
    batcher: Batcher,
}

/// Where the pending frames and the datagram being encoded live between reads.
struct Outgoing {
    batch: Vec<Frame>,
    datagram: Vec<u8>,
}

impl CanToPeers {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        let mut out = Outgoing {
            batch: Vec::new(),
            datagram: Vec::with_capacity(self.sender.limit()),
        };
        let mut hold: Option<Instant> = None;
        loop {
            let read = tokio::select! {
                _ = stopped.changed() => return,
                () = tokio::time::sleep_until(hold.unwrap_or_else(Instant::now)), if hold.is_some() => None,
                read = self.can.read_frame() => Some(read),
            };
            let failed = match read {
                // The hold ended: the window closed.
                None => {
                    self.send(&mut out).await;
                    None
                }
                Some(Ok(frame)) => {
                    self.take(&frame, &mut out).await;
                    self.drain(&mut out).await.err()
                }
                Some(Err(error)) => Some(error),
            };
            hold = None;
            if let Some(error) = failed {
                self.send(&mut out).await;
                bump(&self.shared.can_read_errors, 1);
                tracing::warn!(%error, "reading the CAN socket failed; retrying shortly");
                // A vanished or downed interface fails every read: don't spin.
                tokio::select! {
                    _ = stopped.changed() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
            match self.batcher.idle(std::time::Instant::now()) {
                Next::Send => self.send(&mut out).await,
                Next::HoldUntil(deadline) => hold = Some(Instant::from_std(deadline)),
                Next::Read => {}
            }
        }
    }

    /// Adds a frame read from CAN to the batch, sending first or after as the batcher says.
    async fn take(&mut self, frame: &CanAnyFrame, out: &mut Outgoing) {
        bump(&self.shared.frames_from_can, 1);
        let Some(frame) = from_socket(frame) else {
            return;
        };
        let len = frame.encoded_len();
        if self.batcher.sends_before(len) {
            self.send(out).await;
        }
        out.batch.push(frame);
        if self.batcher.push(std::time::Instant::now(), len) == Next::Send {
            self.send(out).await;
        }
    }

    /// Reads without waiting until the socket is empty.
    async fn drain(&mut self, out: &mut Outgoing) -> io::Result<()> {
        loop {
            match self.can.try_read_frame() {
                Ok(frame) => self.take(&frame, out).await,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Sends the pending frames (if any) and tells the batcher.
    async fn send(&mut self, out: &mut Outgoing) {
        if out.batch.is_empty() {
            return;
        }
        let Outgoing { batch, datagram } = out;
        self.flush(batch, datagram).await;
        batch.clear();
        self.batcher.sent(std::time::Instant::now());
    }

    async fn flush(&mut self, batch: &[Frame], datagram: &mut Vec<u8>) {
        self.sender
            .send(&self.shared, Origin::Local, batch, datagram)
            .await;
    }
}

/// The peers → CAN task.
struct PeersToCan {
    shared: Arc<Shared>,
    can: Arc<CanFdSocket>,
    udp: Arc<UdpSocket>,
    /// Relays what peers send to the peers it is for.
    sender: Sender,
    capacity: usize,
}

/// How long to wait before retrying a CAN write the device queue refused (ENOBUFS).
const CAN_RETRY: Duration = Duration::from_millis(1);

impl PeersToCan {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        // The largest UDP payload: a datagram is never cut short.
        let mut buffer = vec![0u8; 65_536];
        let mut scratch = Vec::new();
        let mut relayed = Vec::with_capacity(self.sender.limit());
        let mut queue: VecDeque<Frame> = VecDeque::new();
        let mut retry_at: Option<Instant> = None;
        loop {
            let waiting = retry_at.is_some() && !queue.is_empty();
            let retry_deadline = retry_at.unwrap_or_else(Instant::now);
            tokio::select! {
                biased;
                _ = stopped.changed() => return,
                received = self.udp.recv_from(&mut buffer) => match received {
                    Ok((len, source)) => {
                        let datagram = buffer.get(..len).unwrap_or_default();
                        let origin = self.shared.admit(
                            source, datagram, &mut scratch, &mut queue, self.capacity,
                        );
                        if let Some(origin) = origin
                            && !scratch.is_empty()
                        {
                            self.sender.send(&self.shared, origin, &scratch, &mut relayed).await;
                        }
                    }
                    Err(error) => {
                        // ICMP errors and the like: nothing to do but log and carry on.
                        tracing::debug!(%error, "receiving a datagram failed");
                    }
                },
                () = tokio::time::sleep_until(retry_deadline), if waiting => retry_at = None,
            }
            if retry_at.is_none() {
                retry_at = self.write_queued(&mut queue);
            }
        }
    }

    /// Writes queued frames until the queue is empty or the device pushes back; returns when
    /// to retry in the latter case.
    fn write_queued(&self, queue: &mut VecDeque<Frame>) -> Option<Instant> {
        while let Some(frame) = queue.front() {
            match self.can.try_write_frame(&to_socket(frame)) {
                Ok(()) => {
                    bump(&self.shared.frames_to_can, 1);
                    queue.pop_front();
                }
                Err(error)
                    if error.kind() == io::ErrorKind::WouldBlock
                        || error.raw_os_error() == Some(libc::ENOBUFS) =>
                {
                    return Some(Instant::now() + CAN_RETRY);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.shared.drop_count(DropReason::CanWriteFailed, 1);
                    tracing::debug!(%error, can_id = frame.can_id(), "writing a frame to CAN failed");
                    queue.pop_front();
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CAN_ERR_FLAG;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn datagram(frames: &[Frame]) -> Vec<u8> {
        Encoder::new(1472).unwrap().encode_all(frames).remove(0)
    }

    #[test]
    fn datagrams_from_non_peers_are_dropped_and_counted() {
        let shared = Shared::new();
        shared.set_peers([addr("192.0.2.2:20000")]);
        let mut queue = VecDeque::new();
        let bytes = datagram(&[Frame::classic(1, &[1]).unwrap()]);
        shared.admit(
            addr("192.0.2.9:20000"),
            &bytes,
            &mut Vec::new(),
            &mut queue,
            10,
        );
        assert!(queue.is_empty());
        let counters = shared.snapshot();
        assert_eq!(counters.dropped(DropReason::UnknownSource), 1);
        assert_eq!(
            counters.peers[&addr("192.0.2.2:20000")],
            PeerCounters::default()
        );
    }

    #[test]
    fn datagrams_from_peers_are_queued_and_counted_per_peer() {
        let shared = Shared::new();
        shared.set_peers([addr("192.0.2.2:20000"), addr("192.0.2.3:20000")]);
        let mut queue = VecDeque::new();
        let frames = [
            Frame::classic(1, &[1]).unwrap(),
            Frame::fd(2, 0, &[2; 12]).unwrap(),
        ];
        shared.admit(
            addr("192.0.2.3:20000"),
            &datagram(&frames),
            &mut Vec::new(),
            &mut queue,
            10,
        );
        assert_eq!(queue.iter().copied().collect::<Vec<_>>(), frames.to_vec());
        let counters = shared.snapshot();
        let peer = counters.peers[&addr("192.0.2.3:20000")];
        assert_eq!((peer.datagrams_in, peer.frames_in), (1, 2));
        assert_eq!(counters.peers[&addr("192.0.2.2:20000")].frames_in, 0);
    }

    #[test]
    fn a_peer_sending_from_another_port_is_matched_by_ip() {
        let shared = Shared::new();
        shared.set_peers([addr("192.0.2.2:20000")]);
        let mut queue = VecDeque::new();
        let bytes = datagram(&[Frame::classic(1, &[]).unwrap()]);
        shared.admit(
            addr("192.0.2.2:40000"),
            &bytes,
            &mut Vec::new(),
            &mut queue,
            10,
        );
        assert_eq!(queue.len(), 1);
        // And an IPv4-mapped source on a dual-stack socket is the same peer.
        shared.admit(
            addr("[::ffff:192.0.2.2]:20000"),
            &bytes,
            &mut Vec::new(),
            &mut queue,
            10,
        );
        assert_eq!(queue.len(), 2);
        assert_eq!(
            shared.snapshot().peers[&addr("192.0.2.2:20000")].datagrams_in,
            2
        );
    }

    #[test]
    fn exact_address_wins_over_a_shared_ip() {
        let shared = Shared::new();
        shared.set_peers([addr("192.0.2.2:20000"), addr("192.0.2.2:20001")]);
        let bytes = datagram(&[Frame::classic(1, &[]).unwrap()]);
        shared.admit(
            addr("192.0.2.2:20001"),
            &bytes,
            &mut Vec::new(),
            &mut VecDeque::new(),
            10,
        );
        let counters = shared.snapshot();
        assert_eq!(counters.peers[&addr("192.0.2.2:20001")].datagrams_in, 1);
        assert_eq!(counters.peers[&addr("192.0.2.2:20000")].datagrams_in, 0);
    }

    #[test]
    fn removed_peers_are_refused_and_kept_peers_keep_their_counters() {
        let shared = Shared::new();
        let (a, b, c) = (
            addr("192.0.2.2:1"),
            addr("192.0.2.3:1"),
            addr("192.0.2.4:1"),
        );
        shared.set_peers([a, b]);
        let bytes = datagram(&[Frame::classic(1, &[]).unwrap()]);
        let mut queue = VecDeque::new();
        shared.admit(a, &bytes, &mut Vec::new(), &mut queue, 10);
        shared.admit(b, &bytes, &mut Vec::new(), &mut queue, 10);
        shared.set_peers([a, c, a]);
        let counters = shared.snapshot();
        assert_eq!(
            counters.peers.keys().copied().collect::<Vec<_>>(),
            vec![a, c]
        );
        assert_eq!(counters.peers[&a].datagrams_in, 1);
        shared.admit(b, &bytes, &mut Vec::new(), &mut queue, 10);
        assert_eq!(shared.snapshot().dropped(DropReason::UnknownSource), 1);
        // Re-adding b starts it from zero.
        shared.set_peers([b]);
        assert_eq!(shared.snapshot().peers[&b], PeerCounters::default());
    }

    #[test]
    fn malformed_datagrams_are_counted_by_reason_and_queue_nothing() {
        let shared = Shared::new();
        let peer = addr("192.0.2.2:20000");
        shared.set_peers([peer]);
        let mut queue = VecDeque::new();
        for bytes in [
            &[3u8, 0, 0, 0, 0][..],
            &[2, 0, 0, 0, 5],
            &[2, 0, 0, 0, 1, 0, 0, 0, 1, 12],
        ] {
            shared.admit(peer, bytes, &mut Vec::new(), &mut queue, 10);
        }
        assert!(queue.is_empty());
        let counters = shared.snapshot();
        assert_eq!(
            counters.dropped(DropReason::Rejected(RejectReason::WrongVersion)),
            1
        );
        assert_eq!(
            counters.dropped(DropReason::Rejected(RejectReason::CountBeyondPayload)),
            1
        );
        assert_eq!(
            counters.dropped(DropReason::Rejected(RejectReason::OversizedLength)),
            1
        );
        assert_eq!(counters.rejected(), 3);
        assert_eq!(counters.peers[&peer].datagrams_rejected, 3);
    }

    #[test]
    fn an_fd_remote_frame_costs_only_itself_and_is_counted() {
        let shared = Shared::new();
        let peer = addr("192.0.2.2:20000");
        shared.set_peers([peer]);
        let mut queue = VecDeque::new();
        // Classic 0x123, FD 0x100 with RTR, Classic 0x124.
        let bytes = [
            2u8, 0, 0, 0, 3, 0, 0, 1, 0x23, 1, 0xaa, 0x40, 0, 1, 0, 0x80, 0, 0, 0, 1, 0x24, 0,
        ];
        shared.admit(peer, &bytes, &mut Vec::new(), &mut queue, 10);
        let ids: Vec<u32> = queue.iter().map(Frame::id).collect();
        assert_eq!(ids, [0x123, 0x124]);
        let counters = shared.snapshot();
        assert_eq!(counters.dropped(DropReason::FdRemoteFromPeer), 1);
        assert_eq!(counters.rejected(), 0);
        assert_eq!(counters.peers[&peer].frames_in, 2);
        assert_eq!(counters.peers[&peer].datagrams_in, 1);
    }

    #[test]
    fn the_queue_towards_can_is_bounded() {
        let shared = Shared::new();
        let peer = addr("192.0.2.2:20000");
        shared.set_peers([peer]);
        let frames: Vec<Frame> = (0..10).map(|i| Frame::classic(i, &[]).unwrap()).collect();
        let mut queue = VecDeque::new();
        shared.admit(peer, &datagram(&frames), &mut Vec::new(), &mut queue, 4);
        assert_eq!(queue.len(), 4);
        assert_eq!(queue[3].id(), 3, "the oldest frames are kept, in order");
        assert_eq!(shared.snapshot().dropped(DropReason::ToCanQueueFull), 6);
    }

    #[test]
    fn error_frames_from_peers_are_not_put_on_the_bus() {
        let shared = Shared::new();
        let peer = addr("192.0.2.2:20000");
        shared.set_peers([peer]);
        let frames = [
            Frame::classic(CAN_ERR_FLAG | 4, &[0; 8]).unwrap(),
            Frame::classic(5, &[]).unwrap(),
        ];
        let mut queue = VecDeque::new();
        shared.admit(peer, &datagram(&frames), &mut Vec::new(), &mut queue, 10);
        assert_eq!(queue.len(), 1);
        assert_eq!(shared.snapshot().dropped(DropReason::ErrorFrameFromPeer), 1);
    }

    #[test]
    fn socket_frames_convert_both_ways() {
        let frames = [
            Frame::classic(0x123, &[1, 2, 3]).unwrap(),
            Frame::classic(codec::CAN_EFF_FLAG | 0x1234_5678, &[9; 8]).unwrap(),
            Frame::remote(0x7ff, 4).unwrap(),
            Frame::fd(0x42, CANFD_BRS, &[7; 64]).unwrap(),
        ];
        for frame in frames {
            let socket_frame = to_socket(&frame);
            assert_eq!(socket_frame.is_remote_frame(), frame.is_remote());
            assert_eq!(from_socket(&socket_frame), Some(frame));
        }
        let error = to_socket(&Frame::classic(CAN_ERR_FLAG | 4, &[0; 8]).unwrap());
        assert_eq!(from_socket(&error), None);
    }

    #[test]
    fn config_validation_names_the_field() {
        let mut config = EndpointConfig::new(addr("127.0.0.1:0"), "a-name-longer-than-15");
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("`interface`")
        );
        config.interface = "vxtun0".into();
        config.to_can_queue = 0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("`to_can_queue`")
        );
        config.to_can_queue = 1;
        config.batching = Batching::Fixed {
            window: Duration::from_secs(2),
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("`batching`")
        );
    }

    #[tokio::test]
    async fn start_reports_a_missing_interface_or_missing_can_support() {
        let config = EndpointConfig::new(addr("127.0.0.1:0"), "nosuchcan0");
        let error = Endpoint::start(config, Namespaces::default())
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                EndpointError::InterfaceNotFound { .. } | EndpointError::CanUnsupported { .. }
            ),
            "{error}"
        );
    }
}
