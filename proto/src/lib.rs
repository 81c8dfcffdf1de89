//! gRPC wire contracts between can-dra and the kubelet.
//!
//! This crate owns:
//! - the project's `.proto` files under `protos/`, which mirror the kubelet's own protos
//!   (package, service and message names, field numbers and types are kept identical, because
//!   the kubelet only speaks those);
//! - the Rust bindings generated from them at build time (messages, tonic clients and servers):
//!   - [`dra::v1`] and [`dra::v1beta1`]: the `DRAPlugin` service (`NodePrepareResources`,
//!     `NodeUnprepareResources`);
//!   - [`registration`]: the kubelet plugin-watcher `Registration` service (`GetInfo`,
//!     `NotifyRegistrationStatus`);
//!   - [`health::v1alpha1`] and [`health::v1`]: the streaming `DRAResourceHealth` service;
//! - the strings a DRA plugin advertises during registration ([`DRA_PLUGIN_TYPE`],
//!   [`DRA_V1_SERVICE`], ...).
//!
//! It holds no behaviour: serving and calling these services is the job of the kubelet plugin
//! and of the test kubelet.
//!
//! ```
//! use can_dra_proto::dra::v1::{Claim, NodePrepareResourcesRequest};
//!
//! let request = NodePrepareResourcesRequest {
//!     claims: vec![Claim {
//!         namespace: "default".into(),
//!         uid: "0b8f6c1e".into(),
//!         name: "pod-can".into(),
//!     }],
//! };
//! assert_eq!(request.claims[0].name, "pod-can");
//! ```

#![forbid(unsafe_code)]

/// Kubelet DRA plugin service (`DRAPlugin`), which prepares and unprepares claims.
pub mod dra {
    /// DRA `v1` (Kubernetes >= 1.34), package `k8s.io.kubelet.pkg.apis.dra.v1`.
    ///
    /// Advertised as [`DRA_V1_SERVICE`](crate::DRA_V1_SERVICE).
    #[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
    pub mod v1 {
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
    }

    /// DRA `v1beta1` (Kubernetes >= 1.32), package `k8s.io.kubelet.pkg.apis.dra.v1beta1`.
    ///
    /// Same as [`v1`] without `Device.share_id`. Advertised as
    /// [`DRA_V1BETA1_SERVICE`](crate::DRA_V1BETA1_SERVICE).
    #[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
    pub mod v1beta1 {
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1beta1");
    }
}

/// Kubelet plugin registration (`Registration` service), package `pluginregistration`.
///
/// The plugin serves it on a socket in the kubelet's `plugins_registry` directory.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod registration {
    tonic::include_proto!("pluginregistration");
}

/// DRA device health streaming (`DRAResourceHealth` service, KEP-4680).
pub mod health {
    /// Health `v1alpha1` (Kubernetes >= 1.34), package `v1alpha1`.
    ///
    /// Advertised as [`HEALTH_V1ALPHA1_SERVICE`](crate::HEALTH_V1ALPHA1_SERVICE).
    #[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
    pub mod v1alpha1 {
        tonic::include_proto!("v1alpha1");
    }

    /// Health `v1` (Kubernetes >= 1.37), package `v1`; same messages as [`v1alpha1`].
    ///
    /// Advertised as [`HEALTH_V1_SERVICE`](crate::HEALTH_V1_SERVICE).
    #[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
    pub mod v1 {
        tonic::include_proto!("v1");
    }
}

/// `PluginInfo.type` of a DRA driver; the kubelet routes the registration to its DRA handler
/// only for this value (other values are `CSIPlugin` and `DevicePlugin`).
pub const DRA_PLUGIN_TYPE: &str = "DRAPlugin";

/// `PluginInfo.supported_versions` entry announcing the DRA `v1` service ([`dra::v1`]).
///
/// Entries are `<last segment of the proto package>.<service>`, not full gRPC service names.
/// The kubelet takes the first entry it supports, so list preferred services first.
pub const DRA_V1_SERVICE: &str = "v1.DRAPlugin";

/// `PluginInfo.supported_versions` entry announcing the DRA `v1beta1` service
/// ([`dra::v1beta1`]), for kubelets older than 1.34.
pub const DRA_V1BETA1_SERVICE: &str = "v1beta1.DRAPlugin";

/// `PluginInfo.supported_versions` entry announcing the health `v1alpha1` service
/// ([`health::v1alpha1`]).
///
/// Kubelets from 1.37 only open a health stream to plugins that advertise a health service;
/// 1.36 kubelets try every plugin regardless.
pub const HEALTH_V1ALPHA1_SERVICE: &str = "v1alpha1.DRAResourceHealth";

/// `PluginInfo.supported_versions` entry announcing the health `v1` service ([`health::v1`]),
/// which 1.37 kubelets prefer over `v1alpha1`.
pub const HEALTH_V1_SERVICE: &str = "v1.DRAResourceHealth";

#[cfg(test)]
mod tests;
