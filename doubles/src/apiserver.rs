//! **Test double** for kube-apiserver at the HTTP boundary: an in-process axum server on
//! `127.0.0.1:<ephemeral port>` that serves and accepts real `resource.k8s.io/v1` and `core/v1`
//! JSON, so the daemon's kube-rs code runs unchanged against it.
//!
//! It is not an API server. It keeps Nodes, ResourceClaims and ResourceSlices in memory, decodes
//! every body into the k8s-openapi types (so malformed objects are refused with 400), enforces the
//! resource.k8s.io/v1 limits a daemon could break (422, see [`validate`]), and sets `uid`,
//! `resourceVersion`, `creationTimestamp` and `generation` the way kube-apiserver does. Writes that
//! change nothing keep the resourceVersion. Failures carry a `meta/v1` `Status` body.
//!
//! Deliberate simplifications:
//! - Server-side apply is simplified. On a ResourceSlice the applying manager owns the whole
//!   `spec` (the applied spec replaces the stored one). On the claim status subresource only
//!   `status.devices` is accepted: each field manager owns the entries it applied, keyed by
//!   driver/pool/device/shareID; entries it stops listing are removed, and taking over another
//!   manager's entry needs `force=true`. No `managedFields` are kept.
//! - No watch, no label selectors, no pagination, no admission, no authentication or RBAC. Field
//!   selectors support `=`, `==` and `!=` on the fields kube-apiserver offers for the resource.
//! - [`ApiServer::inject_failure`] makes chosen requests fail (409, 500, ...) to test races and
//!   outages.
//! - The served endpoints are listed in [`ENDPOINTS`]; anything else is a 404 (unknown path) or a
//!   405 (known resource, other verb). Every request, served or not, lands in the request log
//!   ([`ApiServer::requests`]) with the endpoint it matched, so tests can check RBAC coverage.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use can_dra_doubles::apiserver::ApiServer;
//! use k8s_openapi::api::core::v1::Node;
//!
//! let server = ApiServer::start().await?;
//! server.insert_node(Node {
//!     metadata: kube::api::ObjectMeta { name: Some("node-a".into()), ..Default::default() },
//!     ..Default::default()
//! });
//! let nodes: kube::Api<Node> = kube::Api::all(server.client()?);
//! assert!(nodes.get("node-a").await?.metadata.uid.is_some());
//! # Ok(()) }
//! ```

mod failure;
mod routes;
mod store;
pub mod validate;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use tokio::task::JoinHandle;

use routes::{Shared, lock};
use store::Store;

/// One REST call the double serves, with the RBAC terms that authorise it on a real cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The HTTP method.
    pub method: &'static str,
    /// The RBAC verb (`get`, `list`, `create`, `update`, `patch`, `delete`).
    pub verb: &'static str,
    /// The API group; empty for core (`/api/v1`).
    pub api_group: &'static str,
    /// The resource (plural).
    pub resource: &'static str,
    /// The subresource, such as `status`.
    pub subresource: Option<&'static str>,
    /// Whether the path carries `namespaces/<ns>/`.
    pub namespaced: bool,
    /// Whether the path names one object.
    pub named: bool,
}

const fn endpoint(
    method: &'static str,
    verb: &'static str,
    api_group: &'static str,
    resource: &'static str,
    subresource: Option<&'static str>,
    namespaced: bool,
    named: bool,
) -> Endpoint {
    Endpoint {
        method,
        verb,
        api_group,
        resource,
        subresource,
        namespaced,
        named,
    }
}

const RESOURCE: &str = "resource.k8s.io";

/// Every endpoint the double serves: the calls the node daemon makes to the API server. A request
/// outside this list fails, so a test that exercises the daemon proves its calls are all here.
pub const ENDPOINTS: &[Endpoint] = &[
    endpoint("GET", "get", "", "nodes", None, false, true),
    endpoint("GET", "get", RESOURCE, "resourceclaims", None, true, true),
    endpoint("GET", "list", RESOURCE, "resourceclaims", None, true, false),
    endpoint(
        "PATCH",
        "patch",
        RESOURCE,
        "resourceclaims",
        Some("status"),
        true,
        true,
    ),
    endpoint(
        "GET",
        "list",
        RESOURCE,
        "resourceslices",
        None,
        false,
        false,
    ),
    endpoint("GET", "get", RESOURCE, "resourceslices", None, false, true),
    endpoint(
        "POST",
        "create",
        RESOURCE,
        "resourceslices",
        None,
        false,
        false,
    ),
    endpoint(
        "PUT",
        "update",
        RESOURCE,
        "resourceslices",
        None,
        false,
        true,
    ),
    endpoint(
        "PATCH",
        "patch",
        RESOURCE,
        "resourceslices",
        None,
        false,
        true,
    ),
    endpoint(
        "DELETE",
        "delete",
        RESOURCE,
        "resourceslices",
        None,
        false,
        true,
    ),
];

/// One request the double received, as sent, with the answer's status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `PUT`.
    pub method: String,
    /// URL path, e.g. `/apis/resource.k8s.io/v1/resourceslices/node-a-can.dra.dev-0`.
    pub path: String,
    /// Raw query string, if any (percent-encoded as sent).
    pub query: Option<String>,
    /// The `Content-Type` without parameters, if any.
    pub content_type: Option<String>,
    /// The request body (empty for GET and DELETE without options).
    pub body: String,
    /// The HTTP status the double answered.
    pub status: u16,
    /// The endpoint the request matched; `None` for unknown paths.
    pub endpoint: Option<Endpoint>,
}

impl RecordedRequest {
    /// Whether the request could change state (anything but GET).
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }
}

/// Errors of the double's own set-up (not API failures, which are HTTP answers).
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The listening socket could not be bound.
    #[error("cannot bind the API server double to 127.0.0.1: {0}")]
    Bind(#[source] std::io::Error),
    /// The server URL did not make a kube client configuration.
    #[error("cannot build a kube client for {url}: {message}")]
    Client {
        /// The server URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The kubeconfig file could not be written.
    #[error("cannot write kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running API server double. Dropping it stops the server.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    shared: Shared,
    task: JoinHandle<()>,
}

impl ApiServer {
    /// Starts the double on an ephemeral loopback port, on the current tokio runtime.
    pub async fn start() -> Result<Self, ApiServerError> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(ApiServerError::Bind)?;
        let addr = listener.local_addr().map_err(ApiServerError::Bind)?;
        let shared: Shared = Arc::new(Mutex::new(Store::default()));
        let app = axum::Router::new()
            .fallback(routes::handle)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "API server double stopped");
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// The base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client talking to this double (default namespace `default`).
    pub fn client(&self) -> Result<kube::Client, ApiServerError> {
        let url = self.url();
        let fail = |message: String| ApiServerError::Client {
            url: url.clone(),
            message,
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| fail(e.to_string()))?;
        kube::Client::try_from(kube::Config::new(uri)).map_err(|e| fail(e.to_string()))
    }

    /// A kubeconfig document pointing at this double, without credentials.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: apiserver-double\n  cluster:\n    server: {url}\n\
             users:\n- name: apiserver-double\n  user: {{}}\ncontexts:\n- name: apiserver-double\n  context:\n    \
             cluster: apiserver-double\n    user: apiserver-double\n    namespace: default\n\
             current-context: apiserver-double\n",
            url = self.url()
        )
    }

    /// Writes [`kubeconfig_yaml`](Self::kubeconfig_yaml) to `path`, for binaries taking `--kubeconfig`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), ApiServerError> {
        std::fs::write(path, self.kubeconfig_yaml()).map_err(|source| ApiServerError::Kubeconfig {
            path: path.display().to_string(),
            source,
        })
    }

    /// Stores a Node (uid, resourceVersion and creationTimestamp are set; a given uid is kept).
    pub fn insert_node(&self, node: Node) -> Node {
        lock(&self.shared).insert_node(node)
    }

    /// Stores a ResourceClaim as given, status included (namespace `default` if unset; a given uid
    /// is kept). Replaces a claim of the same namespace and name.
    pub fn insert_claim(&self, claim: ResourceClaim) -> ResourceClaim {
        lock(&self.shared).insert_claim(claim)
    }

    /// Removes a claim, returning it if it existed.
    pub fn delete_claim(&self, namespace: &str, name: &str) -> Option<ResourceClaim> {
        lock(&self.shared).delete_claim(namespace, name)
    }

    /// The stored claim, if any.
    pub fn claim(&self, namespace: &str, name: &str) -> Option<ResourceClaim> {
        lock(&self.shared).claim(namespace, name).ok()
    }

    /// Stores a ResourceSlice as if someone else had created it (no validation).
    pub fn insert_slice(&self, slice: ResourceSlice) -> ResourceSlice {
        lock(&self.shared).insert_slice(slice)
    }

    /// Every stored ResourceSlice, ordered by name.
    pub fn slices(&self) -> Vec<ResourceSlice> {
        lock(&self.shared).list_slices(&[])
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared).log.clone()
    }

    /// The requests that could change state (all but GET), in order.
    pub fn writes(&self) -> Vec<RecordedRequest> {
        lock(&self.shared)
            .log
            .iter()
            .filter(|r| r.is_write())
            .cloned()
            .collect()
    }

    /// Makes the next `times` requests with this method and exact path fail with `code` (and the
    /// matching `Status` reason, e.g. 409 `Conflict`, 500 `InternalError`) instead of being served.
    /// They are still logged. For testing how the daemon copes with races and outages.
    pub fn inject_failure(&self, method: &str, path: &str, code: u16, times: usize) {
        lock(&self.shared).injected.push(store::InjectedFailure {
            method: method.to_owned(),
            path: path.to_owned(),
            code,
            remaining: times,
        });
    }

    /// Forgets the request log, e.g. between the set-up and the step under test.
    pub fn clear_requests(&self) {
        lock(&self.shared).log.clear();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
