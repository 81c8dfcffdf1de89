//! The can-dra cluster model, shared by the controller and the node daemon: what both read from
//! and write to the Kubernetes API about buses and pools, in one place so that the two binaries
//! cannot drift apart.
//!
//! - [`canbus`]: the `CanBus` custom resource (a virtual CAN bus that spans nodes, group
//!   `can.dra.dev`, version `v1alpha1`), its CRD and the checks its schema cannot express.
//! - [`naming`]: pool and slice names (`canbus/<bus>`, `<node>-<driver>-<i>`, ...), the stable
//!   hash that shortens long ones, and the ResourceSlice field selectors kube-apiserver allows.
//! - [`attribute`]: the device attribute names both binaries publish.
//! - [`pool`]: what a pool should hold ([`pool::DesiredPool`]) and where its devices can be used.
//! - [`publisher`]: the one pool publisher ([`publisher::PoolPublisher`]) and the one
//!   404-tolerant way to delete slices ([`publisher::delete_slices`]).
//! - `readback` (private): what the API server kept of written slices (fields dropped by
//!   disabled feature gates).
//!
//! The controller publishes one pool per `CanBus` (no node, `allNodes` or a node selector, owned
//! by the bus); the node daemon publishes its node's pool (`spec.nodeName`, owned by the Node).
//! Both go through [`publisher::PoolPublisher::publish`].

#![forbid(unsafe_code)]

pub mod attribute;
pub mod canbus;
pub mod naming;
pub mod pool;
pub mod publisher;
mod readback;
