//! The can-dra node daemon: the kubelet DRA plugin and its CDI hook.
//!
//! Responsibilities (growing with the project):
//! - [`adapters`]: following the node's CAN adapters into the served slots and the slices.
//! - [`authority`]: a transport shim that lets the gRPC servers accept any HTTP/2 `:authority`
//!   (the kubelet's registration dial sends the socket path, which h2 refuses).
//! - [`cli`]: the daemon's flags, each with an environment variable.
//! - [`logging`]: `tracing` set-up shared by the binaries (text or JSON).
//! - [`cdi`]: per-claim CDI specs (environment plus the `createRuntime` hook).
//! - [`checkpoint`]: the versioned, atomically written record of prepared claims.
//! - [`hook`]: the channel from the CDI hook to the daemon (attach a member to a container).
//! - [`node`]: the node driver joining claims, checkpoint, CDI, status and the data plane.
//! - [`plane`]: the one handle on the node's buses, shared by the node driver and the tunnels.
//! - [`files`]: crash-safe file writes for the checkpoint and the CDI specs.
//! - [`canbuses`]: cluster-wide buses (CanBus resources) as the node reads them.
//! - [`tunnels`]: one tunnel endpoint per cluster-wide bus, joined to the node's bus mesh.
//!
//! The kernel work itself lives in the `can-dra-dataplane` crate; the wire contracts with the
//! kubelet in `can-dra-proto`; the claim parameters in `can-dra-api`.

#![forbid(unsafe_code)]

pub mod adapters;
pub mod authority;
pub mod canbuses;
pub mod cdi;
pub mod checkpoint;
pub mod claims;
pub mod cli;
pub mod dra;
pub mod driver;
pub mod files;
pub mod health;
pub mod hook;
pub mod inventory;
pub mod logging;
pub mod node;
pub mod plane;
pub mod registration;
pub mod server;
pub mod slices;
pub mod sockets;
pub mod status;
pub mod tunnels;

/// The default driver name; every other name (CDI kind, API group) derives from it.
pub const DEFAULT_DRIVER_NAME: &str = "can.dra.dev";
