//! The can-dra cluster controller's library: the `CanBus` custom resource (a virtual CAN bus that
//! spans nodes, group `can.dra.dev`, version `v1alpha1`) and the ResourceSlices the controller
//! publishes for it.
//!
//! - [`canbus`]: the resource, its CRD and the checks its schema cannot express.
//! - [`cleanup`]: removing the node-local slices of deleted nodes.
//! - [`lease`]: leader election over a coordination.k8s.io Lease.
//! - [`membership`]: which nodes host members of a bus, their tunnel endpoints, tunnel ports.
//! - [`reconciler`]: one bus's reconcile: its slices, then its status.
//! - [`slices`]: the desired ResourceSlices of a bus's pool, and a publisher that keeps them current.
//! - [`status`]: what a bus's status should say and the patch that makes it so.

#![forbid(unsafe_code)]

pub mod canbus;
pub mod cleanup;
pub mod lease;
pub mod membership;
pub mod reconciler;
pub mod slices;
pub mod status;
