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
//!   on, across plugin instances through an `flock` on `<plugin-data-dir>/serialize.lock`
//!   ([`crate::serializer`]).
//!
//! Both versions are served by one handler, [`DraEndpoint`]; a version contributes only the
//! conversion of its messages ([`DraVersion`], implemented by [`V1`] and [`V1beta1`]). v1beta1
//! answers are the v1 answers minus `share_id`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use can_dra_proto::dra::{v1, v1beta1};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::driver::{ClaimRef, ClaimUid, Driver, DriverError, PreparedDevice};
use crate::serializer::Serializer;

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
    pub fn v1_server(&self) -> v1::dra_plugin_server::DraPluginServer<DraEndpoint<D, V1>> {
        v1::dra_plugin_server::DraPluginServer::new(DraEndpoint::new(self.clone()))
    }

    /// The DRA v1beta1 gRPC service.
    pub fn v1beta1_server(
        &self,
    ) -> v1beta1::dra_plugin_server::DraPluginServer<DraEndpoint<D, V1beta1>> {
        v1beta1::dra_plugin_server::DraPluginServer::new(DraEndpoint::new(self.clone()))
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
                // A panic in the driver must not take the plugin down with it; the
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

/// One version of the `DRAPlugin` wire API: its messages and how they convert from and to the
/// version-independent types. Everything else is shared by [`DraEndpoint`].
pub trait DraVersion: Send + Sync + 'static {
    /// Full gRPC method name of `NodePrepareResources`, for logs.
    const PREPARE_METHOD: &'static str;
    /// Full gRPC method name of `NodeUnprepareResources`, for logs.
    const UNPREPARE_METHOD: &'static str;
    /// `NodePrepareResourcesRequest`.
    type PrepareRequest: fmt::Debug + Send;
    /// `NodePrepareResourcesResponse`.
    type PrepareResponse: fmt::Debug + Send;
    /// `NodeUnprepareResourcesRequest`.
    type UnprepareRequest: fmt::Debug + Send;
    /// `NodeUnprepareResourcesResponse`.
    type UnprepareResponse: fmt::Debug + Send;

    /// The claims of a prepare request.
    fn prepare_claims(request: Self::PrepareRequest) -> Vec<ClaimRef>;
    /// The claims of an unprepare request.
    fn unprepare_claims(request: Self::UnprepareRequest) -> Vec<ClaimRef>;
    /// The wire form of the answers to a prepare call.
    fn prepare_response(answers: PrepareAnswers) -> Self::PrepareResponse;
    /// The wire form of the answers to an unprepare call.
    fn unprepare_response(answers: UnprepareAnswers) -> Self::UnprepareResponse;
}

/// DRA v1 (`k8s.io.kubelet.pkg.apis.dra.v1`, Kubernetes 1.34 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V1;

/// DRA v1beta1 (`k8s.io.kubelet.pkg.apis.dra.v1beta1`): v1 without `share_id`, which is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V1beta1;

/// The `DRAPlugin` service of one version `V` over [`DraService`]: the one request handler
/// every version shares.
#[derive(Debug)]
pub struct DraEndpoint<D, V> {
    service: DraService<D>,
    version: PhantomData<fn() -> V>,
}

impl<D: Driver, V: DraVersion> DraEndpoint<D, V> {
    fn new(service: DraService<D>) -> Self {
        Self {
            service,
            version: PhantomData,
        }
    }

    async fn handle_prepare(
        &self,
        request: Request<V::PrepareRequest>,
    ) -> Result<Response<V::PrepareResponse>, Status> {
        let service = &self.service;
        async move {
            let request = request.into_inner();
            tracing::debug!(?request, "request");
            let answers = service.prepare(V::prepare_claims(request)).await?;
            let response = V::prepare_response(answers);
            tracing::debug!(?response, "response");
            Ok(Response::new(response))
        }
        .instrument(service.span(V::PREPARE_METHOD))
        .await
    }

    async fn handle_unprepare(
        &self,
        request: Request<V::UnprepareRequest>,
    ) -> Result<Response<V::UnprepareResponse>, Status> {
        let service = &self.service;
        async move {
            let request = request.into_inner();
            tracing::debug!(?request, "request");
            let answers = service.unprepare(V::unprepare_claims(request)).await?;
            let response = V::unprepare_response(answers);
            tracing::debug!(?response, "response");
            Ok(Response::new(response))
        }
        .instrument(service.span(V::UNPREPARE_METHOD))
        .await
    }
}

fn claim_ref(namespace: String, uid: String, name: String) -> ClaimRef {
    ClaimRef {
        namespace,
        uid,
        name,
    }
}

impl DraVersion for V1 {
    const PREPARE_METHOD: &'static str =
        "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources";
    const UNPREPARE_METHOD: &'static str =
        "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources";
    type PrepareRequest = v1::NodePrepareResourcesRequest;
    type PrepareResponse = v1::NodePrepareResourcesResponse;
    type UnprepareRequest = v1::NodeUnprepareResourcesRequest;
    type UnprepareResponse = v1::NodeUnprepareResourcesResponse;

    fn prepare_claims(request: Self::PrepareRequest) -> Vec<ClaimRef> {
        let claims = request.claims.into_iter();
        claims
            .map(|c| claim_ref(c.namespace, c.uid, c.name))
            .collect()
    }

    fn unprepare_claims(request: Self::UnprepareRequest) -> Vec<ClaimRef> {
        let claims = request.claims.into_iter();
        claims
            .map(|c| claim_ref(c.namespace, c.uid, c.name))
            .collect()
    }

    fn prepare_response(answers: PrepareAnswers) -> Self::PrepareResponse {
        let claims = answers.into_iter().map(|(uid, answer)| {
            let (devices, error) = split(answer);
            let devices = devices
                .into_iter()
                .map(|device| v1::Device {
                    request_names: device.request_names,
                    pool_name: device.pool_name,
                    device_name: device.device_name,
                    cdi_device_ids: device.cdi_device_ids,
                    share_id: device.share_id,
                })
                .collect();
            (uid, v1::NodePrepareResourceResponse { devices, error })
        });
        v1::NodePrepareResourcesResponse {
            claims: claims.collect(),
        }
    }

    fn unprepare_response(answers: UnprepareAnswers) -> Self::UnprepareResponse {
        let claims = answers.into_iter().map(|(uid, answer)| {
            let error = answer.err().unwrap_or_default();
            (uid, v1::NodeUnprepareResourceResponse { error })
        });
        v1::NodeUnprepareResourcesResponse {
            claims: claims.collect(),
        }
    }
}

impl DraVersion for V1beta1 {
    const PREPARE_METHOD: &'static str =
        "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources";
    const UNPREPARE_METHOD: &'static str =
        "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodeUnprepareResources";
    type PrepareRequest = v1beta1::NodePrepareResourcesRequest;
    type PrepareResponse = v1beta1::NodePrepareResourcesResponse;
    type UnprepareRequest = v1beta1::NodeUnprepareResourcesRequest;
    type UnprepareResponse = v1beta1::NodeUnprepareResourcesResponse;

    fn prepare_claims(request: Self::PrepareRequest) -> Vec<ClaimRef> {
        let claims = request.claims.into_iter();
        claims
            .map(|c| claim_ref(c.namespace, c.uid, c.name))
            .collect()
    }

    fn unprepare_claims(request: Self::UnprepareRequest) -> Vec<ClaimRef> {
        let claims = request.claims.into_iter();
        claims
            .map(|c| claim_ref(c.namespace, c.uid, c.name))
            .collect()
    }

    fn prepare_response(answers: PrepareAnswers) -> Self::PrepareResponse {
        let claims = answers.into_iter().map(|(uid, answer)| {
            let (devices, error) = split(answer);
            // v1beta1 cannot carry `share_id`.
            let devices = devices
                .into_iter()
                .map(|device| v1beta1::Device {
                    request_names: device.request_names,
                    pool_name: device.pool_name,
                    device_name: device.device_name,
                    cdi_device_ids: device.cdi_device_ids,
                })
                .collect();
            (uid, v1beta1::NodePrepareResourceResponse { devices, error })
        });
        v1beta1::NodePrepareResourcesResponse {
            claims: claims.collect(),
        }
    }

    fn unprepare_response(answers: UnprepareAnswers) -> Self::UnprepareResponse {
        let claims = answers.into_iter().map(|(uid, answer)| {
            let error = answer.err().unwrap_or_default();
            (uid, v1beta1::NodeUnprepareResourceResponse { error })
        });
        v1beta1::NodeUnprepareResourcesResponse {
            claims: claims.collect(),
        }
    }
}

/// A claim's prepare answer as the wire holds it: devices and an error, one of them empty.
fn split(answer: Result<Vec<PreparedDevice>, String>) -> (Vec<PreparedDevice>, String) {
    match answer {
        Ok(devices) => (devices, String::new()),
        Err(error) => (Vec::new(), error),
    }
}

#[tonic::async_trait]
impl<D: Driver> v1::dra_plugin_server::DraPlugin for DraEndpoint<D, V1> {
    async fn node_prepare_resources(
        &self,
        request: Request<v1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1::NodePrepareResourcesResponse>, Status> {
        self.handle_prepare(request).await
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1::NodeUnprepareResourcesResponse>, Status> {
        self.handle_unprepare(request).await
    }
}

#[tonic::async_trait]
impl<D: Driver> v1beta1::dra_plugin_server::DraPlugin for DraEndpoint<D, V1beta1> {
    async fn node_prepare_resources(
        &self,
        request: Request<v1beta1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodePrepareResourcesResponse>, Status> {
        self.handle_prepare(request).await
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1beta1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodeUnprepareResourcesResponse>, Status> {
        self.handle_unprepare(request).await
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
}
