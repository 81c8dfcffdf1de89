//! can-gw rules: the kernel CAN gateway that copies frames from one CAN interface to another.
//!
//! A bus is a full mesh of can-gw rules among its members' host ends, the physical controller
//! and the tunnel endpoint. This module adds, deletes, lists (with counters) and flushes those
//! rules over `NETLINK_ROUTE`, building the `rtcanmsg` requests by hand because no Rust crate
//! speaks them.
//!
//! Kernel facts this module is built around:
//! - Rules live per network namespace; both interfaces must be in the namespace of the
//!   [`RouteSocket`] used.
//! - The kernel does **not** de-duplicate: two identical adds forward every frame twice. Use
//!   [`ensure`], [`ensure_all`] or [`ensure_exactly`], which dump first.
//! - A delete must repeat the exact attribute set of the rule; if nothing matches the kernel
//!   answers `EINVAL`, reported here as [`GatewayError::NotFound`].
//! - Rules disappear on their own when either interface is unregistered.
//! - A rule without [`GwRule::iif_tx_ok`] silently skips a frame whose *first ingress* ifindex
//!   equals the destination's ifindex. For a frame sent inside a pod that ifindex is the
//!   pod-namespace index of the pod's vxcan end, which can collide with a host interface index:
//!   mesh rules should set `iif_tx_ok` (see [`GwRule::mesh`]).
//!
//! Frame modifications (`CGW_MOD_*`), checksums and user ids are deliberately not supported:
//! the driver only forwards frames unchanged. Rules made by others with such features are
//! still listed, marked with [`GwRuleStats::modifies_frames`].

use std::collections::HashMap;
use std::fmt;

use tracing::{debug, info};

use crate::netlink::{AttributeBuffer, NetlinkError, RouteSocket, attributes, read_u32};

/// `RTM_NEWROUTE`: add a rule; also the type of every dump reply.
const RTM_NEWROUTE: u16 = 24;
/// `RTM_DELROUTE`: delete a rule, or flush all of them.
const RTM_DELROUTE: u16 = 25;
/// `RTM_GETROUTE`: dump the rules.
const RTM_GETROUTE: u16 = 26;

/// `AF_CAN`: the first payload byte, on which rtnetlink dispatches to can-gw.
const AF_CAN: u8 = 29;
/// `CGW_TYPE_CAN_CAN`: the only gateway type the kernel implements.
const CGW_TYPE_CAN_CAN: u8 = 1;

/// `CGW_FLAGS_CAN_ECHO`: echo routed frames to local sockets on the destination.
const CGW_FLAGS_CAN_ECHO: u16 = 0x01;
/// `CGW_FLAGS_CAN_SRC_TSTAMP`: keep the source receive timestamp.
const CGW_FLAGS_CAN_SRC_TSTAMP: u16 = 0x02;
/// `CGW_FLAGS_CAN_IIF_TX_OK`: allow sending to the frame's first ingress interface.
const CGW_FLAGS_CAN_IIF_TX_OK: u16 = 0x04;
/// `CGW_FLAGS_CAN_FD`: the rule routes only CAN FD frames (otherwise only Classic ones).
const CGW_FLAGS_CAN_FD: u16 = 0x08;
const KNOWN_FLAGS: u16 =
    CGW_FLAGS_CAN_ECHO | CGW_FLAGS_CAN_SRC_TSTAMP | CGW_FLAGS_CAN_IIF_TX_OK | CGW_FLAGS_CAN_FD;

// Attribute numbers from `include/uapi/linux/can/gw.h`.
const CGW_MOD_AND: u16 = 1;
const CGW_CS_CRC8: u16 = 6;
const CGW_HANDLED: u16 = 7;
const CGW_DROPPED: u16 = 8;
const CGW_SRC_IF: u16 = 9;
const CGW_DST_IF: u16 = 10;
const CGW_FILTER: u16 = 11;
const CGW_DELETED: u16 = 12;
const CGW_LIM_HOPS: u16 = 13;
const CGW_MOD_UID: u16 = 14;
const CGW_FDMOD_AND: u16 = 15;
const CGW_FDMOD_SET: u16 = 18;

/// `CGW_MAX_HOPS`: the largest hop limit the kernel can ever accept.
pub const MAX_HOPS: u8 = 6;

/// `CAN_EFF_FLAG`: the identifier is a 29-bit extended one.
pub const CAN_EFF_FLAG: u32 = 0x8000_0000;
/// `CAN_RTR_FLAG`: remote transmission request.
pub const CAN_RTR_FLAG: u32 = 0x4000_0000;
/// `CAN_INV_FILTER`: in a filter's `can_id`, inverts the match.
pub const CAN_INV_FILTER: u32 = 0x2000_0000;
/// `CAN_SFF_MASK`: the bits of an 11-bit standard identifier.
pub const CAN_SFF_MASK: u32 = 0x0000_07ff;
/// `CAN_EFF_MASK`: the bits of a 29-bit extended identifier.
pub const CAN_EFF_MASK: u32 = 0x1fff_ffff;

/// Which frames a rule routes. A can-gw rule carries one kind only, so bridging mixed
/// traffic takes one rule of each kind per direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrameKind {
    /// Classic CAN frames (up to 8 data bytes) only.
    Classic,
    /// CAN FD frames only (`CGW_FLAGS_CAN_FD`).
    Fd,
}

/// A kernel `can_filter` restricting which frames a rule routes: a frame matches when
/// `frame_id & can_mask == can_id & can_mask`, inverted when `can_id` has [`CAN_INV_FILTER`].
/// Identifiers carry the SocketCAN flag bits ([`CAN_EFF_FLAG`], [`CAN_RTR_FLAG`]).
///
/// ```
/// use can_dra_dataplane::gateway::{GwFilter, CAN_EFF_FLAG};
/// let only_0x123 = GwFilter::standard(0x123);
/// assert!(only_0x123.matches(0x123));
/// assert!(!only_0x123.matches(0x123 | CAN_EFF_FLAG));
/// assert!(!only_0x123.inverted().matches(0x123));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GwFilter {
    /// Identifier to compare against, with flag bits.
    pub can_id: u32,
    /// Which bits of the identifier (and flags) are compared.
    pub can_mask: u32,
}

impl GwFilter {
    /// A filter with a raw identifier and mask, exactly as the kernel takes them.
    pub const fn new(can_id: u32, can_mask: u32) -> Self {
        Self { can_id, can_mask }
    }

    /// Matches exactly one 11-bit identifier, and no extended frame.
    pub const fn standard(id: u32) -> Self {
        Self::new(id & CAN_SFF_MASK, CAN_EFF_FLAG | CAN_SFF_MASK)
    }

    /// Matches exactly one 29-bit identifier, and no standard frame.
    pub const fn extended(id: u32) -> Self {
        Self::new(
            (id & CAN_EFF_MASK) | CAN_EFF_FLAG,
            CAN_EFF_FLAG | CAN_EFF_MASK,
        )
    }

    /// The same filter with its match inverted.
    pub const fn inverted(self) -> Self {
        Self::new(self.can_id ^ CAN_INV_FILTER, self.can_mask)
    }

    /// Whether this filter lets a frame with identifier word `id` (flag bits included) pass,
    /// following the kernel's rule.
    pub const fn matches(&self, id: u32) -> bool {
        let wanted = self.can_id & !CAN_INV_FILTER;
        let equal = id & self.can_mask == wanted & self.can_mask;
        if self.can_id & CAN_INV_FILTER != 0 {
            !equal
        } else {
            equal
        }
    }

    /// An all-zero filter matches every frame and is never reported by the kernel, so it
    /// is the same rule as no filter at all.
    const fn is_match_all(&self) -> bool {
        self.can_id == 0 && self.can_mask == 0
    }
}

/// One can-gw rule: route frames of one kind from interface `src` to interface `dst`, both
/// given by ifindex in the namespace of the socket used.
///
/// ```
/// use can_dra_dataplane::gateway::{FrameKind, GwRule};
/// let rule = GwRule::mesh(3, 7, FrameKind::Classic);
/// assert!(rule.iif_tx_ok);
/// assert_eq!(rule.to_string(), "can-gw rule if3 -> if7 (classic, iif-tx-ok)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GwRule {
    /// Source interface index.
    pub src: u32,
    /// Destination interface index.
    pub dst: u32,
    /// Classic or FD frames.
    pub frames: FrameKind,
    /// `CGW_FLAGS_CAN_ECHO`: also deliver routed frames to local sockets on `dst`. Needed to
    /// see them on a `vcan` destination; leave it off on mesh rules into a vxcan.
    pub echo: bool,
    /// `CGW_FLAGS_CAN_SRC_TSTAMP`: keep the source receive timestamp.
    pub src_tstamp: bool,
    /// `CGW_FLAGS_CAN_IIF_TX_OK`: route even when `dst` has the ifindex the frame first
    /// entered on (this also permits `src == dst`). Required for pod traffic, see the module docs.
    pub iif_tx_ok: bool,
    /// Route only frames matching this filter; `None` routes every frame.
    pub filter: Option<GwFilter>,
    /// `CGW_LIM_HOPS`: hop limit for this rule (1..=the module's `max_hops`).
    pub limit_hops: Option<u8>,
}

impl GwRule {
    /// A plain rule with no flags, filter or hop limit.
    pub const fn new(src: u32, dst: u32, frames: FrameKind) -> Self {
        Self {
            src,
            dst,
            frames,
            echo: false,
            src_tstamp: false,
            iif_tx_ok: false,
            filter: None,
            limit_hops: None,
        }
    }

    /// The rule the driver's bus mesh uses: `iif_tx_ok` set so pod traffic is never lost
    /// to the cross-namespace first-ingress collision, no echo.
    pub const fn mesh(src: u32, dst: u32, frames: FrameKind) -> Self {
        let mut rule = Self::new(src, dst, frames);
        rule.iif_tx_ok = true;
        rule
    }

    /// The same rule with a filter.
    pub const fn with_filter(mut self, filter: GwFilter) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Checks what the kernel would reject (or silently treat differently), before sending.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.src == 0 || self.dst == 0 {
            return Err("interface index 0 is not an interface");
        }
        if i32::try_from(self.src).is_err() || i32::try_from(self.dst).is_err() {
            return Err("interface index beyond the kernel's range");
        }
        if self.src == self.dst && !self.iif_tx_ok {
            return Err("source equals destination, which the kernel refuses without iif_tx_ok");
        }
        if let Some(hops) = self.limit_hops
            && !(1..=MAX_HOPS).contains(&hops)
        {
            return Err("hop limit must be between 1 and 6");
        }
        Ok(())
    }

    fn flags(&self) -> u16 {
        let mut flags = 0;
        if self.echo {
            flags |= CGW_FLAGS_CAN_ECHO;
        }
        if self.src_tstamp {
            flags |= CGW_FLAGS_CAN_SRC_TSTAMP;
        }
        if self.iif_tx_ok {
            flags |= CGW_FLAGS_CAN_IIF_TX_OK;
        }
        if self.frames == FrameKind::Fd {
            flags |= CGW_FLAGS_CAN_FD;
        }
        flags
    }

    /// The form the kernel stores: an all-zero filter is no filter. Two rules are the same
    /// kernel job exactly when their normalized forms are equal.
    pub fn normalized(&self) -> Self {
        let mut rule = *self;
        if rule.filter.is_some_and(|filter| filter.is_match_all()) {
            rule.filter = None;
        }
        rule
    }

    /// The request payload: `rtcanmsg` followed by the attributes.
    fn encode(&self) -> Vec<u8> {
        let mut payload = rtcanmsg(self.flags()).to_vec();
        let mut attributes = AttributeBuffer::default();
        attributes.push_u32(CGW_SRC_IF, self.src);
        attributes.push_u32(CGW_DST_IF, self.dst);
        if let Some(filter) = self.normalized().filter {
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&filter.can_id.to_ne_bytes());
            bytes[4..].copy_from_slice(&filter.can_mask.to_ne_bytes());
            attributes.push(CGW_FILTER, &bytes);
        }
        if let Some(hops) = self.limit_hops {
            attributes.push_u8(CGW_LIM_HOPS, hops);
        }
        payload.extend_from_slice(attributes.as_bytes());
        payload
    }
}

impl fmt::Display for GwRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.frames {
            FrameKind::Classic => "classic",
            FrameKind::Fd => "fd",
        };
        write!(f, "can-gw rule if{} -> if{} ({kind}", self.src, self.dst)?;
        if self.echo {
            f.write_str(", echo")?;
        }
        if self.src_tstamp {
            f.write_str(", src-tstamp")?;
        }
        if self.iif_tx_ok {
            f.write_str(", iif-tx-ok")?;
        }
        if let Some(filter) = self.filter {
            write!(f, ", filter {:X}:{:X}", filter.can_id, filter.can_mask)?;
        }
        if let Some(hops) = self.limit_hops {
            write!(f, ", hops {hops}")?;
        }
        f.write_str(")")
    }
}

fn rtcanmsg(flags: u16) -> [u8; 4] {
    let flags = flags.to_ne_bytes();
    [AF_CAN, CGW_TYPE_CAN_CAN, flags[0], flags[1]]
}

/// A rule as the kernel reports it, with its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GwRuleStats {
    /// The rule.
    pub rule: GwRule,
    /// Frames routed to the destination.
    pub handled: u32,
    /// Frames lost: destination down, out of memory, or the send failed (e.g. a frame larger
    /// than the destination MTU).
    pub dropped: u32,
    /// Frames discarded by the hop limit (or a modification producing a bad length).
    pub deleted: u32,
    /// The kernel job uses features [`GwRule`] cannot express (frame modifications,
    /// checksums, a user id, unknown flags). Such a rule was not made by this module, is not
    /// equal to `rule` as far as the kernel is concerned, and cannot be deleted through it
    /// (only [`flush`] or removing an interface removes it).
    pub modifies_frames: bool,
}

/// What a reconciliation changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// Rules that were missing and were added.
    pub added: Vec<GwRule>,
    /// Extra copies of desired rules that were removed (each copy forwards every frame once more).
    pub removed_duplicates: Vec<GwRule>,
    /// Managed rules that are no longer desired and were removed.
    pub removed_stale: Vec<GwRule>,
}

/// The operation an error happened in, named in every error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GwOperation {
    /// Adding a rule.
    Add(GwRule),
    /// Deleting a rule.
    Delete(GwRule),
    /// Listing the rules.
    List,
    /// Removing every rule.
    Flush,
}

impl fmt::Display for GwOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Add(rule) => write!(f, "adding {rule}"),
            Self::Delete(rule) => write!(f, "deleting {rule}"),
            Self::List => f.write_str("listing can-gw rules"),
            Self::Flush => f.write_str("flushing can-gw rules"),
        }
    }
}

/// Errors from can-gw operations. Each message names the operation and the rule.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The rule is invalid: found before sending, or the kernel answered `EINVAL` to an add
    /// (e.g. a hop limit above the module's `max_hops`).
    #[error("{operation}: invalid rule: {reason}")]
    InvalidRule {
        /// What was attempted.
        operation: GwOperation,
        /// Why the rule is invalid.
        reason: String,
    },
    /// A delete matched no rule (the kernel answers `EINVAL`).
    #[error("deleting {rule}: no such rule (EINVAL)")]
    NotFound {
        /// The rule that was not found.
        rule: GwRule,
    },
    /// An interface of the rule does not exist in the socket's namespace, or is not a CAN
    /// interface (`ENODEV`).
    #[error("{operation}: interface not found or not a CAN interface (ENODEV)")]
    NoSuchInterface {
        /// What was attempted.
        operation: GwOperation,
    },
    /// The caller lacks `CAP_NET_ADMIN` in the socket's namespace (`EPERM`).
    #[error("{operation}: permission denied, CAP_NET_ADMIN is needed (EPERM)")]
    PermissionDenied {
        /// What was attempted.
        operation: GwOperation,
    },
    /// No handler answered for `AF_CAN` routes: the `can-gw` module is not loaded.
    #[error(
        "{operation}: the can-gw kernel module is not loaded ({errno}); load it with `modprobe can-gw`"
    )]
    ModuleMissing {
        /// What was attempted.
        operation: GwOperation,
        /// The kernel's answer (`EOPNOTSUPP`, `EAFNOSUPPORT` or `EPROTONOSUPPORT`).
        errno: nix::errno::Errno,
    },
    /// Any other netlink or kernel failure.
    #[error("{operation}: {source}")]
    Netlink {
        /// What was attempted.
        operation: GwOperation,
        /// The underlying error.
        #[source]
        source: NetlinkError,
    },
    /// A dump reply could not be decoded.
    #[error("listing can-gw rules: malformed reply: {0}")]
    Malformed(String),
}

fn map_error(operation: GwOperation, source: NetlinkError) -> GatewayError {
    use nix::errno::Errno;
    match (source.errno(), operation) {
        (Some(Errno::EAFNOSUPPORT | Errno::EPROTONOSUPPORT | Errno::EOPNOTSUPP), _) => {
            GatewayError::ModuleMissing {
                operation,
                errno: source.errno().unwrap_or(Errno::EOPNOTSUPP),
            }
        }
        (Some(Errno::ENODEV), _) => GatewayError::NoSuchInterface { operation },
        (Some(Errno::EPERM), _) => GatewayError::PermissionDenied { operation },
        (Some(Errno::EINVAL), GwOperation::Delete(rule)) => GatewayError::NotFound { rule },
        (Some(Errno::EINVAL), GwOperation::Add(_)) => GatewayError::InvalidRule {
            operation,
            reason: "the kernel refused it (EINVAL; a hop limit above the module's max_hops?)"
                .to_string(),
        },
        _ => GatewayError::Netlink { operation, source },
    }
}

fn checked(operation: GwOperation, rule: &GwRule) -> Result<(), GatewayError> {
    rule.validate().map_err(|reason| GatewayError::InvalidRule {
        operation,
        reason: reason.to_string(),
    })
}

/// Adds `rule`, unconditionally: an identical rule already present is **not** detected and
/// frames would then be forwarded twice. Prefer [`ensure`].
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use can_dra_dataplane::{gateway::{self, FrameKind, GwRule}, netlink::RouteSocket};
/// let mut socket = RouteSocket::open()?;
/// gateway::add(&mut socket, &GwRule::mesh(3, 7, FrameKind::Classic))?;
/// # Ok(()) }
/// ```
pub fn add(socket: &mut RouteSocket, rule: &GwRule) -> Result<(), GatewayError> {
    let operation = GwOperation::Add(*rule);
    checked(operation, rule)?;
    socket
        .request(RTM_NEWROUTE, 0, &rule.encode())
        .map_err(|error| map_error(operation, error))?;
    debug!(%rule, "can-gw rule added");
    Ok(())
}

/// Deletes one copy of `rule` (the kernel removes the first identical job). A rule that is
/// not there gives [`GatewayError::NotFound`].
pub fn delete(socket: &mut RouteSocket, rule: &GwRule) -> Result<(), GatewayError> {
    let operation = GwOperation::Delete(*rule);
    checked(operation, rule)?;
    socket
        .request(RTM_DELROUTE, 0, &rule.encode())
        .map_err(|error| map_error(operation, error))?;
    debug!(%rule, "can-gw rule deleted");
    Ok(())
}

/// Lists every rule in the socket's namespace, with counters, in the kernel's order (newest
/// first).
///
/// Without the `can-gw` module the kernel answers the dump with other families' routes;
/// those are skipped, so the list is then empty rather than an error.
pub fn list(socket: &mut RouteSocket) -> Result<Vec<GwRuleStats>, GatewayError> {
    let replies = socket
        .dump(RTM_GETROUTE, &rtcanmsg(0))
        .map_err(|error| map_error(GwOperation::List, error))?;
    let mut rules = Vec::with_capacity(replies.len());
    for reply in replies {
        if reply.message_type != RTM_NEWROUTE {
            continue;
        }
        if let Some(stats) = parse_rule(&reply.payload)? {
            rules.push(stats);
        }
    }
    Ok(rules)
}

/// Removes every rule in the socket's namespace, including rules made by others.
pub fn flush(socket: &mut RouteSocket) -> Result<(), GatewayError> {
    // Both interface attributes present and zero is the kernel's "remove all" request.
    let mut payload = rtcanmsg(0).to_vec();
    let mut attributes = AttributeBuffer::default();
    attributes.push_u32(CGW_SRC_IF, 0);
    attributes.push_u32(CGW_DST_IF, 0);
    payload.extend_from_slice(attributes.as_bytes());
    socket
        .request(RTM_DELROUTE, 0, &payload)
        .map_err(|error| map_error(GwOperation::Flush, error))?;
    info!("all can-gw rules flushed");
    Ok(())
}

/// Adds `rule` unless an identical rule is already present. Returns whether it was added.
/// Costs one dump per call; for many rules use [`ensure_all`].
pub fn ensure(socket: &mut RouteSocket, rule: &GwRule) -> Result<bool, GatewayError> {
    Ok(!ensure_all(socket, std::slice::from_ref(rule))?.is_empty())
}

/// Adds each of `rules` that is not already present, with a single dump. Returns the rules
/// that were added. Every rule is validated before anything is sent, and if an add fails the
/// rules added by this call are removed again, so a failure leaves the rule set as it was.
pub fn ensure_all(socket: &mut RouteSocket, rules: &[GwRule]) -> Result<Vec<GwRule>, GatewayError> {
    for rule in rules {
        checked(GwOperation::Add(*rule), rule)?;
    }
    let present: std::collections::HashSet<GwRule> = list(socket)?
        .into_iter()
        .filter(|stats| !stats.modifies_frames)
        .map(|stats| stats.rule.normalized())
        .collect();
    let mut missing: Vec<GwRule> = Vec::new();
    for rule in rules {
        let rule = rule.normalized();
        if !present.contains(&rule) && !missing.contains(&rule) {
            missing.push(rule);
        }
    }
    add_all_or_none(socket, &missing)?;
    Ok(missing)
}

/// Makes the rules in the namespace match `desired` exactly, within the scope of `managed`:
/// missing desired rules are added, extra copies of desired rules are removed, and rules
/// for which `managed` returns true but which are not desired are removed. Rules outside
/// that scope (made by others) are left alone. One dump, then one request per change.
///
/// Adds happen first and are undone if one fails; removals happen only once every desired
/// rule is in place, so traffic that should flow is never interrupted.
pub fn ensure_exactly(
    socket: &mut RouteSocket,
    desired: &[GwRule],
    managed: impl Fn(&GwRule) -> bool,
) -> Result<Reconciliation, GatewayError> {
    for rule in desired {
        checked(GwOperation::Add(*rule), rule)?;
    }
    let wanted: std::collections::HashSet<GwRule> =
        desired.iter().map(GwRule::normalized).collect();
    let mut seen: HashMap<GwRule, usize> = HashMap::new();
    let mut report = Reconciliation::default();
    for stats in list(socket)? {
        if stats.modifies_frames {
            continue;
        }
        let rule = stats.rule.normalized();
        if wanted.contains(&rule) {
            let copies = seen.entry(rule).or_default();
            *copies += 1;
            if *copies > 1 {
                report.removed_duplicates.push(rule);
            }
        } else if managed(&rule) {
            report.removed_stale.push(rule);
        }
    }
    for rule in desired {
        let rule = rule.normalized();
        if !seen.contains_key(&rule) && !report.added.contains(&rule) {
            report.added.push(rule);
        }
    }
    add_all_or_none(socket, &report.added)?;
    for rule in report
        .removed_duplicates
        .iter()
        .chain(&report.removed_stale)
    {
        match delete(socket, rule) {
            // Gone meanwhile (an interface was removed): the goal is reached anyway.
            Ok(()) | Err(GatewayError::NotFound { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    if report != Reconciliation::default() {
        info!(
            added = report.added.len(),
            duplicates = report.removed_duplicates.len(),
            stale = report.removed_stale.len(),
            "can-gw rules reconciled"
        );
    }
    Ok(report)
}

fn add_all_or_none(socket: &mut RouteSocket, rules: &[GwRule]) -> Result<(), GatewayError> {
    for (done, rule) in rules.iter().enumerate() {
        if let Err(error) = add(socket, rule) {
            for added in &rules[..done] {
                if let Err(undo) = delete(socket, added) {
                    tracing::warn!(%undo, "could not undo a can-gw rule added before a failure");
                }
            }
            return Err(error);
        }
    }
    Ok(())
}

/// Decodes one dump reply payload (`rtcanmsg` + attributes). Returns `None` for replies of
/// other address families; skips attributes it does not know.
fn parse_rule(payload: &[u8]) -> Result<Option<GwRuleStats>, GatewayError> {
    let malformed = |detail: String| GatewayError::Malformed(detail);
    let header = payload
        .get(..4)
        .ok_or_else(|| malformed(format!("{}-byte payload has no rtcanmsg", payload.len())))?;
    if header[0] != AF_CAN {
        return Ok(None);
    }
    if header[1] != CGW_TYPE_CAN_CAN {
        return Err(malformed(format!("unknown gateway type {}", header[1])));
    }
    let flags = u16::from_ne_bytes([header[2], header[3]]);
    let mut src = None;
    let mut dst = None;
    let mut stats = GwRuleStats {
        rule: GwRule::new(0, 0, FrameKind::Classic),
        handled: 0,
        dropped: 0,
        deleted: 0,
        modifies_frames: flags & !KNOWN_FLAGS != 0,
    };
    let u32_of = |kind: u16, value: &[u8]| -> Result<u32, GatewayError> {
        if value.len() != 4 {
            return Err(malformed(format!(
                "attribute {kind} has {} bytes, 4 expected",
                value.len()
            )));
        }
        read_u32(value, 0).map_err(|error| malformed(error.to_string()))
    };
    for attribute in attributes(&payload[4..]) {
        let (kind, value) = attribute.map_err(|error| malformed(error.to_string()))?;
        match kind {
            CGW_HANDLED => stats.handled = u32_of(kind, value)?,
            CGW_DROPPED => stats.dropped = u32_of(kind, value)?,
            CGW_DELETED => stats.deleted = u32_of(kind, value)?,
            CGW_SRC_IF => src = Some(u32_of(kind, value)?),
            CGW_DST_IF => dst = Some(u32_of(kind, value)?),
            CGW_LIM_HOPS => {
                let [hops] = value else {
                    return Err(malformed(format!(
                        "hop limit has {} bytes, 1 expected",
                        value.len()
                    )));
                };
                stats.rule.limit_hops = Some(*hops);
            }
            CGW_FILTER => {
                if value.len() != 8 {
                    return Err(malformed(format!(
                        "filter has {} bytes, 8 expected",
                        value.len()
                    )));
                }
                let can_id = u32_of(kind, &value[..4])?;
                let can_mask = u32_of(kind, &value[4..])?;
                stats.rule.filter = Some(GwFilter::new(can_id, can_mask));
            }
            CGW_MOD_AND..=CGW_CS_CRC8 | CGW_MOD_UID | CGW_FDMOD_AND..=CGW_FDMOD_SET => {
                stats.modifies_frames = true;
            }
            // Attributes added by newer kernels: not needed to identify the rule.
            _ => {}
        }
    }
    let (Some(src), Some(dst)) = (src, dst) else {
        return Err(malformed(
            "rule without source or destination interface".to_string(),
        ));
    };
    stats.rule.src = src;
    stats.rule.dst = dst;
    stats.rule.frames = if flags & CGW_FLAGS_CAN_FD != 0 {
        FrameKind::Fd
    } else {
        FrameKind::Classic
    };
    stats.rule.echo = flags & CGW_FLAGS_CAN_ECHO != 0;
    stats.rule.src_tstamp = flags & CGW_FLAGS_CAN_SRC_TSTAMP != 0;
    stats.rule.iif_tx_ok = flags & CGW_FLAGS_CAN_IIF_TX_OK != 0;
    Ok(Some(stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{NLM_F_ACK, NLM_F_REQUEST, encode_message};

    fn ne32(value: u32) -> [u8; 4] {
        value.to_ne_bytes()
    }

    #[test]
    fn add_request_is_encoded_byte_for_byte() {
        let rule = GwRule {
            src: 3,
            dst: 7,
            frames: FrameKind::Fd,
            echo: true,
            src_tstamp: false,
            iif_tx_ok: true,
            filter: Some(GwFilter::new(0x123, 0x7ff)),
            limit_hops: Some(2),
        };
        let message =
            encode_message(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK, 9, &rule.encode()).unwrap();

        let mut expected = Vec::new();
        // nlmsghdr: length 16 + rtcanmsg 4 + SRC_IF 8 + DST_IF 8 + FILTER 12 + LIM_HOPS 8 = 56.
        expected.extend(ne32(56));
        expected.extend(24u16.to_ne_bytes()); // RTM_NEWROUTE
        expected.extend(5u16.to_ne_bytes()); // REQUEST | ACK
        expected.extend(ne32(9)); // sequence
        expected.extend(ne32(0)); // port: the kernel
        // rtcanmsg: AF_CAN, CGW_TYPE_CAN_CAN, flags ECHO 1 | IIF_TX_OK 4 | FD 8 = 0x0d.
        expected.extend([29, 1]);
        expected.extend(0x0du16.to_ne_bytes());
        // CGW_SRC_IF (9): length 8, u32 3.
        expected.extend(8u16.to_ne_bytes());
        expected.extend(9u16.to_ne_bytes());
        expected.extend(ne32(3));
        // CGW_DST_IF (10): length 8, u32 7.
        expected.extend(8u16.to_ne_bytes());
        expected.extend(10u16.to_ne_bytes());
        expected.extend(ne32(7));
        // CGW_FILTER (11): length 12, can_filter { can_id 0x123, can_mask 0x7ff }.
        expected.extend(12u16.to_ne_bytes());
        expected.extend(11u16.to_ne_bytes());
        expected.extend(ne32(0x123));
        expected.extend(ne32(0x7ff));
        // CGW_LIM_HOPS (13): length 5, u8 2, three padding bytes.
        expected.extend(5u16.to_ne_bytes());
        expected.extend(13u16.to_ne_bytes());
        expected.extend([2, 0, 0, 0]);
        assert_eq!(message, expected);
    }

    #[test]
    fn plain_rule_sends_only_the_interfaces() {
        let payload = GwRule::new(4, 5, FrameKind::Classic).encode();
        let mut expected = vec![29, 1, 0, 0];
        expected.extend(8u16.to_ne_bytes());
        expected.extend(9u16.to_ne_bytes());
        expected.extend(ne32(4));
        expected.extend(8u16.to_ne_bytes());
        expected.extend(10u16.to_ne_bytes());
        expected.extend(ne32(5));
        assert_eq!(payload, expected);
    }

    #[test]
    fn match_all_filter_is_not_sent_and_equals_no_filter() {
        let with = GwRule::new(4, 5, FrameKind::Classic).with_filter(GwFilter::new(0, 0));
        let without = GwRule::new(4, 5, FrameKind::Classic);
        assert_eq!(with.encode(), without.encode());
        assert_eq!(with.normalized(), without);
    }

    /// A dump reply as the kernel builds it: counters, hop limit, filter, then interfaces.
    fn dump_reply(flags: u16) -> Vec<u8> {
        let mut payload = vec![29, 1];
        payload.extend(flags.to_ne_bytes());
        let mut attrs = AttributeBuffer::default();
        attrs.push_u32(CGW_HANDLED, 42);
        attrs.push_u32(CGW_DROPPED, 2);
        attrs.push_u32(CGW_DELETED, 1);
        attrs.push_u8(CGW_LIM_HOPS, 1);
        let mut filter = ne32(0x1234_5678 | CAN_EFF_FLAG | CAN_INV_FILTER).to_vec();
        filter.extend(ne32(CAN_EFF_FLAG | CAN_EFF_MASK));
        attrs.push(CGW_FILTER, &filter);
        attrs.push_u32(CGW_SRC_IF, 11);
        attrs.push_u32(CGW_DST_IF, 12);
        payload.extend(attrs.as_bytes());
        payload
    }

    #[test]
    fn dump_reply_with_counters_and_filter_is_parsed() {
        let stats = parse_rule(&dump_reply(0x04 | 0x02)).unwrap().unwrap();
        assert_eq!(
            stats,
            GwRuleStats {
                rule: GwRule {
                    src: 11,
                    dst: 12,
                    frames: FrameKind::Classic,
                    echo: false,
                    src_tstamp: true,
                    iif_tx_ok: true,
                    filter: Some(GwFilter::extended(0x1234_5678).inverted()),
                    limit_hops: Some(1),
                },
                handled: 42,
                dropped: 2,
                deleted: 1,
                modifies_frames: false,
            }
        );
    }

    #[test]
    fn absent_counters_are_zero_and_fd_flag_selects_fd() {
        let mut payload = vec![29, 1];
        payload.extend(0x08u16.to_ne_bytes());
        let mut attrs = AttributeBuffer::default();
        attrs.push_u32(CGW_SRC_IF, 2);
        attrs.push_u32(CGW_DST_IF, 3);
        payload.extend(attrs.as_bytes());
        let stats = parse_rule(&payload).unwrap().unwrap();
        assert_eq!(stats.rule, GwRule::new(2, 3, FrameKind::Fd));
        assert_eq!((stats.handled, stats.dropped, stats.deleted), (0, 0, 0));
    }

    #[test]
    fn unknown_attributes_are_skipped() {
        let mut payload = dump_reply(0);
        let mut extra = AttributeBuffer::default();
        extra.push(99, &[1, 2, 3]);
        payload.extend(extra.as_bytes());
        let stats = parse_rule(&payload).unwrap().unwrap();
        assert_eq!(stats.handled, 42);
        assert_eq!(stats.rule.dst, 12);
    }

    #[test]
    fn modification_attributes_mark_the_rule_as_foreign() {
        let mut payload = dump_reply(0);
        let mut extra = AttributeBuffer::default();
        extra.push(CGW_MOD_AND, &[0u8; 17]);
        payload.extend(extra.as_bytes());
        assert!(parse_rule(&payload).unwrap().unwrap().modifies_frames);
        // An unknown flag bit is just as foreign: the kernel would not match our rule to it.
        assert!(
            parse_rule(&dump_reply(0x40))
                .unwrap()
                .unwrap()
                .modifies_frames
        );
    }

    #[test]
    fn truncated_or_short_input_is_an_error_not_a_panic() {
        let full = dump_reply(0);
        for cut in 0..full.len() {
            // Cuts inside the header or an attribute are errors; cuts between attributes
            // lose the interfaces, also an error. Nothing may panic.
            assert!(parse_rule(&full[..cut]).is_err(), "cut at {cut}");
        }
        let mut wrong_size = vec![29, 1, 0, 0];
        let mut attrs = AttributeBuffer::default();
        attrs.push(CGW_SRC_IF, &[1, 2]);
        attrs.push_u32(CGW_DST_IF, 3);
        wrong_size.extend(attrs.as_bytes());
        assert!(matches!(
            parse_rule(&wrong_size),
            Err(GatewayError::Malformed(_))
        ));
    }

    #[test]
    fn other_families_are_ignored() {
        // An IPv4 route header (rtmsg starts with AF_INET = 2), as dumped without can-gw.
        assert!(
            parse_rule(&[2, 32, 0, 0, 254, 0, 0, 1, 0, 0, 0, 0])
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn validation_rejects_what_the_kernel_would() {
        let plain = GwRule::new(3, 4, FrameKind::Classic);
        assert!(plain.validate().is_ok());
        assert!(GwRule::new(0, 4, FrameKind::Classic).validate().is_err());
        assert!(GwRule::new(3, 0, FrameKind::Classic).validate().is_err());
        assert!(GwRule::new(3, 3, FrameKind::Classic).validate().is_err());
        assert!(GwRule::mesh(3, 3, FrameKind::Classic).validate().is_ok());
        assert!(
            GwRule::new(u32::MAX, 4, FrameKind::Classic)
                .validate()
                .is_err()
        );
        for (hops, ok) in [(0, false), (1, true), (6, true), (7, false)] {
            let rule = GwRule {
                limit_hops: Some(hops),
                ..plain
            };
            assert_eq!(rule.validate().is_ok(), ok, "hops {hops}");
        }
    }

    #[test]
    fn errors_map_to_actionable_variants() {
        use nix::errno::Errno;
        let rule = GwRule::new(3, 4, FrameKind::Classic);
        let kernel = |errno| NetlinkError::Kernel { errno };
        let missing = map_error(GwOperation::Add(rule), kernel(Errno::EOPNOTSUPP));
        assert!(matches!(missing, GatewayError::ModuleMissing { .. }));
        assert!(missing.to_string().contains("modprobe can-gw"), "{missing}");
        assert!(matches!(
            map_error(GwOperation::Delete(rule), kernel(Errno::EINVAL)),
            GatewayError::NotFound { .. }
        ));
        let invalid = map_error(GwOperation::Add(rule), kernel(Errno::EINVAL));
        assert!(matches!(invalid, GatewayError::InvalidRule { .. }));
        assert!(invalid.to_string().contains("if3 -> if4"), "{invalid}");
        let nodev = map_error(GwOperation::Add(rule), kernel(Errno::ENODEV));
        assert_eq!(
            nodev.to_string(),
            "adding can-gw rule if3 -> if4 (classic): interface not found or not a CAN interface (ENODEV)"
        );
        assert!(matches!(
            map_error(GwOperation::Flush, kernel(Errno::EPERM)),
            GatewayError::PermissionDenied { .. }
        ));
    }

    #[test]
    fn filters_follow_the_kernel_match_rule() {
        let standard = GwFilter::standard(0x7ff);
        assert!(standard.matches(0x7ff));
        assert!(!standard.matches(0x7fe));
        assert!(!standard.matches(0x7ff | CAN_EFF_FLAG));
        let extended = GwFilter::extended(0x1abc_def0);
        assert!(extended.matches(0x1abc_def0 | CAN_EFF_FLAG));
        assert!(!extended.matches(0x0f0));
        assert!(extended.inverted().matches(0x0f0));
        assert_eq!(extended.inverted().inverted(), extended);
    }
}
