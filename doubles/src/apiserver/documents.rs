//! Objects the double keeps as JSON documents rather than typed values: `can.dra.dev/v1alpha1`
//! CanBuses (whose Rust type lives in the controller, which depends on this crate), core/v1 Pods
//! and coordination.k8s.io/v1 Leases. They get the same bookkeeping as the typed objects (uid,
//! resourceVersion, creationTimestamp, generation, optimistic concurrency, watch events) and the
//! subresource rules kube-apiserver applies to a resource with a `status` subresource: writes to
//! the object keep the stored status, writes to `status` change nothing else.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Map, Value};

use super::failure::Failure;
use super::fields::{CLUSTER_CUSTOM_FIELDS, FieldLabels, FieldTerm, META_FIELDS, POD_FIELDS};
use super::store::{DELETED, MODIFIED, Store, added_or_modified};

/// How the double treats one kind of document.
#[derive(Debug)]
pub(crate) struct DocumentKind {
    /// The plural resource, e.g. `canbuses`.
    pub(crate) resource: &'static str,
    /// `plural.group`, as kube-apiserver names the resource in messages.
    pub(crate) qualified: &'static str,
    pub(crate) api_version: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) namespaced: bool,
    /// Whether `metadata.generation` counts spec changes.
    pub(crate) generation: bool,
    /// Whether `status` is a subresource (ignored by writes to the object itself).
    pub(crate) status_subresource: bool,
    /// Whether an update must carry a `resourceVersion` (custom resources require one).
    pub(crate) update_needs_version: bool,
    /// The field labels a list or watch can select on.
    pub(crate) selectable: &'static FieldLabels,
    /// Decodes the document into its Rust type where the double knows it (400 when malformed).
    check: fn(&Value) -> Result<(), String>,
}

fn check_canbus(value: &Value) -> Result<(), String> {
    match value.get("spec") {
        Some(Value::Object(_)) => Ok(()),
        _ => Err("CanBus.spec is required and must be an object".into()),
    }
}

fn check_typed<T: serde::de::DeserializeOwned>(value: &Value) -> Result<(), String> {
    serde_json::from_value::<T>(value.clone())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `can.dra.dev/v1alpha1` CanBus: cluster-scoped, with a status subresource. The double checks
/// only the object's shape; the CRD's schema is the controller's concern (its own tests cover it).
pub(crate) const CANBUSES: DocumentKind = DocumentKind {
    resource: "canbuses",
    qualified: "canbuses.can.dra.dev",
    api_version: "can.dra.dev/v1alpha1",
    kind: "CanBus",
    namespaced: false,
    generation: true,
    status_subresource: true,
    update_needs_version: true,
    selectable: &CLUSTER_CUSTOM_FIELDS,
    check: check_canbus,
};

/// core/v1 Pods: read by clients, written by tests through [`ApiServer::insert_pod`](super::ApiServer::insert_pod).
pub(crate) const PODS: DocumentKind = DocumentKind {
    resource: "pods",
    qualified: "pods",
    api_version: "v1",
    kind: "Pod",
    namespaced: true,
    generation: false,
    status_subresource: true,
    update_needs_version: false,
    selectable: &POD_FIELDS,
    check: check_typed::<Pod>,
};

/// coordination.k8s.io/v1 Leases, for leader election.
pub(crate) const LEASES: DocumentKind = DocumentKind {
    resource: "leases",
    qualified: "leases.coordination.k8s.io",
    api_version: "coordination.k8s.io/v1",
    kind: "Lease",
    namespaced: true,
    generation: false,
    status_subresource: false,
    update_needs_version: false,
    selectable: &META_FIELDS,
    check: check_typed::<Lease>,
};

/// The document kind serving `resource`, if any.
pub(crate) fn kind_of(resource: &str) -> Option<&'static DocumentKind> {
    [&CANBUSES, &PODS, &LEASES]
        .into_iter()
        .find(|k| k.resource == resource)
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn meta_of(value: &Value) -> ObjectMeta {
    value
        .get("metadata")
        .cloned()
        .and_then(|m| serde_json::from_value(m).ok())
        .unwrap_or_default()
}

fn set_meta(value: &mut Value, meta: &ObjectMeta) {
    if let (Some(object), Ok(meta)) = (value.as_object_mut(), serde_json::to_value(meta)) {
        object.insert("metadata".into(), meta);
    }
}

/// The optimistic-concurrency check of a write.
#[derive(Debug, Clone, Default)]
pub(crate) struct Precondition {
    /// The `resourceVersion` the writer read; a non-empty one must match the stored one.
    pub(crate) resource_version: Option<String>,
    /// Whether the write is refused without one (custom resource updates are).
    pub(crate) required: bool,
}

/// Which part of a document a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Object,
    Status,
}

impl Store {
    fn documents_of(&self, kind: &DocumentKind) -> Option<&BTreeMap<(String, String), Value>> {
        self.documents.get(kind.resource)
    }

    fn key(kind: &DocumentKind, namespace: &str, name: &str) -> (String, String) {
        let namespace = if kind.namespaced { namespace } else { "" };
        (namespace.to_owned(), name.to_owned())
    }

    /// One stored document.
    pub(crate) fn document(
        &self,
        kind: &DocumentKind,
        namespace: &str,
        name: &str,
    ) -> Result<Value, Failure> {
        self.documents_of(kind)
            .and_then(|d| d.get(&Self::key(kind, namespace, name)))
            .cloned()
            .ok_or_else(|| Failure::not_found(kind.qualified, name))
    }

    /// The documents of `kind` in `namespace` (all namespaces when `None`) matching `terms`.
    pub(crate) fn list_documents(
        &self,
        kind: &DocumentKind,
        namespace: Option<&str>,
        terms: &[FieldTerm],
    ) -> Vec<Value> {
        let filter = super::events::Filter {
            resource: kind.resource,
            namespace: namespace.filter(|_| kind.namespaced).map(str::to_owned),
            fields: terms.to_vec(),
        };
        self.documents_of(kind)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|doc| filter.selects(doc))
            .cloned()
            .collect()
    }

    fn check_document(kind: &DocumentKind, value: &Value) -> Result<(), Failure> {
        for (key, expected) in [("apiVersion", kind.api_version), ("kind", kind.kind)] {
            let given = value.get(key).and_then(Value::as_str).unwrap_or_default();
            if given != expected {
                return Err(Failure::bad_request(format!(
                    "{key} {given:?} does not match the endpoint's {expected:?}"
                )));
            }
        }
        (kind.check)(value)
            .map_err(|e| Failure::bad_request(format!("cannot decode {}: {e}", kind.kind)))
    }

    /// POST, or a test's seed when `seed` (which may replace an existing document and keeps a
    /// given status).
    pub(crate) fn create_document(
        &mut self,
        kind: &DocumentKind,
        namespace: &str,
        mut value: Value,
        seed: bool,
    ) -> Result<Value, Failure> {
        Self::check_document(kind, &value)?;
        let mut meta = meta_of(&value);
        if kind.namespaced {
            match meta.namespace.as_deref() {
                Some(given) if !given.is_empty() && given != namespace && !seed => {
                    return Err(Failure::bad_request(format!(
                        "the namespace of the provided object ({given}) does not match the namespace sent on the request ({namespace})"
                    )));
                }
                Some(given) if !given.is_empty() => {}
                _ => meta.namespace = Some(namespace.to_owned()),
            }
        } else {
            meta.namespace = None;
        }
        self.generate_name(&mut meta);
        let name = meta.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(Failure::invalid(
                kind.kind,
                "",
                "metadata.name",
                "Required value: name or generateName is required",
            ));
        }
        let key = Self::key(kind, meta.namespace.as_deref().unwrap_or_default(), &name);
        let exists = self
            .documents_of(kind)
            .is_some_and(|d| d.contains_key(&key));
        if !seed {
            if exists {
                return Err(Failure::already_exists(kind.qualified, &name));
            }
            if meta
                .resource_version
                .as_deref()
                .is_some_and(|rv| !rv.is_empty())
            {
                return Err(Failure::invalid(
                    kind.kind,
                    &name,
                    "metadata.resourceVersion",
                    "Invalid value: must be unset to create an object",
                ));
            }
            if kind.status_subresource
                && let Some(object) = value.as_object_mut()
            {
                // With a status subresource, a create cannot set the status.
                object.remove("status");
            }
        }
        self.stamp_created(&mut meta, kind.generation);
        set_meta(&mut value, &meta);
        self.documents
            .entry(kind.resource)
            .or_default()
            .insert(key, value.clone());
        self.emit(kind.resource, added_or_modified(seed && exists), &value);
        Ok(value)
    }

    /// PUT, a merge patch or an apply, once the body is merged: writes `candidate` as the new
    /// `part` of the stored document. A non-empty `resourceVersion` in `given_version` must match
    /// the stored one.
    pub(crate) fn write_document(
        &mut self,
        kind: &DocumentKind,
        namespace: &str,
        name: &str,
        candidate: Value,
        part: Part,
        precondition: Precondition,
    ) -> Result<Value, Failure> {
        Self::check_document(kind, &candidate)?;
        let old = self.document(kind, namespace, name)?;
        let old_meta = meta_of(&old);
        match precondition.resource_version.as_deref() {
            Some(rv) if !rv.is_empty() && Some(rv) != old_meta.resource_version.as_deref() => {
                return Err(Failure::stale(kind.qualified, name));
            }
            Some(rv) if !rv.is_empty() => {}
            _ if precondition.required => {
                return Err(Failure::invalid(
                    kind.kind,
                    name,
                    "metadata.resourceVersion",
                    "Invalid value: 0x0: must be specified for an update",
                ));
            }
            _ => {}
        }
        let mut new = match part {
            Part::Status => {
                let mut new = old.clone();
                if let Some(object) = new.as_object_mut() {
                    match candidate.get("status") {
                        Some(status) if !status.is_null() => {
                            object.insert("status".into(), status.clone())
                        }
                        _ => object.remove("status"),
                    };
                }
                new
            }
            Part::Object => {
                let mut new = candidate;
                if kind.status_subresource
                    && let Some(object) = new.as_object_mut()
                {
                    match old.get("status") {
                        Some(status) => object.insert("status".into(), status.clone()),
                        None => object.remove("status"),
                    };
                }
                // Fields the server owns are carried over, not taken from the client.
                let mut meta = meta_of(&new);
                meta.name = old_meta.name.clone();
                meta.namespace = old_meta.namespace.clone();
                meta.uid = old_meta.uid.clone();
                meta.creation_timestamp = old_meta.creation_timestamp.clone();
                meta.generation = old_meta.generation;
                meta.resource_version = old_meta.resource_version.clone();
                meta.managed_fields = None;
                set_meta(&mut new, &meta);
                new
            }
        };
        if new == old {
            // kube-apiserver skips writes that change nothing: no new resourceVersion.
            return Ok(old);
        }
        let mut meta = meta_of(&new);
        if kind.generation && new.get("spec") != old.get("spec") {
            meta.generation = Some(old_meta.generation.unwrap_or(0) + 1);
        }
        meta.resource_version = Some(self.next_revision());
        set_meta(&mut new, &meta);
        self.documents
            .entry(kind.resource)
            .or_default()
            .insert(Self::key(kind, namespace, name), new.clone());
        self.emit(kind.resource, MODIFIED, &new);
        Ok(new)
    }

    /// DELETE (or a test's removal).
    pub(crate) fn delete_document(
        &mut self,
        kind: &DocumentKind,
        namespace: &str,
        name: &str,
    ) -> Result<Value, Failure> {
        let removed = self
            .documents
            .get_mut(kind.resource)
            .and_then(|d| d.remove(&Self::key(kind, namespace, name)))
            .ok_or_else(|| Failure::not_found(kind.qualified, name))?;
        self.emit(kind.resource, DELETED, &removed);
        Ok(removed)
    }
}
