//! **Test double** for kube-apiserver at the HTTP boundary: an in-process axum server (on
//! `127.0.0.1:<ephemeral port>`, or an address of the test's choosing with
//! [`ApiServer::start_on`]) that serves and accepts real `resource.k8s.io/v1`, `core/v1`,
//! `coordination.k8s.io/v1` and `can.dra.dev/v1alpha1` JSON, so the daemon's and the controller's
//! kube-rs code runs unchanged against it.
//!
//! It is not an API server. It keeps Nodes, ResourceClaims and ResourceSlices in memory as
//! k8s-openapi values, and CanBuses, Pods and Leases as JSON documents (decoded into their
//! k8s-openapi types where there is one, so malformed objects are refused with 400). It enforces
//! the resource.k8s.io/v1 limits a daemon could break (422, see [`validate`]), and sets `uid`,
//! `resourceVersion`, `creationTimestamp` and `generation` the way kube-apiserver does. Writes that
//! change nothing keep the resourceVersion; a write carrying a stale resourceVersion is a 409, and
//! a custom resource update without one is a 422. CanBus `status` is a subresource: writes to the
//! object keep the stored status, writes to `status` change nothing else. Failures carry a
//! `meta/v1` `Status` body. Field selectors may name exactly the labels kube-apiserver accepts for
//! each resource (any other is the same 400), and list and watch options are checked as
//! kube-apiserver checks them. `docs/testing.md` lists every rule the double restates, with its
//! upstream source, and the rules it does not enforce.
//!
//! Watches (`?watch=true` on a collection) stream `WatchEvent` JSON lines: without a
//! resourceVersion (or `0`) they start with an `ADDED` event per object, from a resourceVersion
//! they replay the changes after it from a bounded history, then follow live changes. With
//! `allowWatchBookmarks` a `BOOKMARK` follows the initial events and then comes every few seconds;
//! `sendInitialEvents` ends the initial events with the annotated bookmark of a streaming list. A
//! resourceVersion older than the history ([`ApiServer::compact`]) gets the `ERROR` event with a
//! 410 `Expired` status that kube-apiserver sends.
//!
//! Deliberate simplifications:
//! - Server-side apply is simplified. On a ResourceSlice the applying manager owns the whole
//!   `spec` (the applied spec replaces the stored one). On the claim status subresource only
//!   `status.devices` is accepted: each field manager owns the entries it applied, keyed by
//!   driver/pool/device/shareID; entries it stops listing are removed, and taking over another
//!   manager's entry needs `force=true`. On CanBuses an apply is a JSON merge patch of the applied
//!   object (fields a manager stops applying are not removed). No `managedFields` are kept.
//! - No label selectors, no pagination, no admission, no finalizers or garbage collection. Field
//!   selectors support `=`, `==` and `!=` on the fields kube-apiserver offers for the resource.
//! - Authentication and RBAC are opt-in ([`ApiServer::enable_rbac`], see [`rbac`]): without them
//!   the bearer token a client sends is only recorded ([`RecordedRequest::token`]), so that tests
//!   can tell clients apart ([`ApiServer::kubeconfig_yaml_as`]). With them, tokens map to users,
//!   requests are authorized by the roles given (such as the chart's), and from 1.36 on
//!   ([`ApiServer::set_minor_version`]) claim `status.devices` writes need `resourceclaims/driver`.
//! - Feature gates ([`gates`]): per served minor version as upstream, overridable with
//!   [`ApiServer::set_feature_gate`]; ResourceSlice writes lose the fields of disabled gates as
//!   kube-apiserver's `dropDisabledFields` drops them (alpha DRA fields are dropped in 1.34).
//! - Pods and Nodes are written by tests ([`ApiServer::insert_pod`], [`ApiServer::insert_node`]),
//!   as the kubelet and the scheduler would; clients only read them (and may delete Nodes).
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

mod documents;
mod events;
mod failure;
mod fields;
pub mod gates;
pub mod rbac;
mod routes;
mod store;
pub mod validate;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use tokio::task::JoinHandle;

pub use gates::FeatureGate;
pub use rbac::{RbacError, RbacPolicy, User};
use store::{Shared, Store, lock};

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
const CAN: &str = "can.dra.dev";
const COORDINATION: &str = "coordination.k8s.io";

/// Every endpoint the double serves: the calls the node daemon and the controller make to the API
/// server, and the ones tests use to play the rest of the cluster (deleting a Node). A request
/// outside this list fails, so a test that exercises a component proves its calls are all here.
/// `watch` is a `GET` of a collection with `?watch=true`.
pub const ENDPOINTS: &[Endpoint] = &[
    // core/v1 Nodes.
    endpoint("GET", "get", "", "nodes", None, false, true),
    endpoint("GET", "list", "", "nodes", None, false, false),
    endpoint("GET", "watch", "", "nodes", None, false, false),
    endpoint("DELETE", "delete", "", "nodes", None, false, true),
    // core/v1 Pods, in one namespace or in all.
    endpoint("GET", "get", "", "pods", None, true, true),
    endpoint("GET", "list", "", "pods", None, true, false),
    endpoint("GET", "list", "", "pods", None, false, false),
    endpoint("GET", "watch", "", "pods", None, true, false),
    endpoint("GET", "watch", "", "pods", None, false, false),
    // resource.k8s.io/v1 ResourceClaims.
    endpoint("GET", "get", RESOURCE, "resourceclaims", None, true, true),
    endpoint("GET", "list", RESOURCE, "resourceclaims", None, true, false),
    endpoint(
        "GET",
        "list",
        RESOURCE,
        "resourceclaims",
        None,
        false,
        false,
    ),
    endpoint(
        "GET",
        "watch",
        RESOURCE,
        "resourceclaims",
        None,
        true,
        false,
    ),
    endpoint(
        "GET",
        "watch",
        RESOURCE,
        "resourceclaims",
        None,
        false,
        false,
    ),
    endpoint(
        "PATCH",
        "patch",
        RESOURCE,
        "resourceclaims",
        Some("status"),
        true,
        true,
    ),
    // resource.k8s.io/v1 ResourceSlices.
    endpoint(
        "GET",
        "list",
        RESOURCE,
        "resourceslices",
        None,
        false,
        false,
    ),
    endpoint(
        "GET",
        "watch",
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
    // can.dra.dev/v1alpha1 CanBuses and their status subresource.
    endpoint("GET", "get", CAN, "canbuses", None, false, true),
    endpoint("GET", "list", CAN, "canbuses", None, false, false),
    endpoint("GET", "watch", CAN, "canbuses", None, false, false),
    endpoint("POST", "create", CAN, "canbuses", None, false, false),
    endpoint("PUT", "update", CAN, "canbuses", None, false, true),
    endpoint("PATCH", "patch", CAN, "canbuses", None, false, true),
    endpoint("DELETE", "delete", CAN, "canbuses", None, false, true),
    endpoint("GET", "get", CAN, "canbuses", Some("status"), false, true),
    endpoint(
        "PUT",
        "update",
        CAN,
        "canbuses",
        Some("status"),
        false,
        true,
    ),
    endpoint(
        "PATCH",
        "patch",
        CAN,
        "canbuses",
        Some("status"),
        false,
        true,
    ),
    // coordination.k8s.io/v1 Leases, for leader election.
    endpoint("GET", "get", COORDINATION, "leases", None, true, true),
    endpoint("POST", "create", COORDINATION, "leases", None, true, false),
    endpoint("PUT", "update", COORDINATION, "leases", None, true, true),
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
    /// The bearer token the client sent, if any: a test gives each client its own token
    /// ([`ApiServer::kubeconfig_yaml_as`]) to tell who wrote; with RBAC on it also names the user.
    pub token: Option<String>,
    /// The client's `User-Agent`, if any.
    pub user_agent: Option<String>,
}

impl RecordedRequest {
    /// Whether the request could change state (anything but GET).
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }

    /// Whether the request was made with bearer token `token`.
    pub fn is_from(&self, token: &str) -> bool {
        self.token.as_deref() == Some(token)
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
    #[error("cannot bind the API server double to {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server URL did not make a kube client configuration.
    #[error("cannot build a kube client for {url}: {message}")]
    Client {
        /// The server URL.
        url: String,
        /// Why.
        message: String,
    },
    /// A test's seed object could not be stored.
    #[error("cannot seed the API server double: {0}")]
    Seed(String),
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
        Self::start_on("127.0.0.1:0").await
    }

    /// Starts the double on `addr` (e.g. `192.0.2.254:0` for an address clients in other network
    /// namespaces can reach; port 0 picks a free one), on the current tokio runtime.
    pub async fn start_on(addr: &str) -> Result<Self, ApiServerError> {
        let bind = |source| ApiServerError::Bind {
            addr: addr.to_owned(),
            source,
        };
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
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

    /// A kube client talking to this double with bearer token `token` (see
    /// [`kubeconfig_yaml_as`](Self::kubeconfig_yaml_as)).
    pub async fn client_as(&self, token: &str) -> Result<kube::Client, ApiServerError> {
        let fail = |message: String| ApiServerError::Client {
            url: self.url(),
            message,
        };
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml_as(token))
            .map_err(|e| fail(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| fail(e.to_string()))?;
        kube::Client::try_from(config).map_err(|e| fail(e.to_string()))
    }

    /// A kubeconfig document pointing at this double, without credentials.
    pub fn kubeconfig_yaml(&self) -> String {
        self.kubeconfig_document("{}")
    }

    /// A kubeconfig document pointing at this double whose client sends bearer token `token`, so
    /// that the request log ([`RecordedRequest::token`]) tells this client's requests apart.
    pub fn kubeconfig_yaml_as(&self, token: &str) -> String {
        // A JSON string is a valid YAML scalar, quoting whatever the token holds.
        let token = serde_json::Value::String(token.to_owned());
        self.kubeconfig_document(&format!("{{token: {token}}}"))
    }

    fn kubeconfig_document(&self, user: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: apiserver-double\n  cluster:\n    server: {url}\n\
             users:\n- name: apiserver-double\n  user: {user}\ncontexts:\n- name: apiserver-double\n  context:\n    \
             cluster: apiserver-double\n    user: apiserver-double\n    namespace: default\n\
             current-context: apiserver-double\n",
            url = self.url()
        )
    }

    /// Writes [`kubeconfig_yaml`](Self::kubeconfig_yaml) to `path`, for binaries taking `--kubeconfig`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), ApiServerError> {
        write_file(path, &self.kubeconfig_yaml())
    }

    /// Writes [`kubeconfig_yaml_as`](Self::kubeconfig_yaml_as) to `path`.
    pub fn write_kubeconfig_as(&self, path: &Path, token: &str) -> Result<(), ApiServerError> {
        write_file(path, &self.kubeconfig_yaml_as(token))
    }

    /// Stores a Node (uid, resourceVersion and creationTimestamp are set; a given uid is kept).
    pub fn insert_node(&self, node: Node) -> Node {
        lock(&self.shared).insert_node(node)
    }

    /// Deletes a Node as its removal from the cluster would (watchers see it go).
    pub fn delete_node(&self, name: &str) -> Option<Node> {
        lock(&self.shared).delete_node(name).ok()
    }

    /// Stores a Pod as given, status included (namespace `default` if unset), as the kubelet and
    /// scheduler would have made it; replaces a Pod of the same namespace and name.
    pub fn insert_pod(&self, pod: Pod) -> Result<Pod, ApiServerError> {
        let value = serde_json::to_value(&pod).map_err(|e| ApiServerError::Seed(e.to_string()))?;
        let stored = lock(&self.shared)
            .create_document(&documents::PODS, "default", value, true)
            .map_err(|f| ApiServerError::Seed(f.message))?;
        serde_json::from_value(stored).map_err(|e| ApiServerError::Seed(e.to_string()))
    }

    /// Removes a Pod, returning whether it existed.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        lock(&self.shared)
            .delete_document(&documents::PODS, namespace, name)
            .is_ok()
    }

    /// The stored CanBus `name` as JSON, if any.
    pub fn canbus(&self, name: &str) -> Option<serde_json::Value> {
        lock(&self.shared)
            .document(&documents::CANBUSES, "", name)
            .ok()
    }

    /// The stored Lease `namespace/name`, if any.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Lease> {
        let value = lock(&self.shared)
            .document(&documents::LEASES, namespace, name)
            .ok()?;
        serde_json::from_value(value).ok()
    }

    /// Forgets the watch history, as an etcd compaction does: a watch from any resourceVersion
    /// issued so far gets 410 Gone and its client has to list again.
    pub fn compact(&self) {
        let mut store = lock(&self.shared);
        let revision = store.revision_number();
        store.events.compact(revision);
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

fn write_file(path: &Path, text: &str) -> Result<(), ApiServerError> {
    std::fs::write(path, text).map_err(|source| ApiServerError::Kubeconfig {
        path: path.display().to_string(),
        source,
    })
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Open watches are streams of their own; end them with the server.
        lock(&self.shared).events.close();
        self.task.abort();
    }
}

impl ApiServer {
    /// Turns authentication and RBAC on with `policy` (see [`rbac`]): from now on every
    /// request needs a token registered with [`add_token`](Self::add_token) (or is anonymous) and
    /// a bound rule that allows it. Calling it again replaces the policy.
    pub fn enable_rbac(&self, policy: RbacPolicy) {
        lock(&self.shared).rbac.policy = Some(policy);
    }

    /// Makes bearer token `token` authenticate as `user`, e.g.
    /// `User::service_account("can-dra", "can-dra-kubelet-plugin").on_node("node-a")`.
    pub fn add_token(&self, token: &str, user: User) {
        lock(&self.shared)
            .rbac
            .tokens
            .insert(token.to_owned(), user);
    }

    /// Serves as Kubernetes `1.<minor>` (1.34 until set): from 1.36 on, writes of
    /// `status.devices` are authorized per driver on `resourceclaims/driver` (with RBAC on).
    pub fn set_minor_version(&self, minor: u32) {
        lock(&self.shared).rbac.minor = minor;
    }
}

impl ApiServer {
    /// Turns `gate` on or off, overriding its default for the served minor version (see
    /// [`gates`]). Takes effect from the next request.
    pub fn set_feature_gate(&self, gate: FeatureGate, enabled: bool) {
        lock(&self.shared).gates.overrides.insert(gate, enabled);
    }

    /// Whether `gate` is on now (its override, else its default for the served minor version).
    pub fn feature_gate(&self, gate: FeatureGate) -> bool {
        let store = lock(&self.shared);
        store.gates.gate(store.rbac.minor(), gate)
    }
}
