//! The double's HTTP surface: maps Kubernetes REST paths onto [`ENDPOINTS`](super::ENDPOINTS),
//! decodes bodies into k8s-openapi types (or checks JSON documents), calls the store, opens watch
//! streams, and records every request with the client's bearer token.

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode, Uri, header};
use k8s_openapi::Resource;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, ResourceClaim, ResourceSlice};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::documents::{self, DocumentKind, Part, Precondition, merge_patch};
use super::events::{self, Opened};
use super::failure::Failure;
use super::fields::{self, FieldLabels, parse_field_selector};
use super::rbac::{self, Target};
use super::store::{Shared, Store, lock};
use super::{ENDPOINTS, Endpoint, RecordedRequest};

const APPLY_PATCH: &str = "application/apply-patch+yaml";
const MERGE_PATCH: &str = "application/merge-patch+json";

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        // The double serves one version per group: v1, and v1alpha1 for the project's own types.
        ["apis", group @ "can.dra.dev", "v1alpha1", rest @ ..] => (*group, rest),
        ["apis", group, "v1", rest @ ..] if *group != "can.dra.dev" => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
        _ => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, sub] => (*resource, Some(*name), Some(*sub)),
        _ => return None,
    };
    if [Some(resource), namespace, name, subresource]
        .into_iter()
        .flatten()
        .any(str::is_empty)
    {
        return None;
    }
    Some(Target {
        group: group.to_owned(),
        resource: resource.to_owned(),
        subresource: subresource.map(str::to_owned),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

fn find_endpoint(
    method: &Method,
    target: &Target,
    watch: bool,
) -> Result<&'static Endpoint, Failure> {
    let same_resource = |e: &&Endpoint| {
        e.api_group == target.group
            && e.resource == target.resource
            && e.subresource == target.subresource.as_deref()
            && e.namespaced == target.namespace.is_some()
    };
    let mut candidates = ENDPOINTS.iter().filter(same_resource).peekable();
    if candidates.peek().is_none() {
        return Err(Failure::unknown_path());
    }
    // A served resource with a verb the daemon does not use (say listing Nodes): 405, not 404.
    candidates
        .find(|e| {
            e.method == method.as_str()
                && e.named == target.name.is_some()
                && (e.verb == "watch") == watch
        })
        .ok_or_else(|| Failure::method_not_allowed(method.as_str(), &target.resource))
}

/// The single handler behind every path: the double routes by itself so that unknown paths get a
/// Kubernetes `Status` body, as from kube-apiserver.
pub(crate) async fn handle(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: Vec<(String, String)> = Query::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
    let watch = query
        .iter()
        .any(|(k, v)| k == "watch" && matches!(v.as_str(), "true" | "1"));
    let target = parse_path(uri.path());
    let endpoint = target
        .as_ref()
        .ok_or_else(Failure::unknown_path)
        .and_then(|t| find_endpoint(&method, t, watch));
    let header_text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header_text(header::CONTENT_TYPE)
        .map(|v| v.split(';').next().unwrap_or(&v).trim().to_owned());
    let token = header_text(header::AUTHORIZATION)
        .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_owned()));
    let user_agent = header_text(header::USER_AGENT);
    let mut store = lock(&shared);
    let matched = endpoint.as_ref().ok().copied().copied();
    let injected = store.take_injected(method.as_str(), uri.path());
    // Authentication and authorization come first, as in kube-apiserver's filter chain.
    let user = match (&injected, &target) {
        (None, Some(t)) => {
            rbac::authorize(&store.rbac, method.as_str(), t, &query, token.as_deref())
        }
        _ => Ok(None),
    };
    let outcome = match (injected, &target, endpoint, user) {
        (Some(code), _, _, _) => Err(Failure::injected(code)),
        (None, _, _, Err(denied)) => Err(denied),
        (None, Some(target), Ok(endpoint), Ok(user)) => serve(
            &mut store,
            endpoint,
            target,
            &Request {
                query: &query,
                content_type: content_type.as_deref(),
                body: &body,
                user: user.as_ref(),
            },
        ),
        (None, _, Err(failure), _) => Err(failure),
        (None, None, Ok(_), _) => Err(Failure::unknown_path()),
    };
    let (status, response_body) = match outcome {
        Ok(Answer::Object(status, value)) => (status, Body::from(value.to_string())),
        Ok(Answer::Watch(opened)) => (StatusCode::OK, watch_body(*opened)),
        Err(failure) => (failure.code, Body::from(failure.status_body().to_string())),
    };
    tracing::debug!(%method, path = uri.path(), status = status.as_u16(), "api server double");
    store.log.push(RecordedRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
        status: status.as_u16(),
        endpoint: matched,
        token,
        user_agent,
    });
    drop(store);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        response_body,
    )
        .into_response()
}

fn watch_body(opened: Opened) -> Body {
    match opened {
        Opened::Stream(start) => events::stream(*start),
        Opened::Expired { requested, oldest } => events::expired_body(requested, oldest),
    }
}

/// What a served request answers: one object, or a stream of watch events.
enum Answer {
    Object(StatusCode, Value),
    Watch(Box<Opened>),
}

struct Request<'a> {
    query: &'a [(String, String)],
    content_type: Option<&'a str>,
    body: &'a [u8],
    /// Who sent it, when RBAC is on.
    user: Option<&'a rbac::User>,
}

impl Request<'_> {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.param(key), Some("true" | "1"))
    }

    fn reject_labels(&self) -> Result<(), Failure> {
        if self.param("labelSelector").is_some_and(|s| !s.is_empty()) {
            return Err(Failure::bad_request(
                "labelSelector is not supported by this API server double",
            ));
        }
        Ok(())
    }

    /// The body as JSON.
    fn json(&self) -> Result<Value, Failure> {
        serde_json::from_slice(self.body)
            .map_err(|e| Failure::bad_request(format!("body is not JSON: {e}")))
    }

    /// Decodes a JSON body into a k8s-openapi type (which also checks apiVersion and kind).
    fn object<T: DeserializeOwned + Resource>(&self) -> Result<T, Failure> {
        let value: Value = serde_json::from_slice(self.body)
            .map_err(|e| Failure::bad_request(format!("body is not JSON: {e}")))?;
        decode(value)
    }

    /// Decodes a server-side apply body (YAML, of which JSON is a subset) and its parameters.
    fn apply(&self) -> Result<(Value, String, bool), Failure> {
        let content_type = self.content_type.unwrap_or_default();
        if content_type != APPLY_PATCH {
            return Err(Failure::unsupported_media_type(content_type));
        }
        let manager = self.param("fieldManager").unwrap_or_default();
        if manager.is_empty() {
            return Err(Failure::bad_request(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            ));
        }
        let force = matches!(self.param("force"), Some("true" | "1"));
        let value: Value = match serde_json::from_slice(self.body) {
            Ok(value) => value,
            Err(_) => serde_yaml::from_slice(self.body)
                .map_err(|e| Failure::bad_request(format!("body is neither JSON nor YAML: {e}")))?,
        };
        Ok((value, manager.to_owned(), force))
    }
}

fn decode<T: DeserializeOwned + Resource>(value: Value) -> Result<T, Failure> {
    for (key, expected) in [("apiVersion", T::API_VERSION), ("kind", T::KIND)] {
        let given = value.get(key).and_then(Value::as_str).unwrap_or_default();
        if given != expected {
            return Err(Failure::bad_request(format!(
                "{key} {given:?} does not match the endpoint's {expected:?}"
            )));
        }
    }
    serde_json::from_value(value)
        .map_err(|e| Failure::bad_request(format!("cannot decode {}: {e}", T::KIND)))
}

fn to_json<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap_or_else(|e| json!({ "error": e.to_string() }))
}

fn list<T: serde::Serialize + Resource>(store: &Store, items: &[T]) -> Value {
    json!({
        "apiVersion": T::API_VERSION,
        "kind": format!("{}List", T::KIND),
        "metadata": { "resourceVersion": store.revision() },
        "items": items.iter().map(to_json).collect::<Vec<_>>(),
    })
}

/// Checks that the name in the body matches the one in the path.
fn same_name(in_body: Option<&str>, in_path: &str) -> Result<(), Failure> {
    match in_body {
        Some(name) if !name.is_empty() && name != in_path => Err(Failure::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({in_path})"
        ))),
        _ => Ok(()),
    }
}

type Outcome = Result<Answer, Failure>;

fn ok(value: Value) -> Outcome {
    Ok(Answer::Object(StatusCode::OK, value))
}

/// The field labels a list or watch of `resource` may select on.
fn selectable(resource: &str) -> &'static FieldLabels {
    match resource {
        "nodes" => &fields::NODE_FIELDS,
        "resourceslices" => &fields::SLICE_FIELDS,
        "resourceclaims" => &fields::META_FIELDS,
        other => documents::kind_of(other).map_or(&fields::META_FIELDS, |k| k.selectable),
    }
}

/// `apiVersion` and `kind` of the objects of `resource`.
fn type_meta(resource: &str) -> (&'static str, &'static str) {
    match resource {
        "nodes" => (Node::API_VERSION, Node::KIND),
        "resourceclaims" => (ResourceClaim::API_VERSION, ResourceClaim::KIND),
        "resourceslices" => (ResourceSlice::API_VERSION, ResourceSlice::KIND),
        other => documents::kind_of(other).map_or(("v1", "Unknown"), |k| (k.api_version, k.kind)),
    }
}

/// Every stored object of `resource`, as JSON, for the start of a watch.
fn current(store: &Store, resource: &str) -> Vec<Value> {
    match resource {
        "nodes" => store.list_nodes(&[]).iter().map(to_json).collect(),
        "resourceclaims" => store
            .claims
            .values()
            .map(|stored| to_json(&stored.claim))
            .collect(),
        "resourceslices" => store.list_slices(&[]).iter().map(to_json).collect(),
        other => documents::kind_of(other)
            .map(|kind| store.list_documents(kind, None, &[]))
            .unwrap_or_default(),
    }
}

/// The checks of a list's or watch's options kube-apiserver makes before serving it
/// (apimachinery `pkg/apis/meta/internalversion/validation/validation.go` `ValidateListOptions` and
/// `validateWatchOptions`, answered as a 422 `ListOptions.meta.k8s.io` by `handlers/get.go`
/// `ListResource`). A streaming list is a watch with `sendInitialEvents` and
/// `resourceVersionMatch=NotOlderThan`; a plain list may not ask for initial events.
fn list_options(request: &Request<'_>, watch: bool) -> Result<(), Failure> {
    let forbidden = |field: &str, detail: &str| {
        Err(Failure::invalid(
            "ListOptions.meta.k8s.io",
            "",
            field,
            format!("Forbidden: {detail}"),
        ))
    };
    let matching = request.param("resourceVersionMatch").unwrap_or_default();
    let initial_events = request.param("sendInitialEvents").is_some();
    let version = request.param("resourceVersion").unwrap_or_default();
    if watch {
        if initial_events && matching != "NotOlderThan" {
            return forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            );
        }
        if !matching.is_empty() && !initial_events {
            return forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            );
        }
        if !matching.is_empty() && matching != "NotOlderThan" {
            return Err(Failure::invalid(
                "ListOptions.meta.k8s.io",
                "",
                "resourceVersionMatch",
                format!("Unsupported value: {matching:?}: supported values: \"NotOlderThan\""),
            ));
        }
        return Ok(());
    }
    if !matching.is_empty() && version.is_empty() {
        return forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        );
    }
    if initial_events {
        return forbidden(
            "sendInitialEvents",
            "sendInitialEvents is forbidden for list",
        );
    }
    Ok(())
}

fn open_watch(
    store: &Store,
    endpoint: &Endpoint,
    target: &Target,
    request: &Request<'_>,
) -> Outcome {
    request.reject_labels()?;
    let fields = parse_field_selector(
        request.param("fieldSelector").unwrap_or_default(),
        selectable(endpoint.resource),
    )?;
    let watch = events::WatchRequest {
        filter: events::Filter {
            resource: endpoint.resource,
            namespace: target.namespace.clone(),
            fields,
        },
        resource_version: request.param("resourceVersion"),
        bookmarks: request.flag("allowWatchBookmarks"),
        send_initial_events: request.flag("sendInitialEvents"),
        timeout_seconds: request.param("timeoutSeconds").and_then(|t| t.parse().ok()),
        type_meta: type_meta(endpoint.resource),
    };
    let opened = store
        .events
        .open(
            watch,
            || current(store, endpoint.resource),
            store.revision_number(),
        )
        .map_err(Failure::bad_request)?;
    Ok(Answer::Watch(Box::new(opened)))
}

fn serve(
    store: &mut Store,
    endpoint: &Endpoint,
    target: &Target,
    request: &Request<'_>,
) -> Outcome {
    let name = target.name.as_deref().unwrap_or_default();
    let namespace = target.namespace.as_deref().unwrap_or_default();
    if matches!(endpoint.verb, "list" | "watch") {
        list_options(request, endpoint.verb == "watch")?;
    }
    if endpoint.verb == "watch" {
        return open_watch(store, endpoint, target, request);
    }
    if let Some(kind) = documents::kind_of(endpoint.resource) {
        return serve_document(store, kind, endpoint, target, request);
    }
    match (endpoint.resource, endpoint.subresource, endpoint.verb) {
        ("nodes", None, "get") => ok(to_json(&store.node(name)?)),
        ("nodes", None, "list") => {
            request.reject_labels()?;
            let terms = parse_field_selector(
                request.param("fieldSelector").unwrap_or_default(),
                selectable("nodes"),
            )?;
            let nodes = store.list_nodes(&terms);
            ok(list(store, &nodes))
        }
        ("nodes", None, "delete") => ok(to_json(&store.delete_node(name)?)),
        ("resourceclaims", None, "get") => ok(to_json(&store.claim(namespace, name)?)),
        ("resourceclaims", None, "list") => {
            request.reject_labels()?;
            let terms = parse_field_selector(
                request.param("fieldSelector").unwrap_or_default(),
                selectable("resourceclaims"),
            )?;
            let claims = store.list_claims(target.namespace.as_deref(), &terms);
            ok(list(store, &claims))
        }
        ("resourceclaims", Some("status"), "patch") => {
            let (value, manager, force) = request.apply()?;
            let devices = claim_status_devices(value, name)?;
            if let Some((old, updated)) =
                store.preview_claim_devices(namespace, name, &devices, &manager, force)
            {
                rbac::authorize_device_status(
                    &store.rbac,
                    request.user,
                    namespace,
                    name,
                    &old,
                    updated,
                )?;
            }
            ok(to_json(&store.apply_claim_devices(
                namespace, name, devices, &manager, force,
            )?))
        }
        ("resourceslices", None, "list") => {
            request.reject_labels()?;
            let terms = parse_field_selector(
                request.param("fieldSelector").unwrap_or_default(),
                selectable("resourceslices"),
            )?;
            let slices = store.list_slices(&terms);
            ok(list(store, &slices))
        }
        ("resourceslices", None, "get") => ok(to_json(&store.slice(name)?)),
        ("resourceslices", None, "create") => {
            let slice: ResourceSlice = request.object()?;
            Ok(Answer::Object(
                StatusCode::CREATED,
                to_json(&store.create_slice(slice)?),
            ))
        }
        ("resourceslices", None, "update") => {
            let slice: ResourceSlice = request.object()?;
            same_name(slice.metadata.name.as_deref(), name)?;
            let mut slice = slice;
            slice.metadata.name = Some(name.to_owned());
            ok(to_json(&store.update_slice(slice)?))
        }
        ("resourceslices", None, "patch") => {
            let (value, _manager, _force) = request.apply()?;
            let mut slice: ResourceSlice = decode(value)?;
            same_name(slice.metadata.name.as_deref(), name)?;
            slice.metadata.name = Some(name.to_owned());
            let (slice, created) = store.apply_slice(slice)?;
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(Answer::Object(code, to_json(&slice)))
        }
        ("resourceslices", None, "delete") => ok(to_json(&store.delete_slice(name)?)),
        _ => Err(Failure::method_not_allowed(
            endpoint.method,
            endpoint.resource,
        )),
    }
}

fn document_list(kind: &DocumentKind, store: &Store, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": kind.api_version,
        "kind": format!("{}List", kind.kind),
        "metadata": { "resourceVersion": store.revision() },
        "items": items,
    })
}

/// The `resourceVersion` a write body carries, if any.
fn given_version(value: &Value) -> Option<String> {
    value
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// CanBuses, Pods and Leases: the JSON document kinds.
fn serve_document(
    store: &mut Store,
    kind: &DocumentKind,
    endpoint: &Endpoint,
    target: &Target,
    request: &Request<'_>,
) -> Outcome {
    let name = target.name.as_deref().unwrap_or_default();
    let namespace = target.namespace.as_deref().unwrap_or_default();
    let part = match endpoint.subresource {
        Some("status") => Part::Status,
        _ => Part::Object,
    };
    match endpoint.verb {
        "get" => ok(store.document(kind, namespace, name)?),
        "list" => {
            request.reject_labels()?;
            let terms = parse_field_selector(
                request.param("fieldSelector").unwrap_or_default(),
                kind.selectable,
            )?;
            let items = store.list_documents(kind, target.namespace.as_deref(), &terms);
            ok(document_list(kind, store, items))
        }
        "create" => {
            let value = request.json()?;
            let created = store.create_document(kind, namespace, value, false)?;
            Ok(Answer::Object(StatusCode::CREATED, created))
        }
        "update" => {
            let value = request.json()?;
            same_name(
                value.pointer("/metadata/name").and_then(Value::as_str),
                name,
            )?;
            let precondition = Precondition {
                resource_version: given_version(&value),
                required: kind.update_needs_version,
            };
            ok(store.write_document(kind, namespace, name, value, part, precondition)?)
        }
        "patch" => {
            let (patch, apply) = match request.content_type.unwrap_or_default() {
                MERGE_PATCH => (request.json()?, false),
                APPLY_PATCH => (request.apply()?.0, true),
                other => return Err(Failure::unsupported_media_type(other)),
            };
            same_name(
                patch.pointer("/metadata/name").and_then(Value::as_str),
                name,
            )?;
            let version = given_version(&patch);
            let stored = match store.document(kind, namespace, name) {
                Ok(stored) => stored,
                // Apply creates what is missing; a merge patch needs an object to patch.
                Err(_) if apply && part == Part::Object => {
                    let mut fresh = patch;
                    merge_patch(
                        &mut fresh,
                        &json!({"metadata": {"name": name, "resourceVersion": null}}),
                    );
                    let created = store.create_document(kind, namespace, fresh, false)?;
                    return Ok(Answer::Object(StatusCode::CREATED, created));
                }
                Err(failure) => return Err(failure),
            };
            let mut merged = stored;
            merge_patch(&mut merged, &patch);
            let precondition = Precondition {
                resource_version: version,
                required: false,
            };
            ok(store.write_document(kind, namespace, name, merged, part, precondition)?)
        }
        "delete" => ok(store.delete_document(kind, namespace, name)?),
        _ => Err(Failure::method_not_allowed(
            endpoint.method,
            endpoint.resource,
        )),
    }
}

/// Extracts `status.devices` from an apply body for the claim status subresource. The double
/// only applies that list; anything else under `status` is refused rather than silently dropped,
/// so a daemon that tries to write allocation or reservations is caught.
fn claim_status_devices(value: Value, name: &str) -> Result<Vec<AllocatedDeviceStatus>, Failure> {
    for (key, expected) in [
        ("apiVersion", ResourceClaim::API_VERSION),
        ("kind", ResourceClaim::KIND),
    ] {
        let given = value.get(key).and_then(Value::as_str).unwrap_or_default();
        if given != expected {
            return Err(Failure::bad_request(format!(
                "{key} {given:?} does not match the endpoint's {expected:?}"
            )));
        }
    }
    same_name(
        value.pointer("/metadata/name").and_then(Value::as_str),
        name,
    )?;
    let Some(status) = value.get("status").and_then(Value::as_object) else {
        return Ok(Vec::new());
    };
    if let Some(other) = status.keys().find(|k| k.as_str() != "devices") {
        return Err(Failure::invalid(
            "ResourceClaim.resource.k8s.io",
            name,
            &format!("status.{other}"),
            "Forbidden: this double applies status.devices only",
        ));
    }
    match status.get("devices") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(devices) => serde_json::from_value(devices.clone())
            .map_err(|e| Failure::bad_request(format!("cannot decode status.devices: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_into_group_resource_namespace_name() {
        assert_eq!(
            parse_path("/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims/c/status"),
            Some(Target {
                group: "resource.k8s.io".into(),
                resource: "resourceclaims".into(),
                subresource: Some("status".into()),
                namespace: Some("ns".into()),
                name: Some("c".into()),
            })
        );
        assert_eq!(
            parse_path("/api/v1/nodes/n1"),
            Some(Target {
                resource: "nodes".into(),
                name: Some("n1".into()),
                ..Target::default()
            })
        );
        assert_eq!(
            parse_path("/apis/resource.k8s.io/v1beta1/resourceslices"),
            None
        );
        assert_eq!(parse_path("/healthz"), None);
    }
}
