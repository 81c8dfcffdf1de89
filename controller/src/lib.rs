//! The can-dra cluster controller's library: the `CanBus` custom resource (a virtual CAN bus that
//! spans nodes, group `can.dra.dev`, version `v1alpha1`) and the ResourceSlices the controller
//! publishes for it.
//!
//! - [`canbus`]: the resource, its CRD and the checks its schema cannot express.

#![forbid(unsafe_code)]

pub mod canbus;
