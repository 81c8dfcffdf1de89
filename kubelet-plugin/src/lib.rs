//! The can-dra node daemon: the kubelet DRA plugin and its CDI hook.
//!
//! Responsibilities (growing with the project):
//! - [`cli`]: the daemon's flags, each with an environment variable.
//! - [`logging`]: `tracing` set-up shared by the binaries (text or JSON).
//! - [`cdi`]: per-claim CDI specs (environment plus the `createRuntime` hook).
//! - [`files`]: crash-safe file writes for the checkpoint and the CDI specs.
//!
//! The kernel work itself lives in the `can-dra-dataplane` crate; the wire contracts with the
//! kubelet in `can-dra-proto`; the claim parameters in `can-dra-api`.

#![forbid(unsafe_code)]

pub mod cdi;
pub mod cli;
pub mod files;
pub mod logging;

/// The default driver name; every other name (CDI kind, API group) derives from it.
pub const DEFAULT_DRIVER_NAME: &str = "can.dra.dev";
