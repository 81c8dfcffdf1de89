//! The can-dra cluster controller's library: the `CanBus` custom resource (a virtual CAN bus that
//! spans nodes, group `can.dra.dev`, version `v1alpha1`) and the ResourceSlices the controller
//! publishes for it.
//!
//! - [`canbus`]: the resource, its CRD and the checks its schema cannot express.
//! - [`lease`]: leader election over a coordination.k8s.io Lease.
//! - [`slices`]: the desired ResourceSlices of a bus's pool, and a publisher that keeps them current.

#![forbid(unsafe_code)]

pub mod canbus;
pub mod lease;
pub mod slices;
