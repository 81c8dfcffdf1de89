//! The can-dra cluster controller's library: what the controller does with `CanBus` resources
//! (the type itself, pool naming and the pool publisher are the cluster model's, in
//! `can-dra-cluster`): their pools' ResourceSlices, their status, and clean-up.
//!
//! - [`bus_pool`]: a bus's pool (its member slots as devices) and publishing it.
//! - [`cleanup`]: removing the node-local slices of deleted nodes.
//! - [`lease`]: leader election over a coordination.k8s.io Lease.
//! - [`membership`]: which nodes host members of a bus, their tunnel endpoints, tunnel ports.
//! - [`reconciler`]: one bus's reconcile: its slices, then its status.
//! - [`status`]: what a bus's status should say and the patch that makes it so.

#![forbid(unsafe_code)]

pub mod bus_pool;
pub mod cleanup;
pub mod lease;
pub mod membership;
pub mod reconciler;
pub mod status;
