//! The seam between the kubelet-facing gRPC layer and a driver's own logic.
//!
//! The gRPC layer ([`crate::dra`], [`crate::health`]) speaks the kubelet's wire types; the
//! driver behind it sees only the plain types of this module and the [`Driver`] trait. That
//! keeps the wire details (two DRA versions, two health versions, map keys, error fields) in
//! one place, and lets the driver be tested without gRPC.
//!
//! ```
//! use std::collections::HashMap;
//! use dra_kubeletplugin::driver::{
//!     ClaimRef, ClaimUid, DeviceHealth, Driver, DriverError, PreparedDevice,
//! };
//! use tokio::sync::watch;
//!
//! /// A driver that hands every claim one device and reports no health.
//! struct OneDevice {
//!     health: watch::Receiver<Vec<DeviceHealth>>,
//! }
//!
//! impl Driver for OneDevice {
//!     async fn prepare(
//!         &self,
//!         claims: Vec<ClaimRef>,
//!     ) -> Result<HashMap<ClaimUid, Result<Vec<PreparedDevice>, String>>, DriverError> {
//!         Ok(claims
//!             .into_iter()
//!             .map(|claim| {
//!                 let device = PreparedDevice {
//!                     request_names: vec!["device".into()],
//!                     pool_name: "node-a".into(),
//!                     device_name: "dev0".into(),
//!                     cdi_device_ids: vec![format!("dra.example/device={}", claim.uid)],
//!                     share_id: None,
//!                 };
//!                 (claim.uid, Ok(vec![device]))
//!             })
//!             .collect())
//!     }
//!
//!     async fn unprepare(
//!         &self,
//!         claims: Vec<ClaimRef>,
//!     ) -> Result<HashMap<ClaimUid, Result<(), String>>, DriverError> {
//!         Ok(claims.into_iter().map(|claim| (claim.uid, Ok(()))).collect())
//!     }
//!
//!     fn health(&self) -> watch::Receiver<Vec<DeviceHealth>> {
//!         self.health.clone()
//!     }
//! }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

use tokio::sync::watch;

/// The UID of a ResourceClaim; the kubelet keys every per-claim answer by it.
pub type ClaimUid = String;

/// A claim as the kubelet names it in `NodePrepareResources` / `NodeUnprepareResources`.
///
/// The kubelet sends only these three fields; the driver fetches the claim object itself when
/// it needs more (on unprepare the claim may already be gone).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimRef {
    /// Namespace of the ResourceClaim.
    pub namespace: String,
    /// UID of the ResourceClaim.
    pub uid: ClaimUid,
    /// Name of the ResourceClaim.
    pub name: String,
}

impl fmt::Display for ClaimRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

/// One device the container runtime must expose for a prepared claim.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreparedDevice {
    /// Requests of the claim this device serves (subrequest part stripped); empty means all.
    pub request_names: Vec<String>,
    /// Pool of the device (the node name for node-local devices).
    pub pool_name: String,
    /// Device name within the pool.
    pub device_name: String,
    /// Fully qualified CDI device IDs (`vendor/class=name`) to inject.
    pub cdi_device_ids: Vec<String>,
    /// Share of a consumable-capacity device; only DRA v1 can carry it (v1beta1 drops it).
    pub share_id: Option<String>,
}

/// Health of one device, as the driver currently believes it to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthStatus {
    /// The device works normally.
    Healthy,
    /// The device has a problem (a link down, hardware unplugged, ...).
    Unhealthy,
    /// The driver cannot tell.
    Unknown,
}

/// One device's entry in the driver's health feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHealth {
    /// Pool of the device.
    pub pool: String,
    /// Device name within the pool.
    pub device: String,
    /// Current health.
    pub status: HealthStatus,
    /// Human-readable detail; may be empty.
    pub message: String,
}

/// A failure of a whole prepare/unprepare call (not of one claim). The kubelet discards the
/// whole response and retries later.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A dependency is temporarily unreachable (the API server, the data plane); retrying may help.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request cannot be served in the current state (a claim is missing, not allocated,
    /// or was replaced by another claim of the same name).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Anything else.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A DRA driver's node-side logic as the gRPC layer sees it.
///
/// Calls to [`prepare`](Driver::prepare) and [`unprepare`](Driver::unprepare) are serialised by
/// the caller, so an implementation never runs two of them at once (also across plugin
/// instances during a rolling update). Both must be idempotent: the kubelet repeats them after
/// restarts and timeouts.
pub trait Driver: Send + Sync + 'static {
    /// Prepares the claims. The map should hold one entry per claim UID: `Ok(devices)` or
    /// `Err(reason)` for that claim alone. A claim left out of the map is answered with an
    /// error by the gRPC layer. `Err(DriverError)` fails the whole call.
    fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> impl Future<
        Output = Result<HashMap<ClaimUid, Result<Vec<PreparedDevice>, String>>, DriverError>,
    > + Send;

    /// Reverts [`prepare`](Driver::prepare). A claim that is not prepared is not an error.
    /// Same map and error rules as `prepare`.
    fn unprepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> impl Future<Output = Result<HashMap<ClaimUid, Result<(), String>>, DriverError>> + Send;

    /// The driver's health feed: the complete list of its devices, replaced on every change.
    ///
    /// A device missing from the list is reported Unknown by the kubelet once its last report
    /// expires. Dropping the sending side ends the kubelet's health streams.
    fn health(&self) -> watch::Receiver<Vec<DeviceHealth>>;
}
