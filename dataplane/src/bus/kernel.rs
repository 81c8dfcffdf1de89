//! The narrow interface between bus logic and the kernel: the handful of operations a bus
//! needs. [`SystemKernel`](super::system::SystemKernel) implements it over the `link`,
//! `gateway`, `shaping` and `access` modules; unit tests use an in-memory fake.

use std::fmt;

use super::model::{MemberAccess, MemberShaping, NetnsRef};
use crate::netns::NetnsId;

/// `CGW_FLAGS_CAN_ECHO`: the routed frame is also delivered to local sockets on the destination.
pub const FLAG_ECHO: u16 = 0x01;
/// `CGW_FLAGS_CAN_IIF_TX_OK`: route even when the first ingress ifindex equals the destination's.
pub const FLAG_IIF_TX_OK: u16 = 0x04;
/// `CGW_FLAGS_CAN_FD`: the rule carries CAN FD frames only (without it: classic only).
pub const FLAG_FD: u16 = 0x08;

/// What kind of link an interface is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    /// A CAN controller (`can`).
    Can,
    /// A virtual CAN bus (`vcan`).
    Vcan,
    /// One end of a virtual CAN tunnel (`vxcan`).
    Vxcan,
    /// Anything else, with the kernel's kind string (empty when it reports none).
    Other(String),
}

impl LinkKind {
    /// Whether can-gw can route to and from this link (`ARPHRD_CAN`).
    pub fn is_can(&self) -> bool {
        matches!(self, Self::Can | Self::Vcan | Self::Vxcan)
    }
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Can => f.write_str("can"),
            Self::Vcan => f.write_str("vcan"),
            Self::Vxcan => f.write_str("vxcan"),
            Self::Other(kind) if kind.is_empty() => f.write_str("(no kind)"),
            Self::Other(kind) => f.write_str(kind),
        }
    }
}

/// A link in the host namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLink {
    /// Interface name.
    pub name: String,
    /// Interface index in the host namespace.
    pub ifindex: u32,
    /// Link kind.
    pub kind: LinkKind,
    /// Current MTU.
    pub mtu: u32,
    /// Whether the link is administratively up.
    pub up: bool,
}

/// A member's end of its link, seen from inside the member's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    /// Interface index inside the member's namespace.
    pub ifindex: u32,
    /// The ifindex of the peer (in the peer's namespace), when it is a vxcan end.
    pub peer_ifindex: Option<u32>,
    /// Link kind.
    pub kind: LinkKind,
    /// Current MTU.
    pub mtu: u32,
    /// Whether the link is administratively up.
    pub up: bool,
}

/// What to create for one member: a vxcan pair, one end in each namespace, both up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairRequest {
    /// Host end name.
    pub host_name: String,
    /// The member's namespace.
    pub netns: NetnsRef,
    /// Name of the member's end.
    pub pod_name: String,
    /// MTU of both ends.
    pub mtu: u32,
}

/// One can-gw rule of the shape the bus creates: no filter, no modification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    /// Source ifindex.
    pub src: u32,
    /// Destination ifindex.
    pub dst: u32,
    /// `CGW_FLAGS_*`.
    pub flags: u16,
}

/// A can-gw rule found in the kernel, with whatever attributes it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRule {
    /// Source ifindex.
    pub src: u32,
    /// Destination ifindex.
    pub dst: u32,
    /// `CGW_FLAGS_*`.
    pub flags: u16,
    /// Whether the rule carries anything the bus never sets (a filter, modifications,
    /// checksums, a hop limit): such a rule is never one of ours as-is.
    pub extra: bool,
    /// Frames routed.
    pub handled: u64,
    /// Frames dropped (destination down, transmit error).
    pub dropped: u64,
    /// Frames deleted (hop limit reached).
    pub deleted: u64,
    /// The exact rule to delete, when the gateway module can express it (`None` for rules
    /// that modify frames, which only removing an interface gets rid of).
    pub exact: Option<crate::gateway::GwRule>,
}

impl ObservedRule {
    /// The rule as the bus would have created it, or `None` if it carries extras.
    pub fn as_rule(&self) -> Option<Rule> {
        (!self.extra).then_some(Rule {
            src: self.src,
            dst: self.dst,
            flags: self.flags,
        })
    }
}

/// Which end of a member's link a shaping applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum End {
    /// The host end (shapes frames delivered to the member).
    Host {
        /// Host interface name.
        name: String,
    },
    /// The member's end (shapes frames the member sends).
    Pod {
        /// The member's namespace.
        netns: NetnsRef,
        /// Interface name inside it.
        interface: String,
    },
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host { name } => write!(f, "{name}"),
            Self::Pod { netns, interface } => write!(f, "{interface} in {netns}"),
        }
    }
}

/// Frames counted by the access module on a host end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccessCounters {
    /// Frames from the member dropped by listen-only or the transmit allow-list.
    pub transmit_dropped: u64,
    /// Frames to the member dropped by its receive filters.
    pub receive_dropped: u64,
}

/// Why a kernel operation failed, in terms a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelErrorKind {
    /// The object exists already (`EEXIST`).
    Exists,
    /// An interface was not found (`ENODEV`).
    NoDevice,
    /// The caller lacks `CAP_NET_ADMIN` (`EPERM`).
    Permission,
    /// A kernel module is missing (`EAFNOSUPPORT`, `EPROTONOSUPPORT`, or an unknown link kind).
    ModuleMissing(&'static str),
    /// The namespace cannot be opened or entered.
    NamespaceGone,
    /// Anything else.
    Other,
}

/// A failed kernel operation: what was attempted, the class of failure, and the detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{operation}: {detail}")]
pub struct KernelError {
    /// The operation, naming its objects (`adding can-gw rule 4 -> 7`).
    pub operation: String,
    /// The class of failure.
    pub kind: KernelErrorKind,
    /// The underlying error's message.
    pub detail: String,
}

impl KernelError {
    /// A new error.
    pub fn new(
        operation: impl Into<String>,
        kind: KernelErrorKind,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            operation: operation.into(),
            kind,
            detail: detail.into(),
        }
    }
}

/// The kernel operations a bus needs. Host-namespace operations act on the namespace the
/// implementation was opened in.
pub trait Kernel {
    /// The identity of a member's namespace (fails with [`KernelErrorKind::NamespaceGone`]).
    fn namespace_id(&mut self, netns: &NetnsRef) -> Result<NetnsId, KernelError>;
    /// Every link in the host namespace.
    fn host_links(&mut self) -> Result<Vec<HostLink>, KernelError>;
    /// The link called `name` inside a member's namespace, if any.
    fn pod_link(&mut self, netns: &NetnsRef, name: &str) -> Result<Option<PodLink>, KernelError>;
    /// Creates a vxcan pair with the member's end directly in its namespace, both ends up.
    /// Returns the host end.
    fn create_pair(&mut self, request: &PairRequest) -> Result<HostLink, KernelError>;
    /// Deletes a host link (a vxcan pair goes as a whole, and can-gw drops its rules).
    fn delete_link(&mut self, ifindex: u32) -> Result<(), KernelError>;
    /// Every can-gw rule in the host namespace, in kernel order, with counters.
    fn rules(&mut self) -> Result<Vec<ObservedRule>, KernelError>;
    /// Adds one can-gw rule (the kernel does not de-duplicate: callers must check first).
    fn add_rule(&mut self, rule: &Rule) -> Result<(), KernelError>;
    /// Deletes the first can-gw rule with exactly these attributes.
    fn delete_rule(&mut self, rule: &ObservedRule) -> Result<(), KernelError>;
    /// The shaping in place on one end, as far as it can be read back.
    fn shaping(&mut self, end: &End) -> Result<Option<MemberShaping>, KernelError>;
    /// Installs or replaces shaping on one end.
    fn apply_shaping(&mut self, end: &End, shaping: &MemberShaping) -> Result<(), KernelError>;
    /// Removes the driver's shaping from one end (nothing to do is fine).
    fn clear_shaping(&mut self, end: &End) -> Result<(), KernelError>;
    /// The access policy in place on a host end, as far as it can be read back.
    fn access(&mut self, host_name: &str) -> Result<Option<MemberAccess>, KernelError>;
    /// Installs or replaces the access policy on a host end.
    fn apply_access(&mut self, host_name: &str, policy: &MemberAccess) -> Result<(), KernelError>;
    /// Removes the access policy from a host end (nothing to do is fine).
    fn clear_access(&mut self, host_name: &str) -> Result<(), KernelError>;
    /// Drop counters of the access policy on a host end.
    fn access_counters(&mut self, host_name: &str) -> Result<AccessCounters, KernelError>;
}
