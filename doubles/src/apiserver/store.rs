//! The double's in-memory object store: Nodes, ResourceClaims and ResourceSlices as k8s-openapi
//! values (CanBuses, Pods and Leases as JSON documents, see `documents`), with the bookkeeping
//! kube-apiserver does on every write (uid, resourceVersion, creationTimestamp, generation), a
//! simplified server-side apply, and a watch event for every change (see `events`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, ResourceClaim, ResourceSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

use serde_json::Value;

use super::RecordedRequest;
use super::events::{Event, EventLog};
use super::failure::Failure;
use super::fields::{FieldTerm, fields_match};
use super::validate;

/// `plural.group` of the resources, as kube-apiserver names them in messages.
pub(crate) const SLICES: &str = "resourceslices.resource.k8s.io";
pub(crate) const CLAIMS: &str = "resourceclaims.resource.k8s.io";
pub(crate) const NODES: &str = "nodes";
/// The plural resource names, as in paths and watch events.
pub(crate) const CLAIMS_RESOURCE: &str = "resourceclaims";
pub(crate) const SLICES_RESOURCE: &str = "resourceslices";

/// Watch event types.
pub(crate) const ADDED: &str = "ADDED";
pub(crate) const MODIFIED: &str = "MODIFIED";
pub(crate) const DELETED: &str = "DELETED";

pub(crate) fn added_or_modified(existed: bool) -> &'static str {
    if existed { MODIFIED } else { ADDED }
}

/// The list-map key of `status.devices`: driver, pool, device, shareID.
pub(crate) type DeviceKey = (String, String, String, Option<String>);

fn device_key(entry: &AllocatedDeviceStatus) -> DeviceKey {
    (
        entry.driver.clone(),
        entry.pool.clone(),
        entry.device.clone(),
        entry.share_id.clone(),
    )
}

/// The field manager recorded for `status.devices` entries that were seeded, not applied.
pub(crate) const SEED_MANAGER: &str = "before-first-apply";

/// A claim plus which field manager applied each of its `status.devices` entries.
#[derive(Debug, Clone)]
pub(crate) struct StoredClaim {
    pub(crate) claim: ResourceClaim,
    pub(crate) device_owners: BTreeMap<DeviceKey, String>,
}

fn selected<T: serde::Serialize>(terms: &[FieldTerm], object: &T) -> bool {
    terms.is_empty() || serde_json::to_value(object).is_ok_and(|v| fields_match(terms, &v))
}

/// State shared by the server task and the test's [`ApiServer`](super::ApiServer) handle.
pub(crate) type Shared = Arc<Mutex<Store>>;

/// Locks the store; a panic in another request must not hide the state from the test.
pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, Store> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The whole state of the double.
#[derive(Debug, Default)]
pub(crate) struct Store {
    revision: u64,
    uids: u64,
    generated_names: u64,
    pub(crate) nodes: BTreeMap<String, Node>,
    pub(crate) claims: BTreeMap<(String, String), StoredClaim>,
    pub(crate) slices: BTreeMap<String, ResourceSlice>,
    /// Objects the double keeps as JSON (CanBuses, Pods, Leases), by resource, then namespace
    /// ("" when cluster-scoped) and name.
    pub(crate) documents: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    pub(crate) events: EventLog,
    pub(crate) log: Vec<RecordedRequest>,
    pub(crate) injected: Vec<InjectedFailure>,
    /// Tokens, RBAC policy and version (see `rbac`).
    pub(crate) rbac: super::rbac::Authz,
    /// Feature gate overrides (see `gates`).
    pub(crate) gates: super::gates::FeatureGates,
}

/// A failure the next matching requests get instead of being served.
#[derive(Debug, Clone)]
pub(crate) struct InjectedFailure {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) code: u16,
    pub(crate) remaining: usize,
}

impl Store {
    /// Takes one use of an injected failure matching the request, if any.
    pub(crate) fn take_injected(&mut self, method: &str, path: &str) -> Option<u16> {
        let hit = self
            .injected
            .iter_mut()
            .find(|f| f.remaining > 0 && f.method == method && f.path == path)?;
        hit.remaining -= 1;
        let code = hit.code;
        self.injected.retain(|f| f.remaining > 0);
        Some(code)
    }
}

impl Store {
    /// The current resourceVersion of the whole store (kube-apiserver's is etcd's revision).
    pub(crate) fn revision(&self) -> String {
        self.revision.to_string()
    }

    /// The current revision as a number.
    pub(crate) fn revision_number(&self) -> u64 {
        self.revision
    }

    pub(crate) fn next_revision(&mut self) -> String {
        self.revision += 1;
        self.revision.to_string()
    }

    /// Records a change for watches. A deletion is a change of its own: it takes a new revision,
    /// which the deleted object carries in its event, as in kube-apiserver.
    pub(crate) fn emit<T: serde::Serialize>(
        &mut self,
        resource: &'static str,
        kind: &'static str,
        object: &T,
    ) {
        let mut object = serde_json::to_value(object).unwrap_or(Value::Null);
        if kind == DELETED {
            let revision = self.next_revision();
            if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert("resourceVersion".into(), Value::String(revision));
            }
        }
        self.events.push(Event {
            revision: self.revision,
            resource,
            kind,
            object,
        });
    }

    fn next_uid(&mut self) -> String {
        self.uids += 1;
        // Well-formed UUIDs, unique within one double and easy to tell apart in test output.
        format!("00000000-0000-4000-8000-{:012x}", self.uids)
    }

    /// Sets what kube-apiserver sets on create; a uid given by a test seed is kept.
    pub(crate) fn stamp_created(&mut self, meta: &mut ObjectMeta, has_generation: bool) {
        if meta.uid.as_deref().is_none_or(str::is_empty) {
            meta.uid = Some(self.next_uid());
        }
        meta.resource_version = Some(self.next_revision());
        meta.creation_timestamp = Some(now());
        meta.generation = has_generation.then_some(1);
        meta.managed_fields = None;
    }

    pub(crate) fn generate_name(&mut self, meta: &mut ObjectMeta) {
        if meta.name.as_deref().is_none_or(str::is_empty)
            && let Some(prefix) = meta.generate_name.as_deref()
        {
            self.generated_names += 1;
            meta.name = Some(format!("{prefix}{:05x}", self.generated_names));
        }
    }

    // ---- Nodes -----------------------------------------------------------------------------

    pub(crate) fn insert_node(&mut self, mut node: Node) -> Node {
        self.stamp_created(&mut node.metadata, false);
        let name = node.metadata.name.clone().unwrap_or_default();
        let existed = self.nodes.insert(name, node.clone()).is_some();
        self.emit(NODES, added_or_modified(existed), &node);
        node
    }

    pub(crate) fn list_nodes(&self, terms: &[FieldTerm]) -> Vec<Node> {
        self.nodes
            .values()
            .filter(|node| selected(terms, node))
            .cloned()
            .collect()
    }

    pub(crate) fn delete_node(&mut self, name: &str) -> Result<Node, Failure> {
        let node = self
            .nodes
            .remove(name)
            .ok_or_else(|| Failure::not_found(NODES, name))?;
        self.emit(NODES, DELETED, &node);
        Ok(node)
    }

    pub(crate) fn node(&self, name: &str) -> Result<Node, Failure> {
        self.nodes
            .get(name)
            .cloned()
            .ok_or_else(|| Failure::not_found(NODES, name))
    }

    // ---- ResourceClaims ----------------------------------------------------------------------

    pub(crate) fn insert_claim(&mut self, mut claim: ResourceClaim) -> ResourceClaim {
        self.stamp_created(&mut claim.metadata, true);
        let key = (
            claim
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            claim.metadata.name.clone().unwrap_or_default(),
        );
        claim.metadata.namespace = Some(key.0.clone());
        let device_owners = claim
            .status
            .as_ref()
            .and_then(|s| s.devices.as_ref())
            .into_iter()
            .flatten()
            .map(|entry| (device_key(entry), SEED_MANAGER.to_owned()))
            .collect();
        let existed = self
            .claims
            .insert(
                key,
                StoredClaim {
                    claim: claim.clone(),
                    device_owners,
                },
            )
            .is_some();
        self.emit(CLAIMS_RESOURCE, added_or_modified(existed), &claim);
        claim
    }

    pub(crate) fn delete_claim(&mut self, namespace: &str, name: &str) -> Option<ResourceClaim> {
        let claim = self
            .claims
            .remove(&(namespace.to_owned(), name.to_owned()))
            .map(|stored| stored.claim)?;
        self.emit(CLAIMS_RESOURCE, DELETED, &claim);
        Some(claim)
    }

    pub(crate) fn claim(&self, namespace: &str, name: &str) -> Result<ResourceClaim, Failure> {
        self.claims
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|stored| stored.claim.clone())
            .ok_or_else(|| Failure::not_found(CLAIMS, name))
    }

    /// The claims in `namespace` (all namespaces when `None`) matching `terms` (on
    /// `metadata.name` and `metadata.namespace`).
    pub(crate) fn list_claims(
        &self,
        namespace: Option<&str>,
        terms: &[FieldTerm],
    ) -> Vec<ResourceClaim> {
        self.claims
            .iter()
            .filter(|(key, stored)| {
                namespace.is_none_or(|n| key.0 == n) && selected(terms, &stored.claim)
            })
            .map(|(_, stored)| stored.claim.clone())
            .collect()
    }

    /// Server-side apply of `status.devices` by `manager`, simplified to the one list this double
    /// accepts: the applied entries replace those the manager applied before (entries it no longer
    /// lists are removed), entries of other managers stay, and taking over another manager's entry
    /// needs `force`. Returns the stored claim; the resourceVersion only moves when something changed.
    pub(crate) fn apply_claim_devices(
        &mut self,
        namespace: &str,
        name: &str,
        applied: Vec<AllocatedDeviceStatus>,
        manager: &str,
        force: bool,
    ) -> Result<ResourceClaim, Failure> {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(stored) = self.claims.get(&key) else {
            return Err(Failure::not_found(CLAIMS, name));
        };
        validate::device_status(&stored.claim, &applied)?;
        if !force {
            for entry in &applied {
                if let Some(owner) = stored.device_owners.get(&device_key(entry))
                    && owner != manager
                {
                    return Err(Failure::apply_conflict(
                        CLAIMS,
                        name,
                        format!(
                            "conflict with {owner:?}: .status.devices[driver={:?},pool={:?},device={:?}]",
                            entry.driver, entry.pool, entry.device
                        ),
                    ));
                }
            }
        }
        let mut updated = stored.clone();
        let applied_keys: Vec<DeviceKey> = applied.iter().map(device_key).collect();
        let status = updated.claim.status.get_or_insert_with(Default::default);
        let mut devices = status.devices.take().unwrap_or_default();
        devices.retain(|entry| {
            let key = device_key(entry);
            updated.device_owners.get(&key).map(String::as_str) != Some(manager)
                || applied_keys.contains(&key)
        });
        for entry in applied {
            let key = device_key(&entry);
            match devices.iter_mut().find(|e| device_key(e) == key) {
                Some(existing) => *existing = entry,
                None => devices.push(entry),
            }
        }
        status.devices = (!devices.is_empty()).then_some(devices);
        updated
            .device_owners
            .retain(|key, owner| owner != manager || applied_keys.contains(key));
        for key in applied_keys {
            updated.device_owners.insert(key, manager.to_owned());
        }
        if updated.claim == stored.claim {
            self.claims.insert(key, updated);
            return self.claim(namespace, name);
        }
        updated.claim.metadata.resource_version = Some(self.next_revision());
        let claim = updated.claim.clone();
        self.claims.insert(key, updated);
        self.emit(CLAIMS_RESOURCE, MODIFIED, &claim);
        Ok(claim)
    }

    // ---- ResourceSlices ----------------------------------------------------------------------

    pub(crate) fn list_slices(&self, terms: &[FieldTerm]) -> Vec<ResourceSlice> {
        self.slices
            .values()
            .filter(|slice| selected(terms, slice))
            .cloned()
            .collect()
    }

    pub(crate) fn slice(&self, name: &str) -> Result<ResourceSlice, Failure> {
        self.slices
            .get(name)
            .cloned()
            .ok_or_else(|| Failure::not_found(SLICES, name))
    }

    pub(crate) fn create_slice(
        &mut self,
        mut slice: ResourceSlice,
    ) -> Result<ResourceSlice, Failure> {
        self.generate_name(&mut slice.metadata);
        let name = slice.metadata.name.clone().unwrap_or_default();
        if self.slices.contains_key(&name) {
            return Err(Failure::already_exists(SLICES, &name));
        }
        if slice
            .metadata
            .resource_version
            .as_deref()
            .is_some_and(|rv| !rv.is_empty())
        {
            return Err(Failure::invalid(
                "ResourceSlice.resource.k8s.io",
                &name,
                "metadata.resourceVersion",
                "Invalid value: must be unset to create an object",
            ));
        }
        self.gates
            .prepare_slice_create(self.rbac.minor(), now(), &mut slice);
        validate::slice(&slice)?;
        self.stamp_created(&mut slice.metadata, true);
        self.slices.insert(name, slice.clone());
        self.emit(SLICES_RESOURCE, ADDED, &slice);
        Ok(slice)
    }

    /// PUT: replaces the object; a non-empty `resourceVersion` must match the stored one.
    pub(crate) fn update_slice(
        &mut self,
        mut slice: ResourceSlice,
    ) -> Result<ResourceSlice, Failure> {
        let name = slice.metadata.name.clone().unwrap_or_default();
        let old = self.slice(&name)?;
        if let Some(rv) = slice.metadata.resource_version.as_deref()
            && !rv.is_empty()
            && Some(rv) != old.metadata.resource_version.as_deref()
        {
            return Err(Failure::stale(SLICES, &name));
        }
        // Fields the server owns are carried over, not taken from the client.
        slice.metadata.uid = old.metadata.uid.clone();
        slice.metadata.creation_timestamp = old.metadata.creation_timestamp.clone();
        slice.metadata.generation = old.metadata.generation;
        slice.metadata.resource_version = old.metadata.resource_version.clone();
        slice.metadata.managed_fields = None;
        self.store_slice_update(old, slice)
    }

    /// Server-side apply of a whole ResourceSlice, simplified: the applying manager is taken to own
    /// the entire `spec`, so the applied spec replaces the stored one; labels and annotations merge
    /// key by key, and owner references are replaced when given. Creates the slice if it is absent.
    /// Returns the object and whether it was created.
    pub(crate) fn apply_slice(
        &mut self,
        applied: ResourceSlice,
    ) -> Result<(ResourceSlice, bool), Failure> {
        let name = applied.metadata.name.clone().unwrap_or_default();
        let Some(old) = self.slices.get(&name).cloned() else {
            let mut fresh = applied;
            fresh.metadata.resource_version = None;
            return self.create_slice(fresh).map(|s| (s, true));
        };
        if let Some(rv) = applied.metadata.resource_version.as_deref()
            && !rv.is_empty()
            && Some(rv) != old.metadata.resource_version.as_deref()
        {
            return Err(Failure::stale(SLICES, &name));
        }
        let mut merged = old.clone();
        merged.spec = applied.spec;
        for (target, given) in [
            (&mut merged.metadata.labels, applied.metadata.labels),
            (
                &mut merged.metadata.annotations,
                applied.metadata.annotations,
            ),
        ] {
            if let Some(given) = given {
                target.get_or_insert_with(Default::default).extend(given);
            }
        }
        if applied.metadata.owner_references.is_some() {
            merged.metadata.owner_references = applied.metadata.owner_references;
        }
        self.store_slice_update(old, merged).map(|s| (s, false))
    }

    fn store_slice_update(
        &mut self,
        old: ResourceSlice,
        mut new: ResourceSlice,
    ) -> Result<ResourceSlice, Failure> {
        let spec_changed =
            self.gates
                .prepare_slice_update(self.rbac.minor(), now(), &mut new, &old);
        validate::slice(&new)?;
        validate::slice_update(&old, &new)?;
        if new == old && !spec_changed {
            // kube-apiserver skips writes that change nothing: no new resourceVersion.
            return Ok(old);
        }
        if spec_changed {
            new.metadata.generation = Some(old.metadata.generation.unwrap_or(0) + 1);
        }
        new.metadata.resource_version = Some(self.next_revision());
        let name = new.metadata.name.clone().unwrap_or_default();
        self.slices.insert(name, new.clone());
        self.emit(SLICES_RESOURCE, MODIFIED, &new);
        Ok(new)
    }

    pub(crate) fn insert_slice(&mut self, mut slice: ResourceSlice) -> ResourceSlice {
        self.stamp_created(&mut slice.metadata, true);
        let name = slice.metadata.name.clone().unwrap_or_default();
        let existed = self.slices.insert(name, slice.clone()).is_some();
        self.emit(SLICES_RESOURCE, added_or_modified(existed), &slice);
        slice
    }

    pub(crate) fn delete_slice(&mut self, name: &str) -> Result<ResourceSlice, Failure> {
        let slice = self
            .slices
            .remove(name)
            .ok_or_else(|| Failure::not_found(SLICES, name))?;
        self.emit(SLICES_RESOURCE, DELETED, &slice);
        Ok(slice)
    }

    /// The claim `namespace/name` before and after a server-side apply of `status.devices`
    /// (its old devices, and the claim as the apply would leave it), computed on a copy so the
    /// store stays untouched; `None` when there is no such claim or the apply would fail.
    pub(crate) fn preview_claim_devices(
        &self,
        namespace: &str,
        name: &str,
        applied: &[AllocatedDeviceStatus],
        manager: &str,
        force: bool,
    ) -> Option<(Vec<AllocatedDeviceStatus>, ResourceClaim)> {
        let key = (namespace.to_owned(), name.to_owned());
        let stored = self.claims.get(&key)?;
        let mut scratch = Store::default();
        scratch.claims.insert(key, stored.clone());
        let updated = scratch
            .apply_claim_devices(namespace, name, applied.to_vec(), manager, force)
            .ok()?;
        let old = stored
            .claim
            .status
            .as_ref()
            .and_then(|s| s.devices.clone())
            .unwrap_or_default();
        Some((old, updated))
    }
}

/// The current time at the one-second precision kube-apiserver stores.
pub(crate) fn now() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}
