//! Shared set-up for tests that run the node driver in-process against the API server double:
//! its parts in a temporary directory, the usual `body` bus, and a checkpoint with one prepared
//! claim.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use can_dra_api::Bitrate;
use can_dra_kubelet_plugin::cdi::CdiWriter;
use can_dra_kubelet_plugin::checkpoint::CheckpointStore;
use can_dra_kubelet_plugin::claim_status::StatusWriter;
use can_dra_kubelet_plugin::claims::ClaimReader;
use can_dra_kubelet_plugin::inventory::{Inventory, VirtualBus};
use can_dra_kubelet_plugin::node::{
    Attachment, MemberParams, NodeParts, PreparedClaim, PreparedMember,
};

pub use crate::api_support::{DRIVER, NODE};

/// The hook path the CDI specs name.
pub const HOOK: &str = "/opt/can-dra/bin/hook";

/// A node with one virtual bus `body` (500 kbit/s, classic) of `slots` slots.
pub fn body_bus(slots: u32) -> Inventory {
    Inventory {
        physical: Vec::new(),
        virtual_buses: vec![VirtualBus {
            name: "body".into(),
            bitrate: Bitrate::from_bits_per_second(500_000).unwrap(),
            fd: false,
            data_bitrate: None,
            slots,
        }],
    }
}

/// The parts of a driver for [`NODE`] serving `inventory`, talking to the API server behind
/// `client`, with its CDI specs in `<root>/cdi` (naming [`HOOK`]) and its checkpoint in
/// `<root>/checkpoint.json`. Override fields with struct update syntax.
pub fn node_parts(root: &Path, client: &kube::Client, inventory: Inventory) -> NodeParts {
    NodeParts {
        driver: DRIVER.into(),
        node: NODE.into(),
        inventory,
        claims: ClaimReader::new(client.clone(), DRIVER),
        status: StatusWriter::new(client.clone(), DRIVER),
        cdi: CdiWriter::new(root.join("cdi"), DRIVER, HOOK),
        checkpoint: CheckpointStore::new(root.join("checkpoint.json")),
    }
}

/// A prepared claim `namespace/name` with one member: request `request` on node-local device
/// `device` of bus `bus`, interface `interface`, read-write, unshaped, attached as
/// `attachment`.
pub fn prepared_claim(
    name: &str,
    request: &str,
    (device, bus, interface): (&str, &str, &str),
    cdi_device_id: &str,
    attachment: Option<Attachment>,
) -> PreparedClaim {
    PreparedClaim {
        namespace: "ns".into(),
        name: name.into(),
        devices: vec![PreparedMember {
            request: request.into(),
            pool: NODE.into(),
            device: device.into(),
            share_id: None,
            bus: bus.into(),
            shared_fd: None,
            member: MemberParams::new(interface),
            cdi_device_id: cdi_device_id.into(),
            attachment,
        }],
        status_pending: false,
        status_written_unsaved: false,
    }
}
