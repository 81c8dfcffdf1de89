//! Publishing the node's pool as ResourceSlices, and keeping it current.
//!
//! The pool is named after the node and holds every member slot of the [`Inventory`]. Devices are
//! split into slices of at most [`MAX_DEVICES_PER_SLICE`], named `<node>-<driver>-<index>` (so the
//! names never change for a given device order), each with `spec.nodeName`, `spec.driver`,
//! `pool.resourceSliceCount` and an owner reference to the Node, so the slices disappear with it.
//! An empty pool is still published, as one slice with no devices, so schedulers see the node.
//!
//! Writes use create/update with optimistic concurrency (POST for new slices, PUT with the
//! listed `resourceVersion` for existing ones) rather than server-side apply: the publisher is the
//! only writer of these slices, and a stale update fails with a conflict instead of overwriting a
//! change it has not seen; the whole sync then starts again from a fresh list.
//!
//! Each sync lists the node's slices (field selector `spec.nodeName`, `spec.driver`) and compares
//! them with the desired content. If nothing differs, nothing is written. Otherwise
//! `pool.generation` becomes one more than the highest generation seen, obsolete slices are deleted
//! first (as the Go helper does), and every desired slice is written with the new generation.
//!
//! The API server may keep less than it was sent: on a cluster where a feature gate is off (alpha
//! in 1.34 and 1.35: `DRADeviceTaints`, `DRAPartitionableDevices`, `DRADeviceBindingConditions`,
//! `DRAConsumableCapacity`) it silently drops the gated fields, and it fills in defaults such as a
//! taint's `timeAdded`. So every written slice is compared with what the server returned. Each
//! dropped field path (e.g. `spec.devices[*].taints`) is logged once at warn level and listed in
//! the [`PublishReport`]; and the publisher remembers, per slice, the spec it sent and the spec
//! the server kept, so that a later sync with the same desired spec finds the kept one up to date
//! instead of writing it again on every pass. A changed desired spec is written (and checked)
//! again. The memory is the publisher's own: a restarted daemon writes such a slice once more.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::Resource;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{Device, ResourcePool, ResourceSlice, ResourceSliceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::Value;

use crate::inventory::{Inventory, InventoryError, fnv1a32};

/// The API allows at most this many devices per slice (features this driver does not use would
/// lower it to 64).
pub const MAX_DEVICES_PER_SLICE: usize = 128;

/// How many times a sync starts over after a conflicting write before giving up.
const SYNC_ATTEMPTS: usize = 3;

/// Publishing failed; the next sync starts from scratch.
#[derive(Debug, thiserror::Error)]
pub enum SliceError {
    /// The inventory does not make a valid pool.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    /// The Node could not be read (its UID goes into the owner reference).
    #[error("cannot read node {node}: {source}")]
    Node {
        /// The node name.
        node: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The node's slices could not be listed.
    #[error("cannot list the ResourceSlices of node {node}: {source}")]
    List {
        /// The node name.
        node: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// A slice could not be written or deleted.
    #[error("cannot {action} ResourceSlice {name}: {source}")]
    Write {
        /// `create`, `update` or `delete`.
        action: &'static str,
        /// The slice name.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

impl SliceError {
    /// Whether a fresh list may fix it (someone else changed the slices meanwhile).
    fn is_race(&self) -> bool {
        match self {
            Self::Write { source, .. } => matches!(
                source,
                kube::Error::Api(status) if status.code == 409 || status.code == 404
            ),
            _ => false,
        }
    }
}

/// What one sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReport {
    /// The pool generation now published.
    pub generation: i64,
    /// The slice names, in index order.
    pub slices: Vec<String>,
    /// Slices created.
    pub created: usize,
    /// Slices updated.
    pub updated: usize,
    /// Obsolete slices deleted.
    pub deleted: usize,
    /// Field paths the API server dropped from the slices this sync wrote, sorted, each once
    /// (e.g. `spec.devices[*].taints`): a feature gate is probably off on the cluster.
    pub dropped: Vec<String>,
}

impl PublishReport {
    /// Whether the sync wrote nothing.
    pub fn unchanged(&self) -> bool {
        self.created + self.updated + self.deleted == 0
    }
}

/// The name of slice `index` of the node's pool: `<node>-<driver>-<index>`. Should that exceed the
/// 253 characters of a DNS subdomain, it becomes `<hash of node and driver>-<index>.<driver>`.
///
/// ```
/// use can_dra_kubelet_plugin::slices::slice_name;
/// assert_eq!(slice_name("node-a", "can.dra.dev", 0), "node-a-can.dra.dev-0");
/// assert!(slice_name(&"n".repeat(253), "can.dra.dev", 7).len() <= 253);
/// ```
pub fn slice_name(node: &str, driver: &str, index: usize) -> String {
    let name = format!("{node}-{driver}-{index}");
    if name.len() <= 253 {
        return name;
    }
    format!(
        "{:08x}-{index}.{driver}",
        fnv1a32(&format!("{node}\0{driver}"))
    )
}

/// The desired slices of the node's pool at `generation` (a pure function, see the module docs).
pub fn desired_slices(
    driver: &str,
    node: &str,
    node_uid: &str,
    devices: &[Device],
    generation: i64,
) -> Vec<ResourceSlice> {
    let chunks: Vec<&[Device]> = if devices.is_empty() {
        vec![&[]]
    } else {
        devices.chunks(MAX_DEVICES_PER_SLICE).collect()
    };
    let count = i64::try_from(chunks.len()).unwrap_or(i64::MAX);
    chunks
        .into_iter()
        .enumerate()
        .map(|(index, chunk)| ResourceSlice {
            metadata: ObjectMeta {
                name: Some(slice_name(node, driver, index)),
                owner_references: Some(vec![node_owner(node, node_uid)]),
                ..ObjectMeta::default()
            },
            spec: ResourceSliceSpec {
                driver: driver.to_owned(),
                node_name: Some(node.to_owned()),
                pool: ResourcePool {
                    name: node.to_owned(),
                    generation,
                    resource_slice_count: count,
                },
                devices: (!chunk.is_empty()).then(|| chunk.to_vec()),
                ..ResourceSliceSpec::default()
            },
        })
        .collect()
}

fn node_owner(node: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: Node::API_VERSION.to_owned(),
        kind: Node::KIND.to_owned(),
        name: node.to_owned(),
        uid: uid.to_owned(),
        ..OwnerReference::default()
    }
}

/// The spec as the API server returns it: empty lists and maps are omitted on the wire, so they
/// compare equal to absent ones.
fn normalised(spec: &ResourceSliceSpec) -> ResourceSliceSpec {
    let mut spec = spec.clone();
    if let Some(devices) = spec.devices.as_mut() {
        for device in devices.iter_mut() {
            if device.attributes.as_ref().is_some_and(|a| a.is_empty()) {
                device.attributes = None;
            }
            if device.capacity.as_ref().is_some_and(|c| c.is_empty()) {
                device.capacity = None;
            }
        }
    }
    if spec.devices.as_ref().is_some_and(Vec::is_empty) {
        spec.devices = None;
    }
    spec
}

/// Whether `existing` already says what `desired` says (ignoring server-set metadata).
fn same_content(existing: &ResourceSlice, desired: &ResourceSlice) -> bool {
    normalised(&existing.spec) == normalised(&desired.spec)
        && desired
            .metadata
            .owner_references
            .iter()
            .flatten()
            .all(|owner| {
                existing
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.uid == owner.uid && o.kind == owner.kind && o.name == owner.name)
            })
}

/// The paths of the fields present in `sent` but not in `kept` (what the server dropped), with
/// list indexes and map keys written `[*]`, e.g. `spec.devices[*].capacity[*].requestPolicy`.
fn dropped_paths(sent: &ResourceSliceSpec, kept: &ResourceSliceSpec) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    if let (Ok(sent), Ok(kept)) = (serde_json::to_value(sent), serde_json::to_value(kept)) {
        collect_dropped(&sent, &kept, "spec", &mut paths);
    }
    paths
}

fn collect_dropped(sent: &Value, kept: &Value, path: &str, paths: &mut BTreeSet<String>) {
    match (sent, kept) {
        (Value::Object(sent), Value::Object(kept)) => {
            // Maps keyed by name, as opposed to objects with fixed fields.
            let keyed = [".attributes", ".capacity", ".counters"]
                .iter()
                .any(|suffix| path.ends_with(suffix));
            for (key, value) in sent.iter().filter(|(_, v)| !v.is_null()) {
                let child = if keyed {
                    format!("{path}[*]")
                } else {
                    format!("{path}.{key}")
                };
                match kept.get(key).filter(|k| !k.is_null()) {
                    Some(kept) => collect_dropped(value, kept, &child, paths),
                    None => {
                        paths.insert(child);
                    }
                }
            }
        }
        (Value::Array(sent), Value::Array(kept)) => {
            let child = format!("{path}[*]");
            for (sent, kept) in sent.iter().zip(kept) {
                collect_dropped(sent, kept, &child, paths);
            }
        }
        _ => {}
    }
}

/// What the API server made of slices this publisher wrote.
#[derive(Debug, Default)]
struct ServerEdits {
    /// Per slice name: the (normalised) spec sent and the spec the server kept, where they differ.
    kept: BTreeMap<String, (ResourceSliceSpec, ResourceSliceSpec)>,
    /// Dropped field paths already logged.
    logged: BTreeSet<String>,
}

impl ServerEdits {
    /// `desired` as the server would keep it, if its spec is one it changed before.
    fn as_kept(&self, desired: &ResourceSlice) -> ResourceSlice {
        let mut slice = desired.clone();
        if let Some((sent, kept)) = desired
            .metadata
            .name
            .as_ref()
            .and_then(|name| self.kept.get(name))
            && *sent == normalised(&desired.spec)
        {
            slice.spec = kept.clone();
        }
        slice
    }

    /// Remembers what the server kept of the spec sent for slice `name`; returns the field paths
    /// it dropped, and logs those not logged before.
    fn record(
        &mut self,
        name: &str,
        sent: &ResourceSliceSpec,
        kept: &ResourceSliceSpec,
    ) -> BTreeSet<String> {
        let (sent, kept) = (normalised(sent), normalised(kept));
        if sent == kept {
            self.kept.remove(name);
            return BTreeSet::new();
        }
        let dropped = dropped_paths(&sent, &kept);
        for path in &dropped {
            if self.logged.insert(path.clone()) {
                tracing::warn!(
                    field = %path,
                    slice = %name,
                    "the API server dropped a ResourceSlice field it was sent; a feature gate is \
                     probably off on the cluster, so the devices are published without it"
                );
            }
        }
        self.kept.insert(name.to_owned(), (sent, kept));
        dropped
    }
}

/// Publishes one node's pool.
#[derive(Clone)]
pub struct SlicePublisher {
    client: Client,
    driver: String,
    node: String,
    /// Shared by clones, which publish the same pool.
    edits: Arc<Mutex<ServerEdits>>,
}

impl fmt::Debug for SlicePublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlicePublisher")
            .field("driver", &self.driver)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl SlicePublisher {
    /// A publisher for `driver`'s pool on `node`.
    pub fn new(client: Client, driver: impl Into<String>, node: impl Into<String>) -> Self {
        Self {
            client,
            driver: driver.into(),
            node: node.into(),
            edits: Arc::default(),
        }
    }

    fn edits(&self) -> std::sync::MutexGuard<'_, ServerEdits> {
        self.edits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes the inventory's devices (see [`publish_devices`](Self::publish_devices)).
    pub async fn publish(&self, inventory: &Inventory) -> Result<PublishReport, SliceError> {
        self.publish_devices(&inventory.devices()?).await
    }

    /// Makes the node's slices say exactly `devices`, writing only if something differs.
    /// A write that races with another change is retried from a fresh list a few times.
    pub async fn publish_devices(&self, devices: &[Device]) -> Result<PublishReport, SliceError> {
        let mut attempt = 1;
        loop {
            match self.sync(devices).await {
                Err(error) if error.is_race() && attempt < SYNC_ATTEMPTS => {
                    tracing::info!(%error, attempt, "ResourceSlices changed meanwhile; syncing again");
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    async fn sync(&self, devices: &[Device]) -> Result<PublishReport, SliceError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes
            .get(&self.node)
            .await
            .map_err(|source| SliceError::Node {
                node: self.node.clone(),
                source,
            })?;
        let node_uid = node.metadata.uid.unwrap_or_default();
        let slices: Api<ResourceSlice> = Api::all(self.client.clone());
        let selector = format!("spec.nodeName={},spec.driver={}", self.node, self.driver);
        let existing = slices
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(|source| SliceError::List {
                node: self.node.clone(),
                source,
            })?
            .items;

        let current = existing
            .iter()
            .filter(|s| s.spec.pool.name == self.node)
            .map(|s| s.spec.pool.generation)
            .max()
            .unwrap_or(0);
        let as_is = desired_slices(&self.driver, &self.node, &node_uid, devices, current);
        let find = |name: &Option<String>| {
            existing
                .iter()
                .find(|s| s.metadata.name.is_some() && s.metadata.name == *name)
        };
        let up_to_date = existing.len() == as_is.len() && {
            let edits = self.edits();
            as_is
                .iter()
                .all(|d| find(&d.metadata.name).is_some_and(|e| same_content(e, &edits.as_kept(d))))
        };
        let names = |list: &[ResourceSlice]| {
            list.iter()
                .filter_map(|s| s.metadata.name.clone())
                .collect::<Vec<_>>()
        };
        if up_to_date {
            return Ok(PublishReport {
                generation: current,
                slices: names(&as_is),
                created: 0,
                updated: 0,
                deleted: 0,
                dropped: Vec::new(),
            });
        }

        let generation = current + 1;
        let desired = desired_slices(&self.driver, &self.node, &node_uid, devices, generation);
        let mut report = PublishReport {
            generation,
            slices: names(&desired),
            created: 0,
            updated: 0,
            deleted: 0,
            dropped: Vec::new(),
        };
        let mut dropped = BTreeSet::new();
        for obsolete in existing.iter().filter(|e| {
            !report
                .slices
                .contains(e.metadata.name.as_ref().unwrap_or(&String::new()))
        }) {
            let name = obsolete.metadata.name.clone().unwrap_or_default();
            self.edits().kept.remove(&name);
            match slices.delete(&name, &DeleteParams::default()).await {
                Ok(_) => report.deleted += 1,
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(source) => {
                    return Err(SliceError::Write {
                        action: "delete",
                        name,
                        source,
                    });
                }
            }
        }
        for mut slice in desired {
            let name = slice.metadata.name.clone().unwrap_or_default();
            match find(&slice.metadata.name) {
                Some(old) => {
                    // Keep what others put in the metadata; take our spec and owner.
                    let mut metadata = old.metadata.clone();
                    metadata.owner_references = slice.metadata.owner_references.take();
                    metadata.managed_fields = None;
                    slice.metadata = metadata;
                    let written = slices
                        .replace(&name, &PostParams::default(), &slice)
                        .await
                        .map_err(|source| SliceError::Write {
                            action: "update",
                            name: name.clone(),
                            source,
                        })?;
                    report.updated += 1;
                    dropped.extend(self.edits().record(&name, &slice.spec, &written.spec));
                }
                None => {
                    let written = slices
                        .create(&PostParams::default(), &slice)
                        .await
                        .map_err(|source| SliceError::Write {
                            action: "create",
                            name: name.clone(),
                            source,
                        })?;
                    report.created += 1;
                    dropped.extend(self.edits().record(&name, &slice.spec, &written.spec));
                }
            }
        }
        report.dropped = dropped.into_iter().collect();
        tracing::info!(
            node = %self.node,
            generation,
            slices = report.slices.len(),
            devices = devices.len(),
            created = report.created,
            updated = report.updated,
            deleted = report.deleted,
            "published ResourceSlices"
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(n: usize) -> Vec<Device> {
        (0..n)
            .map(|i| Device {
                name: format!("can0-m{i}"),
                ..Device::default()
            })
            .collect()
    }

    #[test]
    fn empty_pool_is_one_slice_without_devices() {
        let slices = desired_slices("can.dra.dev", "node-a", "uid-1", &[], 4);
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].spec.devices, None);
        assert_eq!(slices[0].spec.pool.resource_slice_count, 1);
        assert_eq!(slices[0].spec.pool.generation, 4);
    }

    #[test]
    fn devices_split_at_the_api_limit() {
        let slices = desired_slices("can.dra.dev", "node-a", "uid-1", &devices(257), 1);
        let sizes: Vec<_> = slices
            .iter()
            .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
            .collect();
        assert_eq!(sizes, [128, 128, 1]);
        assert!(slices.iter().all(|s| s.spec.pool.resource_slice_count == 3));
        assert_eq!(
            slices[2].metadata.name.as_deref(),
            Some("node-a-can.dra.dev-2")
        );
    }

    #[test]
    fn long_names_stay_dns_subdomains() {
        let node = format!("{}.example", "n".repeat(63));
        let node = [node.as_str(); 4].join(".");
        let name = slice_name(&node, "can.dra.dev", 12);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(
            name.split('.').all(|l| !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')),
            "{name}"
        );
        assert_ne!(name, slice_name(&node.replace('n', "m"), "can.dra.dev", 12));
    }

    #[test]
    fn dropped_paths_name_fields_not_values() {
        let spec = |device: serde_json::Value| -> ResourceSliceSpec {
            serde_json::from_value(serde_json::json!({
                "driver": "d.dev", "nodeName": "n",
                "pool": {"name": "n", "generation": 1, "resourceSliceCount": 1},
                "devices": [device],
            }))
            .unwrap()
        };
        let sent = spec(serde_json::json!({
            "name": "a",
            "taints": [{"key": "k", "effect": "NoSchedule"}],
            "capacity": {"slots": {"value": "4", "requestPolicy": {"default": "1"}}},
        }));
        let kept = spec(serde_json::json!({
            "name": "a", "capacity": {"slots": {"value": "4"}},
        }));
        assert_eq!(
            dropped_paths(&sent, &kept).into_iter().collect::<Vec<_>>(),
            [
                "spec.devices[*].capacity[*].requestPolicy",
                "spec.devices[*].taints"
            ]
        );
        // A value the server filled in is no drop.
        assert!(dropped_paths(&kept, &sent).is_empty());
    }

    #[test]
    fn a_spec_the_server_changed_counts_as_kept_until_the_desired_one_changes() {
        let mut edits = ServerEdits::default();
        let mut desired = desired_slices("d.dev", "n", "u", &devices(1), 1).remove(0);
        desired.spec.devices.as_mut().unwrap()[0].binds_to_node = Some(true);
        let mut kept = desired.clone();
        kept.spec.devices.as_mut().unwrap()[0].binds_to_node = None;
        let name = desired.metadata.name.clone().unwrap();
        let dropped = edits.record(&name, &desired.spec, &kept.spec);
        assert_eq!(
            dropped.into_iter().collect::<Vec<_>>(),
            ["spec.devices[*].bindsToNode"]
        );
        assert!(same_content(&kept, &edits.as_kept(&desired)));
        desired.spec.devices.as_mut().unwrap()[0].name = "other".into();
        assert!(!same_content(&kept, &edits.as_kept(&desired)));
    }

    #[test]
    fn empty_collections_compare_equal_to_absent_ones() {
        let mut desired = desired_slices("d.dev", "n", "u", &devices(1), 1).remove(0);
        let stored = desired.clone();
        desired.spec.devices.as_mut().unwrap()[0].attributes = Some(Default::default());
        assert!(same_content(&stored, &desired));
        desired.spec.devices.as_mut().unwrap()[0].name = "other".into();
        assert!(!same_content(&stored, &desired));
    }
}
