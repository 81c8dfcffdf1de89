//! Test doubles for the two boundaries of can-dra that cannot run on a development machine
//! without a cluster. They are doubles, not mocks of the product: each speaks the real wire
//! format of the component it stands in for.
//!
//! - [`kubelet`]: a kubelet stand-in that discovers the plugin's registration socket, calls
//!   `GetInfo` and `NotifyRegistrationStatus`, and drives `NodePrepareResources` /
//!   `NodeUnprepareResources` over DRA v1 and v1beta1 on the real unix sockets.
//! - [`apiserver`]: an in-process HTTP Kubernetes API server double that serves and accepts
//!   real JSON (ResourceClaims, ResourceSlices, Nodes, Pods, Leases, CanBuses), streams watches,
//!   and records every request with the client that made it, so tests can assert on what the
//!   daemon and the controller did. Opt-in, it authenticates tokens and authorizes every request
//!   with RBAC roles such as the chart's, and the 1.36 per-driver claim-status authorization.

pub mod apiserver;
pub mod kubelet;
