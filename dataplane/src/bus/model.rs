//! The desired state of the node's buses: plain data, serialisable, so the kubelet plugin can
//! keep it in its checkpoint and hand it back to [`reconcile`](super::reconcile) after a restart.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Every bus this node should carry, with their members.
///
/// ```
/// use can_dra_dataplane::bus::model::{BusSpec, DesiredState};
/// let state = DesiredState { buses: vec![BusSpec::new("body")] };
/// assert_eq!(state.bus("body").map(|bus| bus.fd), Some(false));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// The buses, each with a unique name.
    #[serde(default)]
    pub buses: Vec<BusSpec>,
}

impl DesiredState {
    /// The bus called `name`, if any.
    pub fn bus(&self, name: &str) -> Option<&BusSpec> {
        self.buses.iter().find(|bus| bus.name == name)
    }

    /// The bus called `name`, mutably.
    pub fn bus_mut(&mut self, name: &str) -> Option<&mut BusSpec> {
        self.buses.iter_mut().find(|bus| bus.name == name)
    }
}

/// One shared CAN bus: its members, and optionally a physical controller and a tunnel endpoint
/// that take part in the mesh like members do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusSpec {
    /// The bus name, unique on the node (used in messages and logs).
    pub name: String,
    /// Whether the bus carries CAN FD frames. Members may ask for FD only on an FD bus.
    #[serde(default)]
    pub fd: bool,
    /// A host interface (a CAN controller, or a `vcan` stand-in) that is part of the bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical: Option<String>,
    /// A host interface that carries the bus to other nodes (the tunnel's local end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<String>,
    /// The members, each with an id unique on the node.
    #[serde(default)]
    pub members: Vec<MemberSpec>,
}

impl BusSpec {
    /// A classic bus with no members and no external interfaces.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            fd: false,
            physical: None,
            tunnel: None,
            members: Vec::new(),
        }
    }

    /// The member with `id`, if any.
    pub fn member(&self, id: &str) -> Option<&MemberSpec> {
        self.members.iter().find(|member| member.id == id)
    }
}

/// Where a member's network namespace is found.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NetnsRef {
    /// A namespace file such as `/run/netns/NAME` or `/proc/PID/ns/net`.
    Path(PathBuf),
    /// The namespace of a process.
    Pid(u32),
}

impl fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(path) => write!(f, "{}", path.display()),
            Self::Pid(pid) => write!(f, "/proc/{pid}/ns/net"),
        }
    }
}

/// Whether a member may put frames on the bus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Access {
    /// The member sends and receives.
    #[default]
    ReadWrite,
    /// The member only receives: no rule carries its frames, and the access module drops and
    /// counts whatever it sends.
    ListenOnly,
}

/// A CAN identifier filter: a frame matches when `frame_id & mask == id & mask`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanFilter {
    /// The identifier (11 or 29 bits).
    pub id: u32,
    /// The bits of the identifier that must match.
    pub mask: u32,
    /// Whether this filter is about extended (29-bit) identifiers.
    #[serde(default)]
    pub extended: bool,
    /// Match every frame the filter would not match.
    #[serde(default)]
    pub invert: bool,
}

/// How one direction of a member's link is shaped, as desired state. Its netlink form is
/// [`crate::shaping::Shaping`]; the one conversion between the two is in [`super::system`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MemberShaping {
    /// Emulated bus bitrate in bit/s (converted to a byte rate per frame kind by the shaping
    /// module); `None` leaves the rate unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitrate: Option<u32>,
    /// CAN FD data-phase bitrate in bit/s (bit rate switching); needs `bitrate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_bitrate: Option<u32>,
    /// Added delay in microseconds.
    #[serde(default)]
    pub delay_us: u32,
    /// Delay variation in microseconds.
    #[serde(default)]
    pub jitter_us: u32,
    /// Frames lost, in parts per million.
    #[serde(default)]
    pub loss_ppm: u32,
    /// Frames duplicated, in parts per million.
    #[serde(default)]
    pub duplicate_ppm: u32,
}

impl MemberShaping {
    /// Whether this shaping changes nothing (so no qdisc is needed).
    pub fn is_neutral(&self) -> bool {
        *self == Self::default()
    }
}

/// One pod's (or one consumer's) tap onto a bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MemberSpec {
    /// A stable id, unique on the node (e.g. claim UID and request); the host end's name is
    /// derived from it.
    pub id: String,
    /// The member's network namespace.
    pub netns: NetnsRef,
    /// The interface name inside the member's namespace, e.g. `can0`.
    pub interface: String,
    /// Whether the member's link carries CAN FD frames (MTU 72) or classic only (MTU 16).
    #[serde(default)]
    pub fd: bool,
    /// Whether the member may transmit.
    #[serde(default)]
    pub access: Access,
    /// Frames the member may send; empty allows everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transmit_allow: Vec<CanFilter>,
    /// Frames the member receives; empty delivers everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub receive_filters: Vec<CanFilter>,
    /// Shaping of frames delivered to the member (applied on the host end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_shaping: Option<MemberShaping>,
    /// Shaping of frames the member sends (applied on the member's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_shaping: Option<MemberShaping>,
}

impl MemberSpec {
    /// A read-write classic member with no filters and no shaping.
    pub fn new(id: impl Into<String>, netns: NetnsRef, interface: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            netns,
            interface: interface.into(),
            fd: false,
            access: Access::ReadWrite,
            transmit_allow: Vec::new(),
            receive_filters: Vec::new(),
            rx_shaping: None,
            tx_shaping: None,
        }
    }

    /// The MTU of both ends of the member's link.
    pub fn mtu(&self) -> u32 {
        if self.fd { CANFD_MTU } else { CAN_MTU }
    }

    /// Whether frames from this member are routed onto the bus.
    pub fn transmits(&self) -> bool {
        self.access == Access::ReadWrite
    }

    /// The access policy the host end needs, or `None` when the member is unrestricted. The
    /// policy is in canonical form (sorted, no duplicates, no allow-list when listen-only), the
    /// form the kernel state reads back as.
    pub fn access_policy(&self) -> Option<MemberAccess> {
        let canonical = |filters: &[CanFilter]| {
            let mut filters = filters.to_vec();
            filters.sort_unstable();
            filters.dedup();
            filters
        };
        let listen_only = self.access == Access::ListenOnly;
        let policy = MemberAccess {
            listen_only,
            transmit_allow: if listen_only {
                Vec::new()
            } else {
                canonical(&self.transmit_allow)
            },
            receive_filters: canonical(&self.receive_filters),
        };
        (!policy.is_open()).then_some(policy)
    }

    /// Shaping that actually changes something, per direction.
    pub fn effective_rx_shaping(&self) -> Option<MemberShaping> {
        self.rx_shaping.filter(|shape| !shape.is_neutral())
    }

    /// Shaping that actually changes something, per direction.
    pub fn effective_tx_shaping(&self) -> Option<MemberShaping> {
        self.tx_shaping.filter(|shape| !shape.is_neutral())
    }
}

/// `CAN_MTU`: the size of a classic `can_frame`.
pub const CAN_MTU: u32 = 16;
/// `CANFD_MTU`: the size of a `canfd_frame`.
pub const CANFD_MTU: u32 = 72;

/// The access a member's host end must enforce, as desired state. Its netlink form is
/// [`crate::access::AccessPolicy`]; the one conversion between the two is in [`super::system`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MemberAccess {
    /// Drop (and count) everything the member sends.
    pub listen_only: bool,
    /// Frames the member may send; empty allows everything.
    pub transmit_allow: Vec<CanFilter>,
    /// Frames delivered to the member; empty delivers everything.
    pub receive_filters: Vec<CanFilter>,
}

impl MemberAccess {
    /// Whether the policy restricts nothing (so no classifier is needed).
    pub fn is_open(&self) -> bool {
        !self.listen_only && self.transmit_allow.is_empty() && self.receive_filters.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_state_round_trips_through_json() {
        let mut member = MemberSpec::new("claim-1/can", NetnsRef::Pid(42), "can0");
        member.fd = true;
        member.transmit_allow.push(CanFilter {
            id: 0x123,
            mask: 0x7ff,
            extended: false,
            invert: false,
        });
        member.rx_shaping = Some(MemberShaping {
            bitrate: Some(500_000),
            delay_us: 1000,
            ..MemberShaping::default()
        });
        let mut bus = BusSpec::new("body");
        bus.fd = true;
        bus.physical = Some("can0".into());
        bus.members.push(member);
        let state = DesiredState { buses: vec![bus] };
        let json = serde_json::to_string(&state).unwrap();
        let back: DesiredState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
    }

    #[test]
    fn unknown_fields_in_a_checkpoint_are_rejected() {
        let json = r#"{"buses":[{"name":"b","members":[],"hub":true}]}"#;
        let error = serde_json::from_str::<DesiredState>(json).unwrap_err();
        assert!(error.to_string().contains("hub"), "{error}");
    }

    #[test]
    fn access_policy_is_none_for_an_unrestricted_member() {
        let mut member = MemberSpec::new("m", NetnsRef::Pid(1), "can0");
        assert_eq!(member.access_policy(), None);
        member.access = Access::ListenOnly;
        assert!(member.access_policy().is_some_and(|p| p.listen_only));
    }

    #[test]
    fn neutral_shaping_is_dropped() {
        let mut member = MemberSpec::new("m", NetnsRef::Pid(1), "can0");
        member.rx_shaping = Some(MemberShaping::default());
        assert_eq!(member.effective_rx_shaping(), None);
        assert_eq!(member.mtu(), 16);
        member.fd = true;
        assert_eq!(member.mtu(), 72);
    }
}
