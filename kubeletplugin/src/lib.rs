//! The kubelet side of a Kubernetes DRA (Dynamic Resource Allocation) driver, for any kind of
//! device: what Go drivers get from `k8s.io/dynamic-resource-allocation/kubeletplugin`.
//!
//! This crate owns everything between the kubelet and a driver's own logic:
//! - [`registration`]: the plugin-watcher `Registration` service (`GetInfo`,
//!   `NotifyRegistrationStatus`) and the advertised service versions;
//! - [`dra`]: the `DRAPlugin` service in its v1 and v1beta1 versions, served by one handler
//!   that validates requests, answers every claim exactly once and turns driver failures into
//!   gRPC statuses;
//! - [`health`]: the `DRAResourceHealth` streams (v1 and v1alpha1) fed by the driver's health
//!   list;
//! - [`sockets`]: where the sockets live (the kubelet's conventions, with unique names per
//!   instance during rolling updates), binding them and removing only our own;
//! - [`serializer`]: prepare and unprepare calls one at a time, also across the instances of
//!   a rolling update;
//! - [`authority`]: a transport shim that lets the servers accept any HTTP/2 `:authority`
//!   (the kubelet's registration dial sends the socket path, which h2 refuses);
//! - [`server`]: the two gRPC servers started and stopped in the order the kubelet expects;
//! - [`driver`]: the [`Driver`] trait a device driver implements, and the plain types it sees
//!   ([`ClaimRef`], [`PreparedDevice`], [`DeviceHealth`], [`DriverError`]).
//!
//! It knows nothing of any device kind: the driver name and the kubelet's directories are
//! parameters. The wire types come from the `can-dra-proto` crate, which mirrors the kubelet's
//! protos.
//!
//! # Writing a driver
//! 1. Implement [`Driver`]: `prepare` answers each claim with the devices (and CDI device IDs)
//!    the container runtime must expose, `unprepare` reverts it, and `health` returns a
//!    `watch` receiver holding the driver's complete device health list. Both calls must be
//!    idempotent; they are never run concurrently.
//! 2. Build a [`PluginConfig`] with the driver name and the kubelet's plugin and registration
//!    directories; set `pod_uid` to this pod's UID to allow rolling updates (two instances
//!    side by side).
//! 3. [`PluginServer::start`] binds the DRA service socket, then the registration socket; the
//!    kubelet finds the latter and registers the plugin. [`PluginServer::wait`] serves until
//!    the cancellation token is cancelled (on SIGTERM, say), then removes the registration
//!    socket before stopping the service.
//!
//! Publishing the driver's ResourceSlices and writing the CDI specs stay with the driver.
//!
//! ```no_run
//! use std::collections::HashMap;
//! use std::sync::Arc;
//!
//! use dra_kubeletplugin::{
//!     ClaimRef, ClaimUid, DeviceHealth, Driver, DriverError, PluginConfig, PluginServer,
//!     PreparedDevice,
//! };
//! use tokio::sync::watch;
//! use tokio_util::sync::CancellationToken;
//!
//! /// Hands every claim one device and reports no health.
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
//!                     cdi_device_ids: vec!["gpu.example.com/device=dev0".into()],
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
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let (_health, feed) = watch::channel(Vec::new());
//!     let driver = Arc::new(OneDevice { health: feed });
//!     let config = PluginConfig::new(
//!         "gpu.example.com",
//!         "/var/lib/kubelet/plugins",
//!         "/var/lib/kubelet/plugins_registry",
//!     );
//!     let shutdown = CancellationToken::new(); // cancel it from the SIGTERM handler
//!     let server = PluginServer::start(config, driver, shutdown.clone()).await?;
//!     server.wait().await?; // returns once `shutdown` is cancelled and the sockets are gone
//!     Ok(())
//! }
//! ```

#![forbid(unsafe_code)]

pub mod authority;
pub mod dra;
pub mod driver;
pub mod health;
pub mod registration;
pub mod serializer;
pub mod server;
pub mod sockets;

pub use driver::{
    ClaimRef, ClaimUid, DeviceHealth, Driver, DriverError, HealthStatus, PreparedDevice,
};
pub use health::HealthOptions;
pub use registration::RegistrationOutcome;
pub use server::{PluginConfig, PluginServer, ServerError};
pub use sockets::{SocketError, SocketLayout};
