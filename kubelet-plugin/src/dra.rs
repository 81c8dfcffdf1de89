//! The DRA `DRAPlugin` service (`NodePrepareResources`, `NodeUnprepareResources`) in its v1
//! and v1beta1 versions, both over one implementation.
//!
//! Rules the kubelet relies on (`dra-api.md` §1.2, §3.1):
//! - an empty request succeeds (liveness probes send one);
//! - every claim of the request gets exactly one entry in the answer, keyed by its UID; a claim
//!   the driver left out is answered with an error instead of being dropped;
//! - a failure of one claim goes into that claim's `error`; a failure of the whole call is a
//!   gRPC status, after which the kubelet ignores the response and retries;
//! - calls into the driver are serialised, within the process and, when rolling updates are
//!   on, across plugin instances through an `flock` on `<plugin-data-dir>/serialize.lock`.
//!
//! v1beta1 is a conversion wrapper: same claims in, same answers out, minus `share_id`.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use can_dra_proto::dra::{v1, v1beta1};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::driver::{ClaimRef, ClaimUid, Driver, DriverError, PreparedDevice};

const V1_PREPARE: &str = "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources";
const V1_UNPREPARE: &str = "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources";
const V1BETA1_PREPARE: &str = "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources";
const V1BETA1_UNPREPARE: &str =
    "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodeUnprepareResources";

/// Errors of taking the serialisation lock.
#[derive(Debug, thiserror::Error)]
pub enum SerializeError {
    /// The lock file could not be opened or created.
    #[error("cannot open lock file {path}: {source}")]
    Open {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `flock` failed.
    #[error("cannot lock {path}: {errno}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        errno: Errno,
    },
    /// The blocking task waiting for the lock died.
    #[error("waiting for lock {path} failed: {reason}")]
    Wait {
        /// The lock file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Makes prepare/unprepare calls run one at a time.
#[derive(Debug)]
pub struct Serializer {
    mutex: Arc<Mutex<()>>,
    lock_file: Option<PathBuf>,
}

/// Held while one call runs in the driver; dropping it lets the next call in.
#[derive(Debug)]
pub struct SerialGuard {
    _file_lock: Option<Flock<File>>,
    _mutex: OwnedMutexGuard<()>,
}

impl Serializer {
    /// Serialises calls within this process only.
    pub fn in_process() -> Self {
        Self {
            mutex: Arc::new(Mutex::new(())),
            lock_file: None,
        }
    }

    /// Serialises calls within this process and, through an exclusive `flock` on `lock_file`,
    /// with every other instance using the same file (rolling updates share the plugin data
    /// directory). The file is created when missing.
    pub fn across_instances(lock_file: &Path) -> Self {
        Self {
            mutex: Arc::new(Mutex::new(())),
            lock_file: Some(lock_file.to_path_buf()),
        }
    }

    /// Waits until no other call runs, here or in another instance.
    pub async fn acquire(&self) -> Result<SerialGuard, SerializeError> {
        // The in-process mutex first: only one task per process then waits on the file lock,
        // and the blocking thread pool is not filled with waiters.
        let mutex = Arc::clone(&self.mutex).lock_owned().await;
        let file_lock = match &self.lock_file {
            None => None,
            Some(path) => {
                let path = path.clone();
                let wait_path = path.clone();
                let locked = tokio::task::spawn_blocking(move || lock_file(&path))
                    .await
                    .map_err(|e| SerializeError::Wait {
                        path: wait_path,
                        reason: e.to_string(),
                    })??;
                Some(locked)
            }
        };
        Ok(SerialGuard {
            _file_lock: file_lock,
            _mutex: mutex,
        })
    }
}

fn lock_file(path: &Path) -> Result<Flock<File>, SerializeError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| SerializeError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(locked) => return Ok(locked),
            Err((returned, Errno::EINTR)) => file = returned,
            Err((_, errno)) => {
                return Err(SerializeError::Lock {
                    path: path.to_path_buf(),
                    errno,
                });
            }
        }
    }
}

/// The version-independent DRA service: validates requests, serialises and calls the driver,
/// and completes the answers. Cheap to clone.
#[derive(Debug)]
pub struct DraService<D> {
    inner: Arc<Inner<D>>,
}

impl<D> Clone for DraService<D> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

#[derive(Debug)]
struct Inner<D> {
    driver: Arc<D>,
    serializer: Serializer,
    next_request_id: AtomicU64,
}

/// Per-claim outcome of a prepare call, as sent to the kubelet.
pub type PrepareAnswers = HashMap<ClaimUid, Result<Vec<PreparedDevice>, String>>;
/// Per-claim outcome of an unprepare call, as sent to the kubelet.
pub type UnprepareAnswers = HashMap<ClaimUid, Result<(), String>>;

impl<D: Driver> DraService<D> {
    /// A service calling `driver`, one call at a time as `serializer` allows.
    pub fn new(driver: Arc<D>, serializer: Serializer) -> Self {
        Self {
            inner: Arc::new(Inner {
                driver,
                serializer,
                next_request_id: AtomicU64::new(1),
            }),
        }
    }

    /// The DRA v1 gRPC service.
    pub fn v1_server(&self) -> v1::dra_plugin_server::DraPluginServer<DraV1<D>> {
        v1::dra_plugin_server::DraPluginServer::new(DraV1(self.clone()))
    }

    /// The DRA v1beta1 gRPC service.
    pub fn v1beta1_server(&self) -> v1beta1::dra_plugin_server::DraPluginServer<DraV1beta1<D>> {
        v1beta1::dra_plugin_server::DraPluginServer::new(DraV1beta1(self.clone()))
    }

    fn span(&self, method: &'static str) -> tracing::Span {
        let request_id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        tracing::info_span!("grpc", request_id, method)
    }

    /// Prepares `claims`: one answer per distinct claim UID.
    pub async fn prepare(&self, claims: Vec<ClaimRef>) -> Result<PrepareAnswers, Status> {
        let claims = check_claims(claims)?;
        if claims.is_empty() {
            // Nothing to do, and no reason to queue behind a running call: liveness probes
            // send empty requests and must get a prompt answer.
            return Ok(HashMap::new());
        }
        let driver = Arc::clone(&self.inner.driver);
        let forwarded = claims.clone();
        let results = self
            .run_serialised(async move { driver.prepare(forwarded).await })
            .await?;
        Ok(complete(&claims, results))
    }

    /// Unprepares `claims`: one answer per distinct claim UID.
    pub async fn unprepare(&self, claims: Vec<ClaimRef>) -> Result<UnprepareAnswers, Status> {
        let claims = check_claims(claims)?;
        if claims.is_empty() {
            return Ok(HashMap::new());
        }
        let driver = Arc::clone(&self.inner.driver);
        let forwarded = claims.clone();
        let results = self
            .run_serialised(async move { driver.unprepare(forwarded).await })
            .await?;
        Ok(complete(&claims, results))
    }

    /// Runs a driver call under the serialisation lock in its own task: if the kubelet gives
    /// up on the call (timeout, disconnect), the driver still finishes it and only then lets
    /// the next call in, instead of being cut off half-way.
    async fn run_serialised<T, F>(&self, call: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, DriverError>> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(
            async move {
                let _guard = inner.serializer.acquire().await.map_err(|error| {
                    tracing::error!(%error, "cannot serialise the call");
                    Status::unavailable(error.to_string())
                })?;
                call.await.map_err(|error| {
                    tracing::warn!(%error, "the driver failed the whole call");
                    status_of(&error)
                })
            }
            .in_current_span(),
        );
        match task.await {
            Ok(result) => result,
            Err(join_error) => {
                // A panic in the driver must not take the node daemon down with it; the
                // kubelet retries the call.
                tracing::error!(error = %join_error, "the driver call panicked or was cancelled");
                Err(Status::internal(format!(
                    "driver call aborted: {join_error}"
                )))
            }
        }
    }
}

fn status_of(error: &DriverError) -> Status {
    match error {
        DriverError::Unavailable(_) => Status::unavailable(error.to_string()),
        DriverError::FailedPrecondition(_) => Status::failed_precondition(error.to_string()),
        DriverError::Internal(_) => Status::internal(error.to_string()),
    }
}

/// Rejects claims missing a required field and drops repeated UIDs (the answer map can hold
/// each UID once anyway).
fn check_claims(claims: Vec<ClaimRef>) -> Result<Vec<ClaimRef>, Status> {
    let mut seen = HashSet::new();
    let mut distinct = Vec::with_capacity(claims.len());
    for claim in claims {
        for (field, value) in [
            ("namespace", &claim.namespace),
            ("uid", &claim.uid),
            ("name", &claim.name),
        ] {
            if value.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "claim {claim}: {field} is required"
                )));
            }
        }
        if seen.insert(claim.uid.clone()) {
            distinct.push(claim);
        }
    }
    Ok(distinct)
}

/// One answer per requested claim: the driver's, or an error for a claim it left out.
fn complete<T>(
    claims: &[ClaimRef],
    mut results: HashMap<ClaimUid, Result<T, String>>,
) -> HashMap<ClaimUid, Result<T, String>> {
    let mut answers = HashMap::with_capacity(claims.len());
    for claim in claims {
        let answer = match results.remove(&claim.uid) {
            Some(Err(reason)) if reason.is_empty() => {
                // An empty error string would read as success to the kubelet.
                Err(format!("claim {claim} failed without a reason"))
            }
            Some(answer) => answer,
            None => {
                tracing::warn!(%claim, "the driver returned no result for a claim");
                Err(format!("the driver returned no result for claim {claim}"))
            }
        };
        answers.insert(claim.uid.clone(), answer);
    }
    if !results.is_empty() {
        let extra: Vec<_> = results.keys().collect();
        tracing::warn!(?extra, "the driver answered claims that were not requested");
    }
    answers
}

/// DRA v1 over [`DraService`].
#[derive(Debug)]
pub struct DraV1<D>(DraService<D>);

/// DRA v1beta1 over [`DraService`]; `share_id` is dropped because v1beta1 cannot carry it.
#[derive(Debug)]
pub struct DraV1beta1<D>(DraService<D>);

fn claim_ref(namespace: String, uid: String, name: String) -> ClaimRef {
    ClaimRef {
        namespace,
        uid,
        name,
    }
}

fn v1_device(device: PreparedDevice) -> v1::Device {
    v1::Device {
        request_names: device.request_names,
        pool_name: device.pool_name,
        device_name: device.device_name,
        cdi_device_ids: device.cdi_device_ids,
        share_id: device.share_id,
    }
}

/// v1beta1 is v1 without `share_id`.
fn v1beta1_device(device: v1::Device) -> v1beta1::Device {
    v1beta1::Device {
        request_names: device.request_names,
        pool_name: device.pool_name,
        device_name: device.device_name,
        cdi_device_ids: device.cdi_device_ids,
    }
}

impl<D: Driver> DraService<D> {
    /// The v1 answer to a prepare call; the v1beta1 service converts it, so the mapping from the
    /// driver's answers to the wire lives here once.
    async fn prepare_v1(
        &self,
        claims: Vec<ClaimRef>,
    ) -> Result<v1::NodePrepareResourcesResponse, Status> {
        let answers = self.prepare(claims).await?;
        let claims = answers
            .into_iter()
            .map(|(uid, answer)| {
                let answer = match answer {
                    Ok(devices) => v1::NodePrepareResourceResponse {
                        devices: devices.into_iter().map(v1_device).collect(),
                        error: String::new(),
                    },
                    Err(error) => v1::NodePrepareResourceResponse {
                        devices: Vec::new(),
                        error,
                    },
                };
                (uid, answer)
            })
            .collect();
        Ok(v1::NodePrepareResourcesResponse { claims })
    }

    /// The v1 answer to an unprepare call (v1beta1 converts it).
    async fn unprepare_v1(
        &self,
        claims: Vec<ClaimRef>,
    ) -> Result<v1::NodeUnprepareResourcesResponse, Status> {
        let answers = self.unprepare(claims).await?;
        let claims = answers
            .into_iter()
            .map(|(uid, answer)| {
                let error = answer.err().unwrap_or_default();
                (uid, v1::NodeUnprepareResourceResponse { error })
            })
            .collect();
        Ok(v1::NodeUnprepareResourcesResponse { claims })
    }
}

#[tonic::async_trait]
impl<D: Driver> v1::dra_plugin_server::DraPlugin for DraV1<D> {
    async fn node_prepare_resources(
        &self,
        request: Request<v1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1::NodePrepareResourcesResponse>, Status> {
        let service = &self.0;
        async move {
            let request = request.into_inner();
            tracing::debug!(?request, "request");
            let claims = request
                .claims
                .into_iter()
                .map(|c| claim_ref(c.namespace, c.uid, c.name))
                .collect();
            let response = service.prepare_v1(claims).await?;
            tracing::debug!(?response, "response");
            Ok(Response::new(response))
        }
        .instrument(service.span(V1_PREPARE))
        .await
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1::NodeUnprepareResourcesResponse>, Status> {
        let service = &self.0;
        async move {
            let request = request.into_inner();
            tracing::debug!(?request, "request");
            let claims = request
                .claims
                .into_iter()
                .map(|c| claim_ref(c.namespace, c.uid, c.name))
                .collect();
            let response = service.unprepare_v1(claims).await?;
            tracing::debug!(?response, "response");
            Ok(Response::new(response))
        }
        .instrument(service.span(V1_UNPREPARE))
        .await
    }
}

#[tonic::async_trait]
impl<D: Driver> v1beta1::dra_plugin_server::DraPlugin for DraV1beta1<D> {
    async fn node_prepare_resources(
        &self,
        request: Request<v1beta1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodePrepareResourcesResponse>, Status> {
        let service = &self.0;
        async move {
            let request = request.into_inner();
            tracing::debug!(?request, "request");
            let claims = request
                .claims
                .into_iter()
                .map(|c| claim_ref(c.namespace, c.uid, c.name))
                .collect();
            let claims = service
                .prepare_v1(claims)
                .await?
                .claims
                .into_iter()
                .map(|(uid, answer)| {
                    let answer = v1beta1::NodePrepareResourceResponse {
                        devices: answer.devices.into_iter().map(v1beta1_device).collect(),
                        error: answer.error,
                    };
                    (uid, answer)
                })
                .collect();
            let response = v1beta1::NodePrepareResourcesResponse { claims };
            tracing::debug!(?response, "response");
            Ok(Response::new(response))
        }
        .instrument(service.span(V1BETA1_PREPARE))
        .await
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1beta1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodeUnprepareResourcesResponse>, Status> {
        let service = &self.0;
        async move {
            let request = request.into_inner();
            tracing::debug!(?request, "request");
            let claims = request
                .claims
                .into_iter()
                .map(|c| claim_ref(c.namespace, c.uid, c.name))
                .collect();
            let claims = service
                .unprepare_v1(claims)
                .await?
                .claims
                .into_iter()
                .map(|(uid, answer)| {
                    let error = answer.error;
                    (uid, v1beta1::NodeUnprepareResourceResponse { error })
                })
                .collect();
            let response = v1beta1::NodeUnprepareResourcesResponse { claims };
            tracing::debug!(?response, "response");
            Ok(Response::new(response))
        }
        .instrument(service.span(V1BETA1_UNPREPARE))
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(uid: &str) -> ClaimRef {
        claim_ref("ns".into(), uid.into(), format!("claim-{uid}"))
    }

    #[test]
    fn every_claim_gets_one_answer() {
        let claims = [claim("a"), claim("b"), claim("c")];
        let mut results: HashMap<ClaimUid, Result<u8, String>> = HashMap::new();
        results.insert("a".into(), Ok(1));
        results.insert("b".into(), Err(String::new()));
        results.insert("z".into(), Ok(9));
        let answers = complete(&claims, results);
        assert_eq!(answers.len(), 3);
        assert_eq!(answers["a"], Ok(1));
        assert!(
            answers["b"]
                .as_ref()
                .unwrap_err()
                .contains("without a reason")
        );
        assert!(answers["c"].as_ref().unwrap_err().contains("no result"));
    }

    #[test]
    fn claims_need_all_fields_and_repeats_collapse() {
        let mut missing = claim("a");
        missing.namespace.clear();
        let status = check_claims(vec![missing]).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("namespace"), "{status:?}");

        let distinct = check_claims(vec![claim("a"), claim("b"), claim("a")]).unwrap();
        assert_eq!(distinct, [claim("a"), claim("b")]);
    }

    #[tokio::test]
    async fn the_file_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SERIALIZE_LOCK);
        let first = Serializer::across_instances(&path);
        let second = Serializer::across_instances(&path);
        let guard = first.acquire().await.unwrap();
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(200), second.acquire()).await;
        assert!(
            waiting.is_err(),
            "a second instance got the lock while it was held"
        );
        drop(guard);
        let taken = tokio::time::timeout(std::time::Duration::from_secs(5), second.acquire()).await;
        assert!(taken.is_ok(), "the lock was not released");
    }

    const SERIALIZE_LOCK: &str = crate::sockets::SERIALIZE_LOCK_FILE;
}
