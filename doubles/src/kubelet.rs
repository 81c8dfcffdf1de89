//! A **kubelet test double**: the kubelet's side of the DRA plugin contract, over the plugin's
//! real unix sockets, for tests that cannot run a kubelet.
//!
//! It behaves like the kubelet's plugin watcher and DRA manager (`dra-api.md` §1):
//! - finds registration sockets in a registrar directory, ignoring names that start with `.`;
//! - calls `GetInfo` (1 s timeout), validates type, name and endpoint, picks the DRA service
//!   by walking `supported_versions` in order and taking the first one it supports (by default
//!   `[v1.DRAPlugin, v1beta1.DRAPlugin]`, like a 1.34+ kubelet), rejects a second registration
//!   of an identical endpoint, and reports the outcome with `NotifyRegistrationStatus`;
//! - then calls `NodePrepareResources` / `NodeUnprepareResources` over the chosen version
//!   (45 s per call) and, like the kubelet, refuses answers that leave out a requested claim;
//! - watches device health over the health service the plugin advertises (v1 preferred over
//!   v1alpha1, as 1.37 kubelets choose), and keeps what it receives as the kubelet does
//!   ([`HealthCache`], fed by [`HealthWatch::next_into`]: each report refreshes the devices it
//!   names, a device not reported within its timeout (30 s by default) reads Unknown, and the
//!   end of the stream clears the driver's entries).
//!
//! It dials as the kubelet does: the registration socket by its bare path through a connector
//! (the plugin watcher's `grpc.DialContext` with a unix dialer), the DRA service socket as the
//! target `unix:<endpoint>` (the DRA manager's `grpc.NewClient`), which sends `localhost` as the
//! HTTP/2 `:authority`, like grpc-go. For the registration dial grpc-go sends the socket path,
//! percent-encoded (`%2Fvar%2Flib%2Fkubelet%2F...`), as the authority. A tonic/h2 client cannot
//! express that: the `http` crate refuses such an authority, so this double sends `localhost`
//! there too. That is why the plugin's tests also run a client of another gRPC stack
//! (`kubelet-plugin/tests/grpcio_kubelet.rs`, Python grpcio) that sends the kubelet's exact
//! authorities.
//!
//! Answers of either DRA version are returned as v1 messages (v1beta1 has no `share_id`, so it
//! is `None`), as the kubelet converts them internally too.
//!
//! It is a stand-in for tests, not a kubelet: there is no inotify watch (call
//! [`KubeletDouble::registration_sockets`] when the plugin is up), no retries and no pods.
//!
//! ```no_run
//! use can_dra_doubles::kubelet::KubeletDouble;
//! use can_dra_proto::dra::v1::Claim;
//!
//! # async fn demo() -> Result<(), can_dra_doubles::kubelet::KubeletError> {
//! let kubelet = KubeletDouble::new("/tmp/test/plugins_registry");
//! let plugin = kubelet.register_driver("can.dra.dev").await?;
//! let claim = Claim { namespace: "default".into(), uid: "uid-1".into(), name: "bus".into() };
//! let answer = plugin.prepare(vec![claim]).await?;
//! assert!(answer.claims["uid-1"].error.is_empty());
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use can_dra_proto::dra::{v1, v1beta1};
use can_dra_proto::health;
use can_dra_proto::registration::registration_client::RegistrationClient;
use can_dra_proto::registration::{InfoRequest, PluginInfo, RegistrationStatus};
use can_dra_proto::{
    DRA_PLUGIN_TYPE, DRA_V1_SERVICE, DRA_V1BETA1_SERVICE, HEALTH_V1_SERVICE,
    HEALTH_V1ALPHA1_SERVICE,
};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// The kubelet's `GetInfo` timeout.
pub const GET_INFO_TIMEOUT: Duration = Duration::from_secs(1);
/// The kubelet's timeout for one DRA call (`defaultClientCallTimeout`).
pub const DRA_CALL_TIMEOUT: Duration = Duration::from_secs(45);

/// A DRA `DRAPlugin` service version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DraVersion {
    /// `v1.DRAPlugin` (kubelet 1.34+).
    V1,
    /// `v1beta1.DRAPlugin` (kubelet 1.32+).
    V1beta1,
}

impl DraVersion {
    /// The `supported_versions` string of this version.
    pub fn service(self) -> &'static str {
        match self {
            Self::V1 => DRA_V1_SERVICE,
            Self::V1beta1 => DRA_V1BETA1_SERVICE,
        }
    }
}

/// A `DRAResourceHealth` service version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthVersion {
    /// `v1.DRAResourceHealth` (kubelet 1.37+).
    V1,
    /// `v1alpha1.DRAResourceHealth` (kubelet 1.34+).
    V1alpha1,
}

/// What went wrong between the double and the plugin.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// The registrar directory could not be listed.
    #[error("cannot list {path}: {source}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No registration socket announces the wanted driver.
    #[error("no registration socket in {dir} belongs to driver {driver}")]
    NoPlugin {
        /// The registrar directory.
        dir: PathBuf,
        /// The driver looked for.
        driver: String,
    },
    /// A socket could not be connected.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// A call returned a gRPC error.
    #[error("{call} failed: {status}")]
    Call {
        /// Which RPC.
        call: &'static str,
        /// The status the plugin returned.
        status: tonic::Status,
    },
    /// A call did not answer in time.
    #[error("{call} did not answer within {timeout:?}")]
    Timeout {
        /// Which RPC.
        call: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The double refused the plugin (and told it so through `NotifyRegistrationStatus`).
    #[error("registration rejected: {0}")]
    Rejected(String),
    /// The plugin's answer left out requested claims (the kubelet's
    /// "NodePrepareResources left out N claims").
    #[error("{call} left out {} claims: {missing:?}", missing.len())]
    MissingClaims {
        /// Which RPC.
        call: &'static str,
        /// UIDs without an answer.
        missing: Vec<String>,
    },
    /// The plugin advertises no health service this double knows.
    #[error("the plugin advertises no health service")]
    NoHealthService,
}

/// The kubelet stand-in. One instance remembers the endpoints it registered.
#[derive(Debug)]
pub struct KubeletDouble {
    registrar_dir: PathBuf,
    dra_versions: Vec<DraVersion>,
    registered: Mutex<HashSet<(String, String)>>,
}

impl KubeletDouble {
    /// A kubelet watching `registrar_dir` that speaks DRA v1 and v1beta1.
    pub fn new(registrar_dir: impl Into<PathBuf>) -> Self {
        Self {
            registrar_dir: registrar_dir.into(),
            dra_versions: vec![DraVersion::V1, DraVersion::V1beta1],
            registered: Mutex::new(HashSet::new()),
        }
    }

    /// Limits the DRA versions this kubelet speaks: `[DraVersion::V1beta1]` acts as a 1.32/1.33
    /// kubelet and forces the plugin onto v1beta1; an empty list makes every registration fail.
    pub fn with_dra_versions(mut self, versions: &[DraVersion]) -> Self {
        self.dra_versions = versions.to_vec();
        self
    }

    /// The registration sockets in the registrar directory, sorted; names starting with `.`
    /// and files that are not sockets are skipped, as the kubelet's plugin watcher does.
    pub fn registration_sockets(&self) -> Result<Vec<PathBuf>, KubeletError> {
        let read_error = |source| KubeletError::ReadDir {
            path: self.registrar_dir.clone(),
            source,
        };
        let mut sockets = Vec::new();
        for entry in std::fs::read_dir(&self.registrar_dir).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if entry.file_type().map_err(read_error)?.is_socket() {
                sockets.push(entry.path());
            }
        }
        sockets.sort();
        Ok(sockets)
    }

    /// Calls `GetInfo` on a registration socket.
    pub async fn get_info(&self, socket: &Path) -> Result<PluginInfo, KubeletError> {
        let mut client = RegistrationClient::new(dial_registration(socket).await?);
        let info =
            with_timeout("GetInfo", GET_INFO_TIMEOUT, client.get_info(InfoRequest {})).await?;
        Ok(info.into_inner())
    }

    /// Sends `NotifyRegistrationStatus` to a registration socket.
    pub async fn notify(
        &self,
        socket: &Path,
        plugin_registered: bool,
        error: &str,
    ) -> Result<(), KubeletError> {
        let mut client = RegistrationClient::new(dial_registration(socket).await?);
        let status = RegistrationStatus {
            plugin_registered,
            error: error.to_owned(),
        };
        with_timeout(
            "NotifyRegistrationStatus",
            GET_INFO_TIMEOUT,
            client.notify_registration_status(status),
        )
        .await?;
        Ok(())
    }

    /// Registers the plugin behind `socket`: `GetInfo`, validation, version choice,
    /// connection to the endpoint and `NotifyRegistrationStatus`. A plugin that fails
    /// validation is told so (`plugin_registered: false`) and the reason is returned.
    pub async fn register(&self, socket: &Path) -> Result<RegisteredPlugin, KubeletError> {
        let info = self.get_info(socket).await?;
        let chosen = match self.validate(&info) {
            Ok(chosen) => chosen,
            Err(reason) => {
                // The plugin may answer the rejection with an error; the reason is what counts.
                let _ = self.notify(socket, false, &reason).await;
                return Err(KubeletError::Rejected(reason));
            }
        };
        let channel = match dial_dra(Path::new(&info.endpoint)).await {
            Ok(channel) => channel,
            Err(error) => {
                let _ = self.notify(socket, false, &error.to_string()).await;
                return Err(error);
            }
        };
        self.notify(socket, true, "").await?;
        if let Ok(mut registered) = self.registered.lock() {
            registered.insert((info.name.clone(), info.endpoint.clone()));
        }
        Ok(RegisteredPlugin {
            dra_version: chosen,
            health_version: pick_health(&info.supported_versions),
            info,
            registration_socket: socket.to_path_buf(),
            channel,
        })
    }

    /// Registers the first plugin in the registrar directory whose `GetInfo` names `driver`.
    pub async fn register_driver(&self, driver: &str) -> Result<RegisteredPlugin, KubeletError> {
        for socket in self.registration_sockets()? {
            if self.get_info(&socket).await?.name == driver {
                return self.register(&socket).await;
            }
        }
        Err(KubeletError::NoPlugin {
            dir: self.registrar_dir.clone(),
            driver: driver.to_owned(),
        })
    }

    /// The kubelet's checks, returning the chosen DRA version or the rejection reason.
    fn validate(&self, info: &PluginInfo) -> Result<DraVersion, String> {
        if info.r#type != DRA_PLUGIN_TYPE {
            return Err(format!(
                "plugin type {:?} is not {DRA_PLUGIN_TYPE}",
                info.r#type
            ));
        }
        if info.name.is_empty() {
            return Err("plugin name is empty".to_owned());
        }
        let endpoint = Path::new(&info.endpoint);
        if !endpoint.is_absolute() {
            return Err(format!(
                "endpoint {:?} is not an absolute path",
                info.endpoint
            ));
        }
        let is_socket = std::fs::metadata(endpoint)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if !is_socket {
            return Err(format!("endpoint {} is not a socket", info.endpoint));
        }
        let duplicate = self
            .registered
            .lock()
            .map(|r| r.contains(&(info.name.clone(), info.endpoint.clone())))
            .unwrap_or(false);
        if duplicate {
            return Err(format!(
                "endpoint {} of driver {} is already registered",
                info.endpoint, info.name
            ));
        }
        info.supported_versions
            .iter()
            .find_map(|advertised| {
                self.dra_versions
                    .iter()
                    .copied()
                    .find(|v| v.service() == advertised)
            })
            .ok_or_else(|| {
                format!(
                    "none of services supported by the plugin {:?} are supported by the kubelet {:?}",
                    info.supported_versions,
                    self.dra_versions.iter().map(|v| v.service()).collect::<Vec<_>>()
                )
            })
    }
}

/// 1.37 kubelets prefer health v1, then v1alpha1, among the advertised services.
fn pick_health(advertised: &[String]) -> Option<HealthVersion> {
    let has = |service: &str| advertised.iter().any(|a| a == service);
    if has(HEALTH_V1_SERVICE) {
        Some(HealthVersion::V1)
    } else if has(HEALTH_V1ALPHA1_SERVICE) {
        Some(HealthVersion::V1alpha1)
    } else {
        None
    }
}

/// A plugin the double registered, with a connection to its DRA service socket.
#[derive(Debug, Clone)]
pub struct RegisteredPlugin {
    /// What `GetInfo` returned.
    pub info: PluginInfo,
    /// The registration socket it was found at.
    pub registration_socket: PathBuf,
    /// The DRA version the double chose.
    pub dra_version: DraVersion,
    /// The health version the double would watch, if any is advertised.
    pub health_version: Option<HealthVersion>,
    channel: Channel,
}

impl RegisteredPlugin {
    /// `NodePrepareResources` over the chosen version; fails like the kubelet when a claim is
    /// left out of the answer.
    pub async fn prepare(
        &self,
        claims: Vec<v1::Claim>,
    ) -> Result<v1::NodePrepareResourcesResponse, KubeletError> {
        const CALL: &str = "NodePrepareResources";
        let uids: Vec<String> = claims.iter().map(|c| c.uid.clone()).collect();
        let response = match self.dra_version {
            DraVersion::V1 => {
                let mut client = v1::dra_plugin_client::DraPluginClient::new(self.channel.clone());
                let request = v1::NodePrepareResourcesRequest { claims };
                with_timeout(
                    CALL,
                    DRA_CALL_TIMEOUT,
                    client.node_prepare_resources(request),
                )
                .await?
                .into_inner()
            }
            DraVersion::V1beta1 => {
                let mut client =
                    v1beta1::dra_plugin_client::DraPluginClient::new(self.channel.clone());
                let request = v1beta1::NodePrepareResourcesRequest {
                    claims: claims.into_iter().map(claim_v1beta1).collect(),
                };
                let answer = with_timeout(
                    CALL,
                    DRA_CALL_TIMEOUT,
                    client.node_prepare_resources(request),
                )
                .await?
                .into_inner();
                prepare_response_v1(answer)
            }
        };
        check_complete(CALL, &uids, |uid| response.claims.contains_key(uid))?;
        Ok(response)
    }

    /// `NodeUnprepareResources` over the chosen version; fails like the kubelet when a claim
    /// is left out of the answer.
    pub async fn unprepare(
        &self,
        claims: Vec<v1::Claim>,
    ) -> Result<v1::NodeUnprepareResourcesResponse, KubeletError> {
        const CALL: &str = "NodeUnprepareResources";
        let uids: Vec<String> = claims.iter().map(|c| c.uid.clone()).collect();
        let response = match self.dra_version {
            DraVersion::V1 => {
                let mut client = v1::dra_plugin_client::DraPluginClient::new(self.channel.clone());
                let request = v1::NodeUnprepareResourcesRequest { claims };
                with_timeout(
                    CALL,
                    DRA_CALL_TIMEOUT,
                    client.node_unprepare_resources(request),
                )
                .await?
                .into_inner()
            }
            DraVersion::V1beta1 => {
                let mut client =
                    v1beta1::dra_plugin_client::DraPluginClient::new(self.channel.clone());
                let request = v1beta1::NodeUnprepareResourcesRequest {
                    claims: claims.into_iter().map(claim_v1beta1).collect(),
                };
                let answer = with_timeout(
                    CALL,
                    DRA_CALL_TIMEOUT,
                    client.node_unprepare_resources(request),
                )
                .await?
                .into_inner();
                v1::NodeUnprepareResourcesResponse {
                    claims: answer
                        .claims
                        .into_iter()
                        .map(|(uid, r)| (uid, v1::NodeUnprepareResourceResponse { error: r.error }))
                        .collect(),
                }
            }
        };
        check_complete(CALL, &uids, |uid| response.claims.contains_key(uid))?;
        Ok(response)
    }

    /// Opens a health stream over the advertised health service.
    pub async fn watch_health(&self) -> Result<HealthWatch, KubeletError> {
        self.watch_health_version(self.health_version.ok_or(KubeletError::NoHealthService)?)
            .await
    }

    /// Opens a health stream over a given health version, advertised or not.
    pub async fn watch_health_version(
        &self,
        version: HealthVersion,
    ) -> Result<HealthWatch, KubeletError> {
        const CALL: &str = "NodeWatchResources";
        let stream = match version {
            HealthVersion::V1 => {
                let mut client =
                    health::v1::dra_resource_health_client::DraResourceHealthClient::new(
                        self.channel.clone(),
                    );
                let request = health::v1::NodeWatchResourcesRequest {};
                HealthStream::V1(
                    with_timeout(CALL, DRA_CALL_TIMEOUT, client.node_watch_resources(request))
                        .await?
                        .into_inner(),
                )
            }
            HealthVersion::V1alpha1 => {
                let mut client =
                    health::v1alpha1::dra_resource_health_client::DraResourceHealthClient::new(
                        self.channel.clone(),
                    );
                let request = health::v1alpha1::NodeWatchResourcesRequest {};
                HealthStream::V1alpha1(
                    with_timeout(CALL, DRA_CALL_TIMEOUT, client.node_watch_resources(request))
                        .await?
                        .into_inner(),
                )
            }
        };
        Ok(HealthWatch { stream })
    }
}

/// An open health stream; reports of either version come out as v1 messages.
#[derive(Debug)]
pub struct HealthWatch {
    stream: HealthStream,
}

#[derive(Debug)]
enum HealthStream {
    V1(tonic::Streaming<health::v1::NodeWatchResourcesResponse>),
    V1alpha1(tonic::Streaming<health::v1alpha1::NodeWatchResourcesResponse>),
}

impl HealthWatch {
    /// The next complete device list; `None` when the plugin ended the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Vec<health::v1::DeviceHealth>>, KubeletError> {
        let call_error = |status| KubeletError::Call {
            call: "NodeWatchResources",
            status,
        };
        match &mut self.stream {
            HealthStream::V1(stream) => Ok(stream
                .message()
                .await
                .map_err(call_error)?
                .map(|r| r.devices)),
            HealthStream::V1alpha1(stream) => Ok(stream
                .message()
                .await
                .map_err(call_error)?
                .map(|r| r.devices.into_iter().map(device_health_v1).collect())),
        }
    }
}

impl HealthWatch {
    /// Receives the next report into `cache`, as the kubelet's `HandleWatchResourcesStream`
    /// (`pkg/kubelet/cm/dra/manager.go`) does: a report updates the cache; when the stream ends,
    /// cleanly or with an error, the driver's entries are cleared (the kubelet opens a new stream
    /// [`HEALTH_STREAM_RETRY`] later). Returns the devices whose entry changed, or `None` once
    /// the stream ended cleanly.
    pub async fn next_into(
        &mut self,
        cache: &mut HealthCache,
    ) -> Result<Option<Vec<(String, String)>>, KubeletError> {
        match self.next().await {
            Ok(Some(report)) => Ok(Some(cache.update(&report, Instant::now()))),
            Ok(None) => {
                cache.clear();
                Ok(None)
            }
            Err(error) => {
                cache.clear();
                Err(error)
            }
        }
    }
}

/// The kubelet's health timeout for a device that gives none (`pkg/kubelet/cm/dra/healthinfo.go`,
/// `DefaultHealthTimeout`).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// The kubelet's pause before it opens a new health stream after one ended
/// (`pkg/kubelet/cm/dra/plugin/dra_plugin_manager.go`, `add()`: `wait.UntilWithContext`, 5 s).
pub const HEALTH_STREAM_RETRY: Duration = Duration::from_secs(5);

/// One device in the kubelet's health cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedHealth {
    /// The reported health.
    pub health: health::v1::HealthStatus,
    /// The reported message.
    pub message: String,
    /// The device's timeout (the report's, or [`DEFAULT_HEALTH_TIMEOUT`] for zero or less).
    pub timeout: Duration,
    /// When the kubelet received the report (the plugin's own timestamp is not used).
    pub last_updated: Instant,
}

/// The kubelet's device health cache for one driver (`pkg/kubelet/cm/dra/healthinfo.go`,
/// `healthInfoCache`), fed by [`HealthWatch::next_into`].
#[derive(Debug, Clone, Default)]
pub struct HealthCache {
    devices: BTreeMap<(String, String), CachedHealth>,
}

impl HealthCache {
    /// `updateHealthInfo`: every reported device is stored as received at `now`; a device the
    /// report leaves out turns Unknown (message cleared) once its timeout has passed since its
    /// last report. Returns the devices (pool, device) whose health, message or timeout changed.
    pub fn update(
        &mut self,
        report: &[health::v1::DeviceHealth],
        now: Instant,
    ) -> Vec<(String, String)> {
        let mut changed = Vec::new();
        let mut reported = HashSet::new();
        for d in report {
            let id = d.device.clone().unwrap_or_default();
            let key = (id.pool_name, id.device_name);
            let timeout = u64::try_from(d.health_check_timeout_seconds)
                .ok()
                .filter(|&s| s > 0)
                .map_or(DEFAULT_HEALTH_TIMEOUT, Duration::from_secs);
            // Values other than HEALTHY and UNHEALTHY mean Unknown to the kubelet.
            let health = health::v1::HealthStatus::try_from(d.health)
                .unwrap_or(health::v1::HealthStatus::Unknown);
            let entry = CachedHealth {
                health,
                message: d.message.clone(),
                timeout,
                last_updated: now,
            };
            let same = self.devices.get(&key).is_some_and(|old| {
                (old.health, &old.message, old.timeout) == (health, &entry.message, timeout)
            });
            if !same {
                changed.push(key.clone());
            }
            reported.insert(key.clone());
            self.devices.insert(key, entry);
        }
        for (key, entry) in &mut self.devices {
            if !reported.contains(key)
                && entry.health != health::v1::HealthStatus::Unknown
                && now.saturating_duration_since(entry.last_updated) > entry.timeout
            {
                entry.health = health::v1::HealthStatus::Unknown;
                entry.message.clear();
                entry.last_updated = now;
                changed.push(key.clone());
            }
        }
        changed
    }

    /// `getHealthInfo`: the health and message of a device at `now`; Unknown (no message) for a
    /// device never reported, or not reported within its timeout.
    pub fn get(
        &self,
        pool: &str,
        device: &str,
        now: Instant,
    ) -> (health::v1::HealthStatus, String) {
        match self.devices.get(&(pool.to_owned(), device.to_owned())) {
            Some(entry) if now.saturating_duration_since(entry.last_updated) <= entry.timeout => {
                (entry.health, entry.message.clone())
            }
            _ => (health::v1::HealthStatus::Unknown, String::new()),
        }
    }

    /// `clearDriver`: forgets every device, as the kubelet does when the stream ends.
    pub fn clear(&mut self) {
        self.devices.clear();
    }

    /// The cached entry of a device, stale or not.
    pub fn entry(&self, pool: &str, device: &str) -> Option<&CachedHealth> {
        self.devices.get(&(pool.to_owned(), device.to_owned()))
    }
}

fn device_health_v1(d: health::v1alpha1::DeviceHealth) -> health::v1::DeviceHealth {
    health::v1::DeviceHealth {
        device: d.device.map(|id| health::v1::DeviceIdentifier {
            pool_name: id.pool_name,
            device_name: id.device_name,
        }),
        // Both versions number the enum identically.
        health: d.health,
        last_updated_time: d.last_updated_time,
        health_check_timeout_seconds: d.health_check_timeout_seconds,
        message: d.message,
    }
}

fn claim_v1beta1(c: v1::Claim) -> v1beta1::Claim {
    v1beta1::Claim {
        namespace: c.namespace,
        uid: c.uid,
        name: c.name,
    }
}

fn prepare_response_v1(
    answer: v1beta1::NodePrepareResourcesResponse,
) -> v1::NodePrepareResourcesResponse {
    let claims = answer
        .claims
        .into_iter()
        .map(|(uid, r)| {
            let devices = r
                .devices
                .into_iter()
                .map(|d| v1::Device {
                    request_names: d.request_names,
                    pool_name: d.pool_name,
                    device_name: d.device_name,
                    cdi_device_ids: d.cdi_device_ids,
                    share_id: None,
                })
                .collect();
            let answer = v1::NodePrepareResourceResponse {
                devices,
                error: r.error,
            };
            (uid, answer)
        })
        .collect();
    v1::NodePrepareResourcesResponse { claims }
}

fn check_complete(
    call: &'static str,
    uids: &[String],
    answered: impl Fn(&str) -> bool,
) -> Result<(), KubeletError> {
    let missing: Vec<String> = uids.iter().filter(|u| !answered(u)).cloned().collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KubeletError::MissingClaims { call, missing })
    }
}

async fn with_timeout<T>(
    call: &'static str,
    timeout: Duration,
    future: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, KubeletError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(status)) => Err(KubeletError::Call { call, status }),
        Err(_) => Err(KubeletError::Timeout { call, timeout }),
    }
}

/// The registration dial: the bare socket path through a connector, as the plugin watcher's
/// `grpc.DialContext(ctx, unixSocketPath, ...)` with a unix context dialer
/// (`pkg/kubelet/pluginmanager/operationexecutor/operation_generator.go`, `dial()`). grpc-go then
/// sends the path, percent-encoded, as `:authority`; the `http` crate refuses that authority, so
/// this channel sends `localhost` (the grpcio client in the plugin's tests sends the real one).
async fn dial_registration(path: &Path) -> Result<Channel, KubeletError> {
    let socket = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|source| KubeletError::Connect {
            path: path.to_path_buf(),
            source,
        })
}

/// The DRA dial: the target `unix:<endpoint>`, as the DRA plugin manager's
/// `grpc.NewClient("unix:" + endpoint, ...)` (`pkg/kubelet/cm/dra/plugin/dra_plugin_manager.go`,
/// `add()`), sending `localhost` as `:authority` like grpc-go does for `unix:` targets.
async fn dial_dra(path: &Path) -> Result<Channel, KubeletError> {
    let connect_error = |source| KubeletError::Connect {
        path: path.to_path_buf(),
        source,
    };
    Endpoint::from_shared(format!("unix:{}", path.display()))
        .map_err(connect_error)?
        .origin(http::Uri::from_static("http://localhost"))
        .connect()
        .await
        .map_err(connect_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(versions: &[&str]) -> PluginInfo {
        PluginInfo {
            r#type: DRA_PLUGIN_TYPE.into(),
            name: "can.dra.dev".into(),
            endpoint: "/nonexistent/dra.sock".into(),
            supported_versions: versions.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    #[test]
    fn health_preference_is_v1_then_v1alpha1() {
        let advertised = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            pick_health(&advertised(&[HEALTH_V1ALPHA1_SERVICE, HEALTH_V1_SERVICE])),
            Some(HealthVersion::V1)
        );
        assert_eq!(
            pick_health(&advertised(&[DRA_V1_SERVICE, HEALTH_V1ALPHA1_SERVICE])),
            Some(HealthVersion::V1alpha1)
        );
        assert_eq!(pick_health(&advertised(&[DRA_V1_SERVICE])), None);
    }

    fn report(
        pool: &str,
        device: &str,
        status: health::v1::HealthStatus,
        timeout: i64,
    ) -> health::v1::DeviceHealth {
        health::v1::DeviceHealth {
            device: Some(health::v1::DeviceIdentifier {
                pool_name: pool.into(),
                device_name: device.into(),
            }),
            health: status.into(),
            last_updated_time: 0,
            health_check_timeout_seconds: timeout,
            message: format!("{status:?}"),
        }
    }

    #[test]
    fn the_health_cache_follows_the_kubelets_rules() {
        use health::v1::HealthStatus::{Healthy, Unhealthy, Unknown};
        let t0 = Instant::now();
        let mut cache = HealthCache::default();
        let changed = cache.update(
            &[report("p", "a", Healthy, 0), report("p", "b", Unhealthy, 5)],
            t0,
        );
        assert_eq!(changed.len(), 2);
        assert_eq!(cache.get("p", "a", t0), (Healthy, "Healthy".into()));
        assert_eq!(
            cache.entry("p", "a").unwrap().timeout,
            DEFAULT_HEALTH_TIMEOUT
        );
        assert_eq!(cache.get("p", "x", t0).0, Unknown);
        // The same report again changes nothing; a device left out stays until its timeout.
        let t1 = t0 + Duration::from_secs(4);
        assert!(cache.update(&[report("p", "a", Healthy, 0)], t1).is_empty());
        assert_eq!(cache.get("p", "b", t1).0, Unhealthy);
        // Past b's 5 s without a report: Unknown, through the next report and on reading.
        let t2 = t0 + Duration::from_secs(6);
        assert_eq!(cache.get("p", "b", t2), (Unknown, String::new()));
        let changed = cache.update(&[report("p", "a", Healthy, 0)], t2);
        assert_eq!(changed, [("p".to_owned(), "b".to_owned())]);
        assert_eq!(cache.entry("p", "b").unwrap().health, Unknown);
        // a was reported at t2, so it is fresh until t2 + 30 s.
        assert_eq!(cache.get("p", "a", t2 + Duration::from_secs(30)).0, Healthy);
        assert_eq!(cache.get("p", "a", t2 + Duration::from_secs(31)).0, Unknown);
        cache.clear();
        assert_eq!(cache.get("p", "a", t2).0, Unknown);
    }

    #[test]
    fn wrong_type_and_relative_endpoints_are_rejected() {
        let kubelet = KubeletDouble::new("/nonexistent");
        let mut csi = info(&[DRA_V1_SERVICE]);
        csi.r#type = "CSIPlugin".into();
        assert!(kubelet.validate(&csi).unwrap_err().contains("CSIPlugin"));
        let mut relative = info(&[DRA_V1_SERVICE]);
        relative.endpoint = "dra.sock".into();
        assert!(
            kubelet
                .validate(&relative)
                .unwrap_err()
                .contains("absolute")
        );
    }
}
