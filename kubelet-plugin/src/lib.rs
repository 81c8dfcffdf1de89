//! The can-dra node daemon: the kubelet DRA plugin and its CDI hook.
//!
//! Modules:
//! - [`node`]: the node driver joining claims, checkpoint, CDI, status and the data plane, one
//!   submodule per lifecycle step (prepare, attach, unprepare, recover).
//! - [`plane`]: the one handle on the node's buses, shared by the node driver and the tunnels.
//! - [`claims`]: ResourceClaims fetched, checked and resolved into members for a prepare.
//! - [`claim_status`]: this driver's entries in `ResourceClaim.status.devices`.
//! - [`checkpoint`]: the versioned, atomically written record of prepared claims.
//! - [`cdi`]: per-claim CDI specs (environment plus the `createRuntime` hook).
//! - [`hook_socket`]: the socket protocol from the CDI hook to the daemon (attach a member to a
//!   container); what the attach does lives in `node::attach`.
//! - [`files`]: crash-safe file writes for the checkpoint and the CDI specs.
//! - [`inventory`]: the node's CAN inventory and the devices it offers in the slices.
//! - [`adapters`]: following the node's CAN adapters into the served slots and the slices.
//! - [`slices`]: publishing the node's pool as ResourceSlices and keeping it current.
//! - [`shared_buses`]: reading cluster-wide buses (CanBus resources) as the node needs them.
//! - [`tunnels`]: one tunnel endpoint per cluster-wide bus, joined to the node's bus mesh.
//! - [`cli`]: the daemon's flags, each with an environment variable.
//! - [`logging`]: `tracing` set-up shared by the binaries (text or JSON).
//!
//! The node driver implements the `Driver` trait of the `dra-kubeletplugin` crate, which serves
//! it to the kubelet (registration, DRA v1/v1beta1, health, sockets, serialisation). The kernel
//! work itself lives in the `can-dra-dataplane` crate; the wire contracts with the kubelet in
//! `can-dra-proto`; the claim parameters in `can-dra-api`.

#![forbid(unsafe_code)]

pub mod adapters;
pub mod cdi;
pub mod checkpoint;
pub mod claim_status;
pub mod claims;
pub mod cli;
pub mod files;
pub mod hook_socket;
pub mod inventory;
pub mod logging;
pub mod node;
pub mod plane;
pub mod shared_buses;
pub mod slices;
pub mod tunnels;

/// The default driver name; every other name (CDI kind, API group) derives from it.
pub const DEFAULT_DRIVER_NAME: &str = "can.dra.dev";
