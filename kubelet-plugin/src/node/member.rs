//! The one place that computes a member's behaviour from its resolved claim: the api's validated
//! [`ResolvedMember`] becomes [`MemberParams`] at prepare, and [`MemberParams::spec`] the data
//! plane's [`MemberSpec`] once the hook names the namespace.
//!
//! [`MemberParams`] is what the checkpoint records of a member: a [`MemberSpec`] without the id
//! and namespace it only gets at attach. It is its own type because it is part of the
//! checkpoint's on-disk schema, which must stay readable across releases whatever the data
//! plane's model does.

use can_dra_api::{FrameFormat, ResolvedMember, ShapingDirection};
use can_dra_dataplane::bus::model::{Access, CanFilter, MemberShaping, MemberSpec, NetnsRef};
use serde::{Deserialize, Serialize};

/// A [`MemberSpec`] without its id and namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberParams {
    /// The interface name inside the pod.
    pub interface: String,
    /// Whether the member's link carries CAN FD frames.
    pub fd: bool,
    /// Whether the member may transmit.
    pub access: Access,
    /// Frames the member may send; empty allows everything.
    #[serde(default)]
    pub transmit_allow: Vec<CanFilter>,
    /// Frames delivered to the member; empty delivers everything.
    #[serde(default)]
    pub receive_filters: Vec<CanFilter>,
    /// Shaping towards the pod.
    #[serde(default)]
    pub rx_shaping: Option<MemberShaping>,
    /// Shaping of what the pod sends.
    #[serde(default)]
    pub tx_shaping: Option<MemberShaping>,
}

impl MemberParams {
    /// A classic member `interface` that may send and receives every frame, unshaped.
    pub fn new(interface: impl Into<String>) -> Self {
        Self {
            interface: interface.into(),
            fd: false,
            access: Access::ReadWrite,
            transmit_allow: Vec::new(),
            receive_filters: Vec::new(),
            rx_shaping: None,
            tx_shaping: None,
        }
    }

    /// The parameters of a resolved member on a bus that is (or is not) FD.
    pub fn from_resolved(member: &ResolvedMember, bus_fd: bool) -> Self {
        let filters = |list: &[can_dra_api::CanFilter]| -> Vec<CanFilter> {
            list.iter()
                .map(|f| CanFilter {
                    id: f.id,
                    mask: f.mask,
                    extended: f.extended,
                    invert: f.invert,
                })
                .collect()
        };
        let mut access = match member.access {
            can_dra_api::Access::ReadWrite => Access::ReadWrite,
            can_dra_api::Access::ListenOnly => Access::ListenOnly,
        };
        // An explicit but empty allow-list permits nothing, while the data plane reads an empty
        // list as "everything": say it as listen-only instead.
        if member.transmit_allow.as_ref().is_some_and(Vec::is_empty) {
            access = Access::ListenOnly;
        }
        Self {
            interface: member.interface_name.as_str().to_owned(),
            fd: match member.frame_format {
                Some(FrameFormat::Fd) => true,
                Some(FrameFormat::Classic) => false,
                None => bus_fd,
            },
            access,
            transmit_allow: filters(member.transmit_allow.as_deref().unwrap_or_default()),
            receive_filters: filters(&member.receive_filters),
            rx_shaping: shaping(&member.shaping.rx),
            tx_shaping: shaping(&member.shaping.tx),
        }
    }

    /// The full member spec for a namespace.
    pub fn spec(&self, id: impl Into<String>, netns: NetnsRef) -> MemberSpec {
        MemberSpec {
            id: id.into(),
            netns,
            interface: self.interface.clone(),
            fd: self.fd,
            access: self.access,
            transmit_allow: self.transmit_allow.clone(),
            receive_filters: self.receive_filters.clone(),
            rx_shaping: self.rx_shaping,
            tx_shaping: self.tx_shaping,
        }
    }
}

/// The data plane's shaping of one direction; `None` when it changes nothing.
fn shaping(direction: &ShapingDirection) -> Option<MemberShaping> {
    let micros = |d: std::time::Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    let shaping = MemberShaping {
        bitrate: direction.bitrate.map(|b| b.bits_per_second()),
        data_bitrate: direction.data_bitrate.map(|b| b.bits_per_second()),
        delay_us: micros(direction.delay),
        jitter_us: micros(direction.jitter),
        loss_ppm: direction.loss.millionths(),
        duplicate_ppm: direction.duplicate.millionths(),
    };
    (!shaping.is_neutral()).then_some(shaping)
}
