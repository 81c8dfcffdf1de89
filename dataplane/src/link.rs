//! CAN links: vxcan member pairs, link utilities, CAN controller discovery and monitoring.
//!
//! - [`Links`] is a handle on the links of one network namespace. It creates vxcan pairs
//!   whose peer is born directly inside another namespace (so no can-gw rule is ever lost to
//!   a namespace move), looks links up, lists, deletes, sets them up or down and sets their MTU,
//!   and enumerates CAN-capable links as [`CanController`]s.
//! - [`LinkMonitor`] follows `RTNLGRP_LINK` notifications and turns them into
//!   [`LinkEvent`]s for CAN links (added, changed, removed).
//!
//! Messages are built by hand: the typed `IFLA_CAN` attributes numbered 11 and above are wrong
//! in `netlink-packet-route`, and a raw encoding keeps the vxcan peer layout (an `ifinfomsg`
//! followed by attributes) explicit and testable byte by byte.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

use crate::netlink::{
    AttributeBuffer, NLM_F_CREATE, NLM_F_EXCL, NetlinkError, RouteSocket, attributes, read_i32,
    read_u16, read_u32,
};
use crate::netns::{Netns, NetnsError};

/// `RTM_NEWLINK`: create or change a link (also the type of link notifications).
pub const RTM_NEWLINK: u16 = 16;
/// `RTM_DELLINK`: delete a link (also the type of removal notifications).
pub const RTM_DELLINK: u16 = 17;
/// `RTM_GETLINK`: get one link, or dump all of them.
pub const RTM_GETLINK: u16 = 18;

const IFINFOMSG_LEN: usize = 16;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINK: u16 = 5;
const IFLA_OPERSTATE: u16 = 16;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VXCAN_INFO_PEER: u16 = 1;
const IFF_UP: u32 = 0x1;

const IFLA_CAN_BITTIMING: u16 = 1;
const IFLA_CAN_CLOCK: u16 = 3;
const IFLA_CAN_STATE: u16 = 4;
const IFLA_CAN_CTRLMODE: u16 = 5;
const IFLA_CAN_RESTART_MS: u16 = 6;
const IFLA_CAN_BERR_COUNTER: u16 = 8;
const IFLA_CAN_DATA_BITTIMING: u16 = 9;
/// `CAN_CTRLMODE_FD` in `can_ctrlmode.flags`.
pub const CAN_CTRLMODE_FD: u32 = 0x20;
/// `CAN_CTRLMODE_LISTENONLY` in `can_ctrlmode.flags`.
pub const CAN_CTRLMODE_LISTENONLY: u32 = 0x02;

/// `RTMGRP_LINK`: the legacy group bit for `RTNLGRP_LINK` (group 1).
const RTMGRP_LINK: u32 = 1;
/// `IFNAMSIZ - 1`: the longest interface name the kernel accepts.
pub const MAX_NAME_LEN: usize = 15;

/// Errors from link operations. Each message names the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The interface name would be rejected (or rewritten) by the kernel.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// The request is inconsistent; nothing was sent to the kernel.
    #[error("invalid request for {operation}: {reason}")]
    InvalidRequest {
        /// What was attempted.
        operation: String,
        /// Why it cannot work.
        reason: String,
    },
    /// A link with this name already exists (`EEXIST`); the existing link was not touched.
    #[error("{operation}: link {name} already exists in {namespace} (EEXIST)")]
    Exists {
        /// What was attempted.
        operation: String,
        /// The name that is taken.
        name: String,
        /// Where it is taken.
        namespace: String,
    },
    /// A pinned interface index is already used in that namespace.
    #[error("{operation}: interface index {index} is already in use in {namespace}")]
    IndexInUse {
        /// What was attempted.
        operation: String,
        /// The index that is taken.
        index: u32,
        /// Where it is taken.
        namespace: String,
    },
    /// The kernel assigned another index than the one pinned.
    #[error("{operation}: asked for index {requested} on {name}, the kernel assigned {assigned}")]
    IndexNotHonoured {
        /// What was attempted.
        operation: String,
        /// The link concerned.
        name: String,
        /// The index asked for.
        requested: u32,
        /// The index the kernel chose.
        assigned: u32,
    },
    /// The link does not exist (`ENODEV`).
    #[error("{operation}: interface not found in {namespace} (ENODEV)")]
    NotFound {
        /// What was attempted.
        operation: String,
        /// The namespace searched.
        namespace: String,
    },
    /// The caller lacks `CAP_NET_ADMIN` in the namespace (`EPERM`).
    #[error("{operation}: permission denied, CAP_NET_ADMIN is needed ({errno})")]
    PermissionDenied {
        /// What was attempted.
        operation: String,
        /// `EPERM` or `EACCES`.
        errno: Errno,
    },
    /// The link kind is unknown to the kernel: its module is not loaded or not built.
    #[error("{operation}: kernel module {module} is missing ({errno})")]
    ModuleMissing {
        /// What was attempted.
        operation: String,
        /// The module to load (`modprobe NAME`).
        module: &'static str,
        /// The errno the kernel returned.
        errno: Errno,
    },
    /// The link is busy (`EBUSY`), e.g. an MTU change while it is up.
    #[error("{operation}: device busy (EBUSY); take the link down first")]
    Busy {
        /// What was attempted.
        operation: String,
    },
    /// Any other kernel or transport error.
    #[error("{operation}: {source}")]
    Netlink {
        /// What was attempted.
        operation: String,
        /// The underlying error.
        #[source]
        source: NetlinkError,
    },
    /// A namespace could not be opened or entered.
    #[error(transparent)]
    Namespace(#[from] NetnsError),
    /// The kernel answered something this module cannot read.
    #[error("{operation}: malformed link message: {detail}")]
    Malformed {
        /// What was attempted.
        operation: String,
        /// What was wrong.
        detail: String,
    },
}

impl LinkError {
    /// Turns a netlink failure into a variant a caller can act on; `subject` names the link
    /// the operation was about.
    fn from_netlink(
        operation: String,
        subject: &str,
        namespace: &str,
        source: NetlinkError,
    ) -> Self {
        match source.errno() {
            Some(Errno::EEXIST) => Self::Exists {
                operation,
                name: subject.to_string(),
                namespace: namespace.to_string(),
            },
            Some(Errno::ENODEV) => Self::NotFound {
                operation,
                namespace: namespace.to_string(),
            },
            Some(errno @ (Errno::EPERM | Errno::EACCES)) => {
                Self::PermissionDenied { operation, errno }
            }
            Some(Errno::EBUSY) => Self::Busy { operation },
            _ => Self::Netlink { operation, source },
        }
    }
}

/// Checks a name the way the kernel's `dev_valid_name` does, and also refuses `%`, which the
/// kernel would expand into a number (`vxcan%d`) instead of using the name as given.
///
/// ```
/// use can_dra_dataplane::link::validate_name;
/// assert!(validate_name("can0").is_ok());
/// assert!(validate_name("a-name-of-16-byt").is_err());
/// assert!(validate_name("a/b").is_err());
/// ```
pub fn validate_name(name: &str) -> Result<(), LinkError> {
    match name_problem(name) {
        Some(reason) => Err(LinkError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// What [`validate_name`] finds wrong with `name`, if anything: the one rule for link names in
/// the data plane.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains(':') {
        Some("contains ':'")
    } else if name.contains('%') {
        Some("contains '%'")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains whitespace or a control character")
    } else {
        None
    }
}

/// The MTU of a CAN member: it decides which frames the link carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CanMtu {
    /// 16 bytes (`CAN_MTU`): Classic CAN frames only.
    Classic,
    /// 72 bytes (`CANFD_MTU`): Classic and CAN FD frames.
    Fd,
}

impl CanMtu {
    /// The MTU in bytes.
    pub const fn bytes(self) -> u32 {
        match self {
            Self::Classic => 16,
            Self::Fd => 72,
        }
    }
}

/// What to create: a vxcan pair with a host end and a peer end in another namespace.
///
/// ```
/// use can_dra_dataplane::link::{CanMtu, VxcanSpec};
/// let spec = VxcanSpec::new("cdra-a1b2", "can0", CanMtu::Fd).with_indexes(1000, 1000);
/// assert_eq!(spec.peer_index, Some(1000));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxcanSpec {
    /// Name of the end that stays in the socket's namespace.
    pub host_name: String,
    /// Name of the end created inside the peer namespace (e.g. `can0`).
    pub peer_name: String,
    /// MTU of both ends.
    pub mtu: CanMtu,
    /// Pinned ifindex of the host end, if any.
    pub host_index: Option<u32>,
    /// Pinned ifindex of the peer end. The kernel honours it only when `host_index` is also
    /// set, so [`Links::create_vxcan`] refuses a peer index without a host index.
    pub peer_index: Option<u32>,
}

impl VxcanSpec {
    /// A pair with kernel-chosen indexes.
    pub fn new(host_name: impl Into<String>, peer_name: impl Into<String>, mtu: CanMtu) -> Self {
        Self {
            host_name: host_name.into(),
            peer_name: peer_name.into(),
            mtu,
            host_index: None,
            peer_index: None,
        }
    }

    /// Pins both ifindexes (each in its own namespace).
    pub fn with_indexes(mut self, host_index: u32, peer_index: u32) -> Self {
        self.host_index = Some(host_index);
        self.peer_index = Some(peer_index);
        self
    }

    fn describe(&self, peer_namespace: &str) -> String {
        format!(
            "creating vxcan pair {} <-> {} (in {peer_namespace})",
            self.host_name, self.peer_name
        )
    }

    fn validate(&self, operation: &str) -> Result<(), LinkError> {
        validate_name(&self.host_name)?;
        validate_name(&self.peer_name)?;
        let invalid = |reason: &str| LinkError::InvalidRequest {
            operation: operation.to_string(),
            reason: reason.to_string(),
        };
        for index in [self.host_index, self.peer_index].into_iter().flatten() {
            if index == 0 || i32::try_from(index).is_err() {
                return Err(invalid("an interface index must be in 1..=2147483647"));
            }
        }
        if self.peer_index.is_some() && self.host_index.is_none() {
            return Err(invalid(
                "the kernel ignores a pinned peer index unless the host index is pinned too",
            ));
        }
        Ok(())
    }
}

/// A link's name and index in its own namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LinkRef {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
}

/// A created vxcan pair, both ends up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxcanPair {
    /// The end in the namespace of the [`Links`] handle that created it.
    pub host: LinkRef,
    /// The end inside the peer namespace.
    pub peer: LinkRef,
    /// MTU of both ends.
    pub mtu: CanMtu,
}

/// `IFLA_OPERSTATE` (RFC 2863 operational state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OperState {
    /// `IF_OPER_UNKNOWN` (virtual links that do not track carrier often report this).
    Unknown,
    /// `IF_OPER_NOTPRESENT`.
    NotPresent,
    /// `IF_OPER_DOWN`.
    Down,
    /// `IF_OPER_LOWERLAYERDOWN` (e.g. a vxcan end whose peer is down).
    LowerLayerDown,
    /// `IF_OPER_TESTING`.
    Testing,
    /// `IF_OPER_DORMANT`.
    Dormant,
    /// `IF_OPER_UP`.
    Up,
    /// A value this module does not know.
    Other(u8),
}

impl From<u8> for OperState {
    fn from(value: u8) -> Self {
        match value {
            0 => Self::Unknown,
            1 => Self::NotPresent,
            2 => Self::Down,
            3 => Self::LowerLayerDown,
            4 => Self::Testing,
            5 => Self::Dormant,
            6 => Self::Up,
            other => Self::Other(other),
        }
    }
}

/// One link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// `IFLA_INFO_KIND` (e.g. `vxcan`, `vcan`, `can`); `None` for links without one.
    pub kind: Option<String>,
    /// MTU in bytes.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// The `ifi_flags` word.
    pub flags: u32,
    /// Operational state.
    pub operstate: OperState,
    /// `IFLA_LINK`: for a vxcan end, the peer's ifindex (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// `IFLA_LINK_NETNSID`: set when the peer lives in another namespace.
    pub link_netnsid: Option<i32>,
    /// The `IFLA_CAN_*` attributes of a `can` link.
    pub can: Option<CanAttributes>,
}

/// Kinds of CAN-capable links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CanKind {
    /// A CAN controller driven by a kernel driver (`can`).
    Can,
    /// A virtual CAN bus (`vcan`).
    Vcan,
    /// One end of a virtual CAN tunnel (`vxcan`).
    Vxcan,
}

impl CanKind {
    /// Maps an `IFLA_INFO_KIND` string to a CAN kind.
    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "can" => Some(Self::Can),
            "vcan" => Some(Self::Vcan),
            "vxcan" => Some(Self::Vxcan),
            _ => None,
        }
    }

    /// The `IFLA_INFO_KIND` string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Can => "can",
            Self::Vcan => "vcan",
            Self::Vxcan => "vxcan",
        }
    }

    /// True for `vcan` and `vxcan`.
    pub const fn is_virtual(self) -> bool {
        !matches!(self, Self::Can)
    }
}

/// `IFLA_CAN_STATE`: the controller's error state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CanState {
    /// `CAN_STATE_ERROR_ACTIVE`: normal operation.
    ErrorActive,
    /// `CAN_STATE_ERROR_WARNING`: an error counter passed 96.
    ErrorWarning,
    /// `CAN_STATE_ERROR_PASSIVE`: an error counter passed 127.
    ErrorPassive,
    /// `CAN_STATE_BUS_OFF`: the controller left the bus.
    BusOff,
    /// `CAN_STATE_STOPPED`: the device is down.
    Stopped,
    /// `CAN_STATE_SLEEPING`.
    Sleeping,
    /// A value this module does not know.
    Other(u32),
}

impl CanState {
    /// The name of a state that is not known: a value this module does not know, or a link
    /// that reports no state at all (`vcan`, `vxcan`).
    pub const UNKNOWN: &'static str = "unknown";

    /// Maps the kernel's `enum can_state`.
    pub fn from_raw(value: u32) -> Self {
        match value {
            0 => Self::ErrorActive,
            1 => Self::ErrorWarning,
            2 => Self::ErrorPassive,
            3 => Self::BusOff,
            4 => Self::Stopped,
            5 => Self::Sleeping,
            other => Self::Other(other),
        }
    }

    /// A stable lower-case name (`error-active`, `bus-off`, ...) for attributes and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ErrorActive => "error-active",
            Self::ErrorWarning => "error-warning",
            Self::ErrorPassive => "error-passive",
            Self::BusOff => "bus-off",
            Self::Stopped => "stopped",
            Self::Sleeping => "sleeping",
            Self::Other(_) => Self::UNKNOWN,
        }
    }
}

/// `struct can_bittiming`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CanBitTiming {
    /// Bit rate in bit/s.
    pub bitrate: u32,
    /// Sample point in tenths of a percent (875 = 87.5 %).
    pub sample_point: u32,
    /// Time quantum in ns.
    pub tq: u32,
    /// Propagation segment in tq.
    pub prop_seg: u32,
    /// Phase buffer segment 1 in tq.
    pub phase_seg1: u32,
    /// Phase buffer segment 2 in tq.
    pub phase_seg2: u32,
    /// Synchronisation jump width in tq.
    pub sjw: u32,
    /// Bit-rate prescaler.
    pub brp: u32,
}

impl CanBitTiming {
    fn parse(payload: &[u8]) -> Option<Self> {
        let field = |i: usize| read_u32(payload, i * 4).ok();
        Some(Self {
            bitrate: field(0)?,
            sample_point: field(1)?,
            tq: field(2)?,
            prop_seg: field(3)?,
            phase_seg1: field(4)?,
            phase_seg2: field(5)?,
            sjw: field(6)?,
            brp: field(7)?,
        })
    }
}

/// `struct can_ctrlmode`: which modes are changed (`mask`) and which are on (`flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CanCtrlMode {
    /// Modes the message speaks about.
    pub mask: u32,
    /// Modes that are on (`CAN_CTRLMODE_*`).
    pub flags: u32,
}

/// The `IFLA_CAN_*` attributes of a `can` link, parsed raw (see the module docs for why).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CanAttributes {
    /// Nominal (arbitration) bit timing.
    pub bittiming: Option<CanBitTiming>,
    /// CAN FD data-phase bit timing.
    pub data_bittiming: Option<CanBitTiming>,
    /// Controller error state.
    pub state: Option<CanState>,
    /// Control modes.
    pub ctrlmode: Option<CanCtrlMode>,
    /// Automatic restart delay after bus-off, in ms (0 = off).
    pub restart_ms: Option<u32>,
    /// Controller clock in Hz.
    pub clock_hz: Option<u32>,
    /// Transmit and receive error counters.
    pub berr_counter: Option<(u16, u16)>,
}

/// Parses the payload of `IFLA_INFO_DATA` of a `can` link. Attributes it does not know are
/// skipped; one that is too short is skipped with a warning, so a newer or odd kernel never
/// makes discovery fail.
///
/// ```
/// use can_dra_dataplane::link::{CanState, parse_can_attributes};
/// let mut data = Vec::new();
/// data.extend_from_slice(&[8, 0, 4, 0]); // IFLA_CAN_STATE, 4-byte payload
/// data.extend_from_slice(&3u32.to_ne_bytes()); // CAN_STATE_BUS_OFF
/// assert_eq!(parse_can_attributes(&data).state, Some(CanState::BusOff));
/// ```
pub fn parse_can_attributes(data: &[u8]) -> CanAttributes {
    let mut parsed = CanAttributes::default();
    for attribute in attributes(data) {
        let (kind, payload) = match attribute {
            Ok(attribute) => attribute,
            Err(error) => {
                tracing::warn!(%error, "truncated IFLA_CAN attribute list");
                break;
            }
        };
        let known = match kind {
            IFLA_CAN_BITTIMING => CanBitTiming::parse(payload)
                .map(|timing| parsed.bittiming = Some(timing))
                .is_some(),
            IFLA_CAN_DATA_BITTIMING => CanBitTiming::parse(payload)
                .map(|timing| parsed.data_bittiming = Some(timing))
                .is_some(),
            IFLA_CAN_STATE => read_u32(payload, 0)
                .map(|state| parsed.state = Some(CanState::from_raw(state)))
                .is_ok(),
            IFLA_CAN_CTRLMODE => read_u32(payload, 0)
                .and_then(|mask| Ok((mask, read_u32(payload, 4)?)))
                .map(|(mask, flags)| parsed.ctrlmode = Some(CanCtrlMode { mask, flags }))
                .is_ok(),
            IFLA_CAN_RESTART_MS => read_u32(payload, 0)
                .map(|ms| parsed.restart_ms = Some(ms))
                .is_ok(),
            IFLA_CAN_CLOCK => read_u32(payload, 0)
                .map(|hz| parsed.clock_hz = Some(hz))
                .is_ok(),
            IFLA_CAN_BERR_COUNTER => read_u16(payload, 0)
                .and_then(|tx| Ok((tx, read_u16(payload, 2)?)))
                .map(|counters| parsed.berr_counter = Some(counters))
                .is_ok(),
            _ => true,
        };
        if !known {
            tracing::warn!(
                attribute = kind,
                len = payload.len(),
                "IFLA_CAN attribute too short, skipped"
            );
        }
    }
    parsed
}

/// Parses one `RTM_NEWLINK`/`RTM_DELLINK` payload (`ifinfomsg` + attributes).
///
/// ```
/// use can_dra_dataplane::link::parse_link;
/// let mut payload = vec![0u8; 16];
/// payload[4..8].copy_from_slice(&7i32.to_ne_bytes()); // ifi_index
/// payload.extend_from_slice(&[9, 0, 3, 0, b'c', b'a', b'n', b'0', 0, 0, 0, 0]); // IFLA_IFNAME
/// let link = parse_link(&payload).unwrap();
/// assert_eq!((link.index, link.name.as_str()), (7, "can0"));
/// ```
pub fn parse_link(payload: &[u8]) -> Result<LinkInfo, NetlinkError> {
    if payload.len() < IFINFOMSG_LEN {
        return Err(NetlinkError::Malformed(format!(
            "ifinfomsg needs 16 bytes, have {}",
            payload.len()
        )));
    }
    let index = u32::try_from(read_i32(payload, 4)?)
        .map_err(|_| NetlinkError::Malformed("negative ifindex".to_string()))?;
    let flags = read_u32(payload, 8)?;
    let mut link = LinkInfo {
        index,
        name: String::new(),
        kind: None,
        mtu: 0,
        up: flags & IFF_UP != 0,
        flags,
        operstate: OperState::Unknown,
        peer_index: None,
        link_netnsid: None,
        can: None,
    };
    let mut info_data = None;
    for attribute in attributes(&payload[IFINFOMSG_LEN..]) {
        let (kind, value) = attribute?;
        match kind {
            IFLA_IFNAME => link.name = c_string(value),
            IFLA_MTU => link.mtu = read_u32(value, 0)?,
            IFLA_LINK => link.peer_index = Some(read_u32(value, 0)?),
            IFLA_OPERSTATE => {
                link.operstate = OperState::from(value.first().copied().unwrap_or(0));
            }
            IFLA_LINK_NETNSID => link.link_netnsid = Some(read_i32(value, 0)?),
            IFLA_LINKINFO => {
                for nested in attributes(value) {
                    match nested? {
                        (IFLA_INFO_KIND, kind) => link.kind = Some(c_string(kind)),
                        (IFLA_INFO_DATA, data) => info_data = Some(data),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if link.kind.as_deref() == Some("can") {
        link.can = Some(info_data.map(parse_can_attributes).unwrap_or_default());
    }
    Ok(link)
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The `struct ifinfomsg` header: family `AF_UNSPEC`, index, flags and change mask.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(IFINFOMSG_LEN);
    header.extend_from_slice(&[0, 0]); // ifi_family AF_UNSPEC, padding
    header.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    header.extend_from_slice(&index.to_ne_bytes()); // ifi_index (validated to fit an i32)
    header.extend_from_slice(&flags.to_ne_bytes());
    header.extend_from_slice(&change.to_ne_bytes());
    header
}

/// The `RTM_NEWLINK` payload creating a vxcan pair whose peer is placed in the namespace open
/// as `peer_netns_fd`.
fn vxcan_message(spec: &VxcanSpec, peer_netns_fd: u32) -> Vec<u8> {
    let mtu = spec.mtu.bytes();
    let mut message = ifinfomsg(spec.host_index.unwrap_or(0), 0, 0);
    let mut attrs = AttributeBuffer::default();
    attrs.push_str(IFLA_IFNAME, &spec.host_name);
    attrs.push_u32(IFLA_MTU, mtu);
    attrs.push_nested(IFLA_LINKINFO, |info| {
        info.push_str(IFLA_INFO_KIND, "vxcan");
        info.push_nested(IFLA_INFO_DATA, |data| {
            // The peer is not a plain nested list: an ifinfomsg comes first (as iproute2 sends
            // it, without the nested flag).
            let mut peer = ifinfomsg(spec.peer_index.unwrap_or(0), 0, 0);
            let mut peer_attrs = AttributeBuffer::default();
            peer_attrs.push_str(IFLA_IFNAME, &spec.peer_name);
            peer_attrs.push_u32(IFLA_MTU, mtu);
            peer_attrs.push_u32(IFLA_NET_NS_FD, peer_netns_fd);
            peer.extend_from_slice(peer_attrs.as_bytes());
            data.push(VXCAN_INFO_PEER, &peer);
        });
    });
    message.extend_from_slice(attrs.as_bytes());
    message
}

fn get_by_name_message(name: &str) -> Vec<u8> {
    let mut message = ifinfomsg(0, 0, 0);
    let mut attrs = AttributeBuffer::default();
    attrs.push_str(IFLA_IFNAME, name);
    message.extend_from_slice(attrs.as_bytes());
    message
}

fn set_mtu_message(index: u32, mtu: u32) -> Vec<u8> {
    let mut message = ifinfomsg(index, 0, 0);
    let mut attrs = AttributeBuffer::default();
    attrs.push_u32(IFLA_MTU, mtu);
    message.extend_from_slice(attrs.as_bytes());
    message
}

fn set_up_message(index: u32, up: bool) -> Vec<u8> {
    ifinfomsg(index, if up { IFF_UP } else { 0 }, IFF_UP)
}

fn check_index(operation: &str, index: u32) -> Result<(), LinkError> {
    if index == 0 || i32::try_from(index).is_err() {
        return Err(LinkError::InvalidRequest {
            operation: operation.to_string(),
            reason: format!("{index} is not a valid interface index"),
        });
    }
    Ok(())
}

/// A CAN-capable link with the properties devices are published with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanController {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Link kind.
    pub kind: CanKind,
    /// MTU in bytes (16 Classic, 72 FD, larger for CAN XL).
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Operational state.
    pub operstate: OperState,
    /// Nominal bit rate in bit/s, when configured (`can` links only).
    pub bitrate: Option<u32>,
    /// Data-phase bit rate in bit/s, when configured (`can` links with FD only).
    pub data_bitrate: Option<u32>,
    /// Whether the link carries CAN FD frames: the ctrlmode FD flag for `can` links, an MTU of
    /// at least 72 for virtual links.
    pub fd: bool,
    /// Controller error state (`can` links only).
    pub state: Option<CanState>,
    /// Control modes (`can` links only).
    pub ctrlmode: Option<CanCtrlMode>,
    /// Kernel driver (`gs_usb`, `mcp251xfd`, ...); `None` for virtual links or when the
    /// namespace's sysfs is not visible to this process.
    pub driver: Option<String>,
    /// For a vxcan end, the peer's ifindex.
    pub peer_index: Option<u32>,
}

impl CanController {
    /// Builds a controller from a link, or `None` when the link is not CAN-capable.
    /// `sysfs_net` is the `/sys/class/net` directory to read the driver from, if any.
    pub fn from_link(link: &LinkInfo, sysfs_net: Option<&Path>) -> Option<Self> {
        let kind = CanKind::from_kind(link.kind.as_deref()?)?;
        let can = link.can.clone().unwrap_or_default();
        let bitrate = |timing: Option<CanBitTiming>| {
            timing
                .map(|timing| timing.bitrate)
                .filter(|&bitrate| bitrate != 0)
        };
        let fd = match can.ctrlmode {
            Some(mode) => mode.flags & CAN_CTRLMODE_FD != 0,
            None => link.mtu >= CanMtu::Fd.bytes(),
        };
        let driver = match (kind, sysfs_net) {
            (CanKind::Can, Some(root)) => driver_of(root, &link.name),
            _ => None,
        };
        Some(Self {
            index: link.index,
            name: link.name.clone(),
            kind,
            mtu: link.mtu,
            up: link.up,
            operstate: link.operstate,
            bitrate: bitrate(can.bittiming),
            data_bitrate: bitrate(can.data_bittiming),
            fd,
            state: can.state,
            ctrlmode: can.ctrlmode,
            driver,
            peer_index: link.peer_index,
        })
    }
}

/// The kernel driver bound to a network interface: the basename of the
/// `<sysfs_net>/<name>/device/driver` symlink; `None` for virtual interfaces.
///
/// `sysfs_net` is normally `/sys/class/net`; sysfs shows the links of the namespace it was
/// mounted in.
pub fn driver_of(sysfs_net: &Path, name: &str) -> Option<String> {
    if validate_name(name).is_err() {
        return None;
    }
    let target = std::fs::read_link(sysfs_net.join(name).join("device/driver")).ok()?;
    target
        .file_name()
        .map(|file| file.to_string_lossy().into_owned())
}

/// The `/sys/class/net` to read drivers from when working in `netns`: only the namespace
/// this process's sysfs was mounted in (taken to be the main thread's) has its links there.
fn sysfs_for(netns: &Netns) -> Option<PathBuf> {
    let own = Netns::from_path("/proc/self/ns/net").ok()?;
    (own.id() == netns.id()).then(|| PathBuf::from("/sys/class/net"))
}

/// A handle on the links of one network namespace (the namespace is fixed when it is opened).
#[derive(Debug)]
pub struct Links {
    socket: RouteSocket,
    namespace: String,
    sysfs_net: Option<PathBuf>,
}

impl Links {
    /// Opens a handle on the calling thread's namespace.
    pub fn open() -> Result<Self, LinkError> {
        let current = Netns::current()?;
        Self::open_in(&current)
    }

    /// Opens a handle on `netns`.
    pub fn open_in(netns: &Netns) -> Result<Self, LinkError> {
        let namespace = format!("netns {}", netns.label());
        let socket = RouteSocket::open_in(netns).map_err(|source| LinkError::Netlink {
            operation: format!("opening a netlink socket in {namespace}"),
            source,
        })?;
        Ok(Self {
            socket,
            namespace,
            sysfs_net: sysfs_for(netns),
        })
    }

    /// Where this handle works, for messages.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Creates a vxcan pair in one `RTM_NEWLINK`: the host end here, the peer end directly
    /// inside `peer_netns` under its final name, both with the requested MTU, then brings both
    /// ends up. On any failure after creation the pair is deleted again.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use can_dra_dataplane::link::{CanMtu, Links, VxcanSpec};
    /// use can_dra_dataplane::netns::Netns;
    /// let pod = Netns::from_pid(4242)?;
    /// let mut host = Links::open()?;
    /// let pair = host.create_vxcan(&VxcanSpec::new("cdra-m1", "can0", CanMtu::Classic), &pod)?;
    /// println!("host {} <-> pod {}", pair.host.index, pair.peer.index);
    /// # Ok(()) }
    /// ```
    pub fn create_vxcan(
        &mut self,
        spec: &VxcanSpec,
        peer_netns: &Netns,
    ) -> Result<VxcanPair, LinkError> {
        let peer_namespace = format!("netns {}", peer_netns.label());
        let operation = spec.describe(&peer_namespace);
        spec.validate(&operation)?;
        // The fd only has to stay open for the duration of the request: `peer_netns` is borrowed.
        let fd = u32::try_from(peer_netns.as_fd().as_raw_fd()).map_err(|_| {
            LinkError::InvalidRequest {
                operation: operation.clone(),
                reason: "negative namespace file descriptor".to_string(),
            }
        })?;
        let message = vxcan_message(spec, fd);
        if let Err(source) = self
            .socket
            .request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &message)
        {
            return Err(self.explain_create_failure(spec, peer_netns, operation, source));
        }
        tracing::debug!(host = %spec.host_name, peer = %spec.peer_name, %peer_namespace, "vxcan pair created");
        match self.finish_vxcan(spec, peer_netns, &operation) {
            Ok(pair) => Ok(pair),
            Err(error) => {
                // Deleting the host end deletes the peer too.
                if let Err(undo) = self.delete_by_name(&spec.host_name) {
                    tracing::warn!(host = %spec.host_name, error = %undo, "undoing a half-made vxcan pair failed");
                }
                Err(error)
            }
        }
    }

    fn finish_vxcan(
        &mut self,
        spec: &VxcanSpec,
        peer_netns: &Netns,
        operation: &str,
    ) -> Result<VxcanPair, LinkError> {
        let missing = |name: &str| LinkError::Malformed {
            operation: operation.to_string(),
            detail: format!("{name} is missing right after its creation"),
        };
        let host = self
            .by_name(&spec.host_name)?
            .ok_or_else(|| missing(&spec.host_name))?;
        let mut peer_links = Links::open_in(peer_netns)?;
        let peer = peer_links
            .by_name(&spec.peer_name)?
            .ok_or_else(|| missing(&spec.peer_name))?;
        for (name, requested, assigned) in [
            (&spec.host_name, spec.host_index, host.index),
            (&spec.peer_name, spec.peer_index, peer.index),
        ] {
            if let Some(requested) = requested
                && requested != assigned
            {
                return Err(LinkError::IndexNotHonoured {
                    operation: operation.to_string(),
                    name: name.clone(),
                    requested,
                    assigned,
                });
            }
        }
        peer_links.set_up(peer.index, true)?;
        self.set_up(host.index, true)?;
        Ok(VxcanPair {
            host: LinkRef {
                name: host.name,
                index: host.index,
            },
            peer: LinkRef {
                name: peer.name,
                index: peer.index,
            },
            mtu: spec.mtu,
        })
    }

    /// Works out which object a failed creation collided with.
    fn explain_create_failure(
        &mut self,
        spec: &VxcanSpec,
        peer_netns: &Netns,
        operation: String,
        source: NetlinkError,
    ) -> LinkError {
        let peer_namespace = format!("netns {}", peer_netns.label());
        match source.errno() {
            Some(Errno::EEXIST | Errno::EBUSY) => {
                let mut peer_links = Links::open_in(peer_netns).ok();
                let host_named = matches!(self.by_name(&spec.host_name), Ok(Some(_)));
                let peer_named = peer_links
                    .as_mut()
                    .is_some_and(|links| matches!(links.by_name(&spec.peer_name), Ok(Some(_))));
                if host_named {
                    return LinkError::Exists {
                        operation,
                        name: spec.host_name.clone(),
                        namespace: self.namespace.clone(),
                    };
                }
                if peer_named {
                    return LinkError::Exists {
                        operation,
                        name: spec.peer_name.clone(),
                        namespace: peer_namespace,
                    };
                }
                if let Some(index) = spec.host_index
                    && matches!(self.by_index(index), Ok(Some(_)))
                {
                    return LinkError::IndexInUse {
                        operation,
                        index,
                        namespace: self.namespace.clone(),
                    };
                }
                if let (Some(index), Some(links)) = (spec.peer_index, peer_links.as_mut())
                    && matches!(links.by_index(index), Ok(Some(_)))
                {
                    return LinkError::IndexInUse {
                        operation,
                        index,
                        namespace: peer_namespace,
                    };
                }
                LinkError::from_netlink(operation, &spec.host_name, &self.namespace, source)
            }
            Some(errno @ (Errno::EOPNOTSUPP | Errno::EAFNOSUPPORT | Errno::EPROTONOSUPPORT)) => {
                LinkError::ModuleMissing {
                    operation,
                    module: "vxcan",
                    errno,
                }
            }
            _ => LinkError::from_netlink(operation, &spec.host_name, &self.namespace, source),
        }
    }

    /// Looks a link up by name; `Ok(None)` when there is none.
    pub fn by_name(&mut self, name: &str) -> Result<Option<LinkInfo>, LinkError> {
        validate_name(name)?;
        let operation = format!("looking up link {name} in {}", self.namespace);
        self.get(operation, name, &get_by_name_message(name))
    }

    /// Looks a link up by index; `Ok(None)` when there is none.
    pub fn by_index(&mut self, index: u32) -> Result<Option<LinkInfo>, LinkError> {
        let operation = format!("looking up link index {index} in {}", self.namespace);
        check_index(&operation, index)?;
        self.get(
            operation,
            &format!("index {index}"),
            &ifinfomsg(index, 0, 0),
        )
    }

    fn get(
        &mut self,
        operation: String,
        subject: &str,
        message: &[u8],
    ) -> Result<Option<LinkInfo>, LinkError> {
        match self.socket.request(RTM_GETLINK, 0, message) {
            Ok(replies) => {
                let reply = replies
                    .iter()
                    .find(|reply| reply.message_type == RTM_NEWLINK)
                    .ok_or_else(|| LinkError::Malformed {
                        operation: operation.clone(),
                        detail: "no RTM_NEWLINK in the answer".to_string(),
                    })?;
                parse_link(&reply.payload)
                    .map(Some)
                    .map_err(|error| LinkError::Malformed {
                        operation,
                        detail: error.to_string(),
                    })
            }
            Err(error) if error.errno() == Some(Errno::ENODEV) => Ok(None),
            Err(source) => Err(LinkError::from_netlink(
                operation,
                subject,
                &self.namespace,
                source,
            )),
        }
    }

    /// Sends a change request and maps a refusal to a typed error.
    fn change(
        &mut self,
        message_type: u16,
        message: &[u8],
        operation: String,
        subject: &str,
    ) -> Result<(), LinkError> {
        self.socket
            .request(message_type, 0, message)
            .map(drop)
            .map_err(|source| LinkError::from_netlink(operation, subject, &self.namespace, source))
    }

    /// Lists every link in the namespace.
    pub fn list(&mut self) -> Result<Vec<LinkInfo>, LinkError> {
        let operation = format!("listing links in {}", self.namespace);
        let replies = self
            .socket
            .dump(RTM_GETLINK, &ifinfomsg(0, 0, 0))
            .map_err(|source| {
                LinkError::from_netlink(operation.clone(), "links", &self.namespace, source)
            })?;
        replies
            .iter()
            .filter(|reply| reply.message_type == RTM_NEWLINK)
            .map(|reply| {
                parse_link(&reply.payload).map_err(|error| LinkError::Malformed {
                    operation: operation.clone(),
                    detail: error.to_string(),
                })
            })
            .collect()
    }

    /// Deletes a link by index. Deleting either end of a vxcan pair deletes both.
    pub fn delete(&mut self, index: u32) -> Result<(), LinkError> {
        let operation = format!("deleting link index {index} in {}", self.namespace);
        check_index(&operation, index)?;
        let subject = format!("index {index}");
        self.change(RTM_DELLINK, &ifinfomsg(index, 0, 0), operation, &subject)
    }

    fn delete_by_name(&mut self, name: &str) -> Result<(), LinkError> {
        let operation = format!("deleting link {name} in {}", self.namespace);
        self.change(RTM_DELLINK, &get_by_name_message(name), operation, name)
    }

    /// Sets a link administratively up or down.
    pub fn set_up(&mut self, index: u32, up: bool) -> Result<(), LinkError> {
        let state = if up { "up" } else { "down" };
        let operation = format!("setting link index {index} {state} in {}", self.namespace);
        check_index(&operation, index)?;
        let subject = format!("index {index}");
        self.change(RTM_NEWLINK, &set_up_message(index, up), operation, &subject)
    }

    /// Sets a link's MTU. CAN links change MTU only while down (`Busy` otherwise).
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), LinkError> {
        let operation = format!(
            "setting MTU {mtu} on link index {index} in {}",
            self.namespace
        );
        check_index(&operation, index)?;
        let subject = format!("index {index}");
        self.change(
            RTM_NEWLINK,
            &set_mtu_message(index, mtu),
            operation,
            &subject,
        )
    }

    /// Lists the CAN-capable links (`can`, `vcan`, `vxcan`) of the namespace.
    pub fn can_controllers(&mut self) -> Result<Vec<CanController>, LinkError> {
        let sysfs = self.sysfs_net.clone();
        Ok(self
            .list()?
            .iter()
            .filter_map(|link| CanController::from_link(link, sysfs.as_deref()))
            .collect())
    }
}

/// A change to a CAN link, as seen by a [`LinkMonitor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A CAN link appeared.
    Added(CanController),
    /// A CAN link changed (state, up/down, MTU, bit rate, name, ...).
    Changed {
        /// The last known properties.
        before: CanController,
        /// The new properties.
        after: CanController,
    },
    /// A CAN link went away (deleted, or moved to another namespace).
    Removed(CanController),
}

/// Follows link notifications (`RTNLGRP_LINK`) of one namespace and reports CAN link events.
///
/// Meant to run on a dedicated thread: [`LinkMonitor::next_event`] blocks up to a timeout.
/// Notifications that are not about CAN links, or that cannot be parsed, are skipped; if the
/// kernel drops notifications (`ENOBUFS`), the monitor re-reads all links and reports the
/// differences, so no change is lost for good.
///
/// ```no_run
/// # fn main() -> Result<(), can_dra_dataplane::link::LinkError> {
/// use std::time::Duration;
/// use can_dra_dataplane::link::LinkMonitor;
/// let mut monitor = LinkMonitor::open()?;
/// while let Some(event) = monitor.next_event(Duration::from_secs(1))? {
///     println!("{event:?}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LinkMonitor {
    socket: Socket,
    links: Links,
    known: HashMap<u32, CanController>,
    pending: VecDeque<LinkEvent>,
    timeout: Option<Duration>,
}

impl LinkMonitor {
    /// Monitors the calling thread's namespace.
    pub fn open() -> Result<Self, LinkError> {
        let current = Netns::current()?;
        Self::open_in(&current)
    }

    /// Monitors `netns`.
    pub fn open_in(netns: &Netns) -> Result<Self, LinkError> {
        let namespace = format!("netns {}", netns.label());
        let operation = format!("subscribing to link notifications in {namespace}");
        let socket = netns
            .run(|| -> std::io::Result<Socket> {
                let mut socket = Socket::new(NETLINK_ROUTE)?;
                socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
                socket.set_rx_buf_sz(1 << 20)?;
                Ok(socket)
            })?
            .map_err(|error| LinkError::Netlink {
                operation,
                source: NetlinkError::Socket(error),
            })?;
        // Subscribe before the first snapshot so that no change falls between the two.
        let mut links = Links::open_in(netns)?;
        let known = links
            .can_controllers()?
            .into_iter()
            .map(|controller| (controller.index, controller))
            .collect();
        Ok(Self {
            socket,
            links,
            known,
            pending: VecDeque::new(),
            timeout: None,
        })
    }

    /// The CAN links currently known, as of the last event.
    pub fn known(&self) -> impl Iterator<Item = &CanController> {
        self.known.values()
    }

    /// Waits up to `timeout` for the next CAN link event; `Ok(None)` when none came in time.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<LinkEvent>, LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            // A zero receive timeout would mean "block forever".
            if remaining < Duration::from_millis(1) {
                return Ok(None);
            }
            match self.receive(remaining)? {
                Some(datagram) => self.absorb(&datagram),
                None => return Ok(None),
            }
        }
    }

    fn receive(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, LinkError> {
        let operation = || format!("receiving link notifications in {}", self.links.namespace);
        if self.timeout != Some(timeout) {
            let micros = i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX);
            setsockopt(
                &self.socket,
                sockopt::ReceiveTimeout,
                &TimeVal::new(micros / 1_000_000, micros % 1_000_000),
            )
            .map_err(|errno| LinkError::Netlink {
                operation: operation(),
                source: NetlinkError::Socket(errno.into()),
            })?;
            self.timeout = Some(timeout);
        }
        let mut probe: Vec<u8> = Vec::with_capacity(64);
        let size = match self
            .socket
            .recv(&mut probe, libc::MSG_PEEK | libc::MSG_TRUNC)
        {
            Ok(size) => size,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::warn!("link notifications were dropped by the kernel; resynchronising");
                self.resync()?;
                return Ok(Some(Vec::new()));
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {
                return Ok(Some(Vec::new()));
            }
            Err(error) => {
                return Err(LinkError::Netlink {
                    operation: operation(),
                    source: NetlinkError::Io(error),
                });
            }
        };
        let mut datagram: Vec<u8> = Vec::with_capacity(size.max(16));
        self.socket
            .recv(&mut datagram, 0)
            .map_err(|error| LinkError::Netlink {
                operation: operation(),
                source: NetlinkError::Io(error),
            })?;
        Ok(Some(datagram))
    }

    /// Re-reads all CAN links and queues the differences with what was known.
    fn resync(&mut self) -> Result<(), LinkError> {
        let current: HashMap<u32, CanController> = self
            .links
            .can_controllers()?
            .into_iter()
            .map(|controller| (controller.index, controller))
            .collect();
        let mut gone: Vec<u32> = self
            .known
            .keys()
            .filter(|index| !current.contains_key(index))
            .copied()
            .collect();
        gone.sort_unstable();
        for index in gone {
            if let Some(before) = self.known.remove(&index) {
                self.pending.push_back(LinkEvent::Removed(before));
            }
        }
        let mut indexes: Vec<u32> = current.keys().copied().collect();
        indexes.sort_unstable();
        for index in indexes {
            if let Some(after) = current.get(&index) {
                self.record(after.clone());
            }
        }
        Ok(())
    }

    /// Queues the events a datagram of notifications carries.
    fn absorb(&mut self, datagram: &[u8]) {
        let mut offset = 0;
        while offset + 16 <= datagram.len() {
            let (Ok(length), Ok(message_type)) =
                (read_u32(datagram, offset), read_u16(datagram, offset + 4))
            else {
                break;
            };
            let length = length as usize;
            if length < 16 || offset + length > datagram.len() {
                tracing::debug!(length, offset, "malformed notification datagram skipped");
                break;
            }
            self.absorb_message(message_type, &datagram[offset + 16..offset + length]);
            offset += crate::netlink::align(length);
        }
    }

    fn absorb_message(&mut self, message_type: u16, payload: &[u8]) {
        if message_type != RTM_NEWLINK && message_type != RTM_DELLINK {
            return;
        }
        let link = match parse_link(payload) {
            Ok(link) => link,
            Err(error) => {
                tracing::debug!(%error, "unreadable link notification skipped");
                return;
            }
        };
        if message_type == RTM_DELLINK {
            let parsed = CanController::from_link(&link, None);
            if let Some(before) = self.known.remove(&link.index).or(parsed) {
                self.pending.push_back(LinkEvent::Removed(before));
            }
            return;
        }
        let sysfs = self.links.sysfs_net.clone();
        match CanController::from_link(&link, sysfs.as_deref()) {
            Some(after) => self.record(after),
            // Same index, no longer CAN-capable: cannot happen for a live link, but be safe.
            None => {
                if let Some(before) = self.known.remove(&link.index) {
                    self.pending.push_back(LinkEvent::Removed(before));
                }
            }
        }
    }

    fn record(&mut self, after: CanController) {
        match self.known.insert(after.index, after.clone()) {
            None => self.pending.push_back(LinkEvent::Added(after)),
            // The kernel repeats notifications that change nothing we report.
            Some(before) if before != after => {
                self.pending.push_back(LinkEvent::Changed { before, after });
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(index: u32) -> Vec<u8> {
        // ifinfomsg: family 0, pad 0, type 0 (2 bytes), index, flags 0, change 0.
        let mut bytes = vec![0, 0, 0, 0];
        bytes.extend_from_slice(&index.to_ne_bytes());
        bytes.extend_from_slice(&[0; 8]);
        bytes
    }

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = u16::try_from(4 + payload.len())
            .unwrap()
            .to_ne_bytes()
            .to_vec();
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(payload);
        while bytes.len() % 4 != 0 {
            bytes.push(0);
        }
        bytes
    }

    fn u32s(values: &[u32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    #[test]
    fn names_are_checked_like_the_kernel_does() {
        for good in ["can0", "vxcan-pod-12345", "a", "x.y_z-1"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for (bad, reason) in [
            ("", "empty"),
            ("sixteen-bytes-xx", "longer than 15 bytes"),
            ("a/b", "contains '/'"),
            ("a b", "contains whitespace or a control character"),
            ("vxcan%d", "contains '%'"),
            ("eth0:1", "contains ':'"),
            ("..", "reserved"),
        ] {
            match validate_name(bad) {
                Err(LinkError::InvalidName { reason: got, .. }) => assert_eq!(got, reason, "{bad}"),
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
        // 15 bytes counted as bytes, not characters: "é" is two bytes.
        assert!(validate_name("ééééééé1").is_ok());
        assert!(validate_name("éééééééé").is_err());
    }

    #[test]
    fn kernel_errnos_map_to_actionable_variants_naming_the_object() {
        let map = |errno| {
            LinkError::from_netlink(
                "creating vxcan pair vxa <-> can0 (in netns pod)".to_string(),
                "vxa",
                "netns host",
                NetlinkError::Kernel { errno },
            )
        };
        let exists = map(Errno::EEXIST);
        assert!(matches!(&exists, LinkError::Exists { name, .. } if name == "vxa"));
        assert_eq!(
            exists.to_string(),
            "creating vxcan pair vxa <-> can0 (in netns pod): link vxa already exists in \
             netns host (EEXIST)"
        );
        assert!(matches!(map(Errno::ENODEV), LinkError::NotFound { .. }));
        assert!(matches!(
            map(Errno::EPERM),
            LinkError::PermissionDenied {
                errno: Errno::EPERM,
                ..
            }
        ));
        assert!(matches!(map(Errno::EBUSY), LinkError::Busy { .. }));
        let other = map(Errno::EINVAL);
        assert!(matches!(other, LinkError::Netlink { .. }));
        assert!(
            other
                .to_string()
                .starts_with("creating vxcan pair vxa <-> can0")
        );
    }

    #[test]
    fn vxcan_message_is_byte_exact() {
        let spec = VxcanSpec::new("vxa", "can0", CanMtu::Fd).with_indexes(300, 5);
        let message = vxcan_message(&spec, 9);

        // Top-level ifinfomsg pins the host index 300 (0x12c).
        let mut expected = header(300);
        // IFLA_IFNAME "vxa\0": length 8, type 3.
        expected.extend_from_slice(&[8, 0, 3, 0, b'v', b'x', b'a', 0]);
        // IFLA_MTU 72: length 8, type 4.
        expected.extend_from_slice(&[8, 0, 4, 0, 72, 0, 0, 0]);
        // The peer: ifinfomsg with index 5, then IFLA_IFNAME "can0\0" (9 -> 12 bytes),
        // IFLA_MTU 72, IFLA_NET_NS_FD (28) = 9. 16 + 12 + 8 + 8 = 44 bytes.
        let mut peer = header(5);
        peer.extend_from_slice(&[9, 0, 3, 0, b'c', b'a', b'n', b'0', 0, 0, 0, 0]);
        peer.extend_from_slice(&[8, 0, 4, 0, 72, 0, 0, 0]);
        peer.extend_from_slice(&[8, 0, 28, 0, 9, 0, 0, 0]);
        assert_eq!(peer.len(), 44);
        // IFLA_LINKINFO (18 | NLA_F_NESTED = 0x8012), length 4 + 12 + 52 = 68:
        //   IFLA_INFO_KIND "vxcan\0": length 10, padded to 12.
        //   IFLA_INFO_DATA (2 | nested = 0x8002), length 4 + 48 = 52:
        //     VXCAN_INFO_PEER (1, no nested flag), length 4 + 44 = 48.
        expected.extend_from_slice(&[68, 0, 0x12, 0x80]);
        expected.extend_from_slice(&[10, 0, 1, 0, b'v', b'x', b'c', b'a', b'n', 0, 0, 0]);
        expected.extend_from_slice(&[52, 0, 0x02, 0x80]);
        expected.extend_from_slice(&[48, 0, 1, 0]);
        expected.extend_from_slice(&peer);
        assert_eq!(message, expected);
    }

    #[test]
    fn vxcan_message_without_pinning_has_zero_indexes() {
        let message = vxcan_message(&VxcanSpec::new("h", "p", CanMtu::Classic), 3);
        assert_eq!(&message[4..8], &[0, 0, 0, 0], "host ifi_index");
        // Host: header 16 + IFNAME "h\0" 8 + MTU 8, LINKINFO header 4, KIND 12, DATA header 4,
        // PEER header 4: the peer's ifinfomsg starts at offset 56.
        assert_eq!(&message[56 + 4..56 + 8], &[0, 0, 0, 0], "peer ifi_index");
        // IFLA_MTU sits at 24..32 (after header 16 + IFNAME 8); its value at 28..32.
        assert_eq!(&message[24..32], &[8, 0, 4, 0, 16, 0, 0, 0], "host MTU 16");
    }

    #[test]
    fn small_requests_are_byte_exact() {
        // Up: ifi_flags = IFF_UP, ifi_change = IFF_UP.
        let mut up = vec![0, 0, 0, 0, 7, 0, 0, 0];
        up.extend_from_slice(&[1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(set_up_message(7, true), up);
        // Down: flags 0, change IFF_UP.
        assert_eq!(&set_up_message(7, false)[8..], &[0, 0, 0, 0, 1, 0, 0, 0]);
        // MTU: header for index 7, then IFLA_MTU (4) = 72.
        let mut mtu = header(7);
        mtu.extend_from_slice(&[8, 0, 4, 0, 72, 0, 0, 0]);
        assert_eq!(set_mtu_message(7, 72), mtu);
        // Lookup by name: index 0, IFLA_IFNAME "vcan0\0" (10 -> 12 bytes).
        let mut get = header(0);
        get.extend_from_slice(&[10, 0, 3, 0, b'v', b'c', b'a', b'n', b'0', 0, 0, 0]);
        assert_eq!(get_by_name_message("vcan0"), get);
    }

    #[test]
    fn spec_validation_happens_before_any_kernel_call() {
        let op = "test";
        let peer_only = VxcanSpec {
            peer_index: Some(5),
            ..VxcanSpec::new("h", "p", CanMtu::Classic)
        };
        assert!(matches!(
            peer_only.validate(op),
            Err(LinkError::InvalidRequest { .. })
        ));
        let zero = VxcanSpec::new("h", "p", CanMtu::Classic).with_indexes(0, 4);
        assert!(matches!(
            zero.validate(op),
            Err(LinkError::InvalidRequest { .. })
        ));
        let huge = VxcanSpec::new("h", "p", CanMtu::Classic).with_indexes(u32::MAX, 4);
        assert!(matches!(
            huge.validate(op),
            Err(LinkError::InvalidRequest { .. })
        ));
        let bad_peer = VxcanSpec::new("h", "pod/can0", CanMtu::Classic);
        assert!(matches!(
            bad_peer.validate(op),
            Err(LinkError::InvalidName { .. })
        ));
        assert!(
            VxcanSpec::new("h", "p", CanMtu::Fd)
                .with_indexes(4, 4)
                .validate(op)
                .is_ok()
        );
    }

    /// A `can` link as a kernel would report it: mcp251xfd-like FD controller in bus-off.
    fn fd_controller_message() -> Vec<u8> {
        let mut payload = header(3);
        payload[8] = 0x41; // IFF_UP | IFF_RUNNING
        let mut data = Vec::new();
        // Nominal 500 kbit/s, 87.5 %, tq 25 ns, prop 34, ps1 35, ps2 10, sjw 1, brp 1.
        data.extend(attr(1, &u32s(&[500_000, 875, 25, 34, 35, 10, 1, 1])));
        // IFLA_CAN_CLOCK 40 MHz.
        data.extend(attr(3, &u32s(&[40_000_000])));
        // IFLA_CAN_STATE 3 = bus-off.
        data.extend(attr(4, &u32s(&[3])));
        // IFLA_CAN_CTRLMODE mask 0xffff, flags FD | BERR_REPORTING.
        data.extend(attr(5, &u32s(&[0xffff, 0x30])));
        // IFLA_CAN_RESTART_MS 100.
        data.extend(attr(6, &u32s(&[100])));
        // IFLA_CAN_BERR_COUNTER tx 256 (0x100), rx 12.
        data.extend(attr(8, &[0x00, 0x01, 12, 0]));
        // IFLA_CAN_DATA_BITTIMING 2 Mbit/s, 75 %.
        data.extend(attr(9, &u32s(&[2_000_000, 750, 25, 7, 7, 5, 1, 1])));
        // IFLA_CAN_TERMINATION (11) = 120 ohms, unknown to the parser: skipped.
        data.extend(attr(11, &120u16.to_ne_bytes()));
        let mut info = attr(1, b"can\0");
        let mut data_attr = attr(2, &data);
        data_attr[3] |= 0x80; // nested flag on IFLA_INFO_DATA
        info.extend(data_attr);
        payload.extend(attr(3, b"can0\0"));
        payload.extend(attr(4, &u32s(&[72])));
        payload.extend(attr(16, &[6])); // IFLA_OPERSTATE up
        let mut linkinfo = attr(18, &info);
        linkinfo[3] |= 0x80;
        payload.extend(linkinfo);
        payload
    }

    #[test]
    fn can_attributes_parse_fd_timing_and_bus_off() {
        let link = parse_link(&fd_controller_message()).unwrap();
        assert_eq!(link.kind.as_deref(), Some("can"));
        let can = link.can.clone().unwrap();
        assert_eq!(can.state, Some(CanState::BusOff));
        assert_eq!(can.bittiming.unwrap().bitrate, 500_000);
        assert_eq!(can.bittiming.unwrap().sample_point, 875);
        assert_eq!(can.bittiming.unwrap().phase_seg2, 10);
        assert_eq!(can.data_bittiming.unwrap().bitrate, 2_000_000);
        assert_eq!(can.data_bittiming.unwrap().sample_point, 750);
        assert_eq!(can.clock_hz, Some(40_000_000));
        assert_eq!(can.restart_ms, Some(100));
        assert_eq!(can.berr_counter, Some((256, 12)));
        assert_eq!(
            can.ctrlmode,
            Some(CanCtrlMode {
                mask: 0xffff,
                flags: 0x30
            })
        );

        let controller = CanController::from_link(&link, None).unwrap();
        assert_eq!(controller.kind, CanKind::Can);
        assert_eq!(controller.bitrate, Some(500_000));
        assert_eq!(controller.data_bitrate, Some(2_000_000));
        assert!(controller.fd);
        assert!(controller.up);
        assert_eq!(controller.operstate, OperState::Up);
        assert_eq!(controller.state.map(CanState::as_str), Some("bus-off"));
    }

    #[test]
    fn unconfigured_and_classic_controllers() {
        // A Classic controller (ctrlmode without FD) that was never given a bit rate:
        // the kernel then reports bitrate 0, which means "not configured".
        let mut data = attr(1, &u32s(&[0; 8]));
        data.extend(attr(4, &u32s(&[4]))); // stopped
        data.extend(attr(5, &u32s(&[0xff, 0])));
        let can = parse_can_attributes(&data);
        let link = LinkInfo {
            index: 4,
            name: "can1".into(),
            kind: Some("can".into()),
            mtu: 16,
            up: false,
            flags: 0,
            operstate: OperState::Down,
            peer_index: None,
            link_netnsid: None,
            can: Some(can),
        };
        let controller = CanController::from_link(&link, None).unwrap();
        assert_eq!(controller.bitrate, None);
        assert_eq!(controller.data_bitrate, None);
        assert!(!controller.fd);
        assert_eq!(controller.state, Some(CanState::Stopped));
    }

    #[test]
    fn short_or_truncated_can_attributes_do_not_fail() {
        // Bit timing with 3 fields instead of 8, then a state.
        let mut data = attr(1, &u32s(&[500_000, 875, 25]));
        data.extend(attr(4, &u32s(&[1])));
        let can = parse_can_attributes(&data);
        assert_eq!(can.bittiming, None);
        assert_eq!(can.state, Some(CanState::ErrorWarning));
        // An attribute whose length runs past the end stops parsing without panicking.
        let can = parse_can_attributes(&[200, 0, 4, 0, 1, 0]);
        assert_eq!(can, CanAttributes::default());
        assert_eq!(CanState::from_raw(77), CanState::Other(77));
    }

    #[test]
    fn virtual_links_derive_fd_from_the_mtu_and_report_their_peer() {
        let mut payload = header(12);
        payload.extend(attr(3, b"vxh\0"));
        payload.extend(attr(4, &u32s(&[72])));
        payload.extend(attr(5, &u32s(&[3]))); // IFLA_LINK: peer index 3
        payload.extend(attr(37, &0i32.to_ne_bytes())); // IFLA_LINK_NETNSID 0
        payload.extend(attr(16, &[2])); // down
        payload.extend(attr(18, &attr(1, b"vxcan\0")));
        let link = parse_link(&payload).unwrap();
        assert_eq!(link.peer_index, Some(3));
        assert_eq!(link.link_netnsid, Some(0));
        assert_eq!(link.can, None);
        let controller = CanController::from_link(&link, None).unwrap();
        assert_eq!(controller.kind, CanKind::Vxcan);
        assert!(controller.fd);
        assert_eq!(controller.state, None);
        assert_eq!(controller.operstate, OperState::Down);

        let mut classic = header(13);
        classic.extend(attr(3, b"vcan0\0"));
        classic.extend(attr(4, &u32s(&[16])));
        classic.extend(attr(18, &attr(1, b"vcan\0")));
        let controller = CanController::from_link(&parse_link(&classic).unwrap(), None).unwrap();
        assert_eq!(controller.kind, CanKind::Vcan);
        assert!(!controller.fd);

        let mut ethernet = header(2);
        ethernet.extend(attr(3, b"eth0\0"));
        ethernet.extend(attr(18, &attr(1, b"veth\0")));
        assert_eq!(
            CanController::from_link(&parse_link(&ethernet).unwrap(), None),
            None
        );
    }

    #[test]
    fn short_link_payload_is_an_error() {
        assert!(parse_link(&[0; 8]).is_err());
        let mut negative = header(0);
        negative[4..8].copy_from_slice(&(-1i32).to_ne_bytes());
        assert!(parse_link(&negative).is_err());
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("can-dra-link-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn driver_is_the_basename_of_the_sysfs_driver_link() {
        let root = scratch_dir("sysfs");
        let device = root.join("can0/device");
        std::fs::create_dir_all(&device).unwrap();
        std::os::unix::fs::symlink("../../../bus/usb/drivers/gs_usb", device.join("driver"))
            .unwrap();
        std::fs::create_dir_all(root.join("vcan0")).unwrap();
        assert_eq!(driver_of(&root, "can0").as_deref(), Some("gs_usb"));
        assert_eq!(driver_of(&root, "vcan0"), None);
        assert_eq!(driver_of(&root, "missing"), None);
        assert_eq!(driver_of(&root, "../can0"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn notification(message_type: u16, payload: &[u8]) -> Vec<u8> {
        crate::netlink::encode_message(message_type, 0, 0, payload).unwrap()
    }

    fn vcan(index: u32, name: &str, up: bool) -> Vec<u8> {
        let mut payload = header(index);
        payload[8] = u8::from(up);
        let mut name = name.as_bytes().to_vec();
        name.push(0);
        payload.extend(attr(3, &name));
        payload.extend(attr(4, &u32s(&[16])));
        payload.extend(attr(18, &attr(1, b"vcan\0")));
        payload
    }

    fn offline_monitor() -> LinkMonitor {
        LinkMonitor::open().unwrap()
    }

    #[test]
    fn monitor_turns_notifications_into_events() {
        // Runs unprivileged: only the parsing is exercised, with hand-made notifications.
        let mut monitor = offline_monitor();
        monitor.known.clear();
        let mut datagram = notification(RTM_NEWLINK, &vcan(900, "vcan9", false));
        // The same state again (the kernel repeats itself): no event.
        datagram.extend(notification(RTM_NEWLINK, &vcan(900, "vcan9", false)));
        datagram.extend(notification(RTM_NEWLINK, &vcan(900, "vcan9", true)));
        // Not a CAN link: ignored.
        let mut ethernet = header(901);
        ethernet.extend(attr(3, b"eth9\0"));
        datagram.extend(notification(RTM_NEWLINK, &ethernet));
        // Garbage of a known type and an unknown type: ignored without panicking.
        datagram.extend(notification(RTM_NEWLINK, &[1, 2, 3, 4]));
        datagram.extend(notification(99, &[0; 4]));
        datagram.extend(notification(RTM_DELLINK, &vcan(900, "vcan9", true)));
        monitor.absorb(&datagram);
        let events: Vec<LinkEvent> = monitor.pending.drain(..).collect();
        assert_eq!(events.len(), 3, "{events:#?}");
        assert!(matches!(&events[0], LinkEvent::Added(c) if c.name == "vcan9" && !c.up));
        assert!(
            matches!(&events[1], LinkEvent::Changed { before, after } if !before.up && after.up)
        );
        assert!(matches!(&events[2], LinkEvent::Removed(c) if c.index == 900));
        assert!(monitor.known().all(|c| c.index != 900));
    }

    #[test]
    fn monitor_survives_truncated_datagrams() {
        let mut monitor = offline_monitor();
        let mut datagram = notification(RTM_NEWLINK, &vcan(902, "vcan8", true));
        datagram[0] = 250; // length beyond the datagram
        monitor.absorb(&datagram);
        monitor.absorb(&[1, 2, 3]);
        assert!(monitor.pending.is_empty());
    }

    #[test]
    fn monitor_times_out_quietly() {
        let mut monitor = offline_monitor();
        let start = Instant::now();
        assert_eq!(monitor.next_event(Duration::from_millis(50)).unwrap(), None);
        assert!(start.elapsed() >= Duration::from_millis(45));
        assert_eq!(monitor.next_event(Duration::ZERO).unwrap(), None);
    }
}
