//! A `CanBus`'s pool as ResourceSlices, and the publisher that keeps it current.
//!
//! Each bus is one pool, [`pool_name`] (`canbus/<bus>`), offered on all nodes (`allNodes`) or on
//! the nodes its selector picks. It holds `maxMembers` member slots `m0`, `m1`, ..., each with the
//! attributes `type: virtual`, `bus`, `slot`, `fd`, `bitrate` and (on FD buses) `dataBitrate`,
//! split into slices of at most [`MAX_DEVICES_PER_SLICE`]. Every slice has an owner reference to
//! the bus, so the garbage collector removes them when the bus goes.
//!
//! The publisher follows the node daemon's conventions: it lists the pool's slices, writes nothing
//! when they already say what is desired, and otherwise bumps `pool.generation` past the highest
//! one seen, deletes obsolete slices first and creates or updates (with the listed
//! `resourceVersion`) the rest. kube-apiserver lets a ResourceSlice list select on
//! `metadata.name`, `spec.nodeName` and `spec.driver` only, so the pool's slices are the driver's
//! slices without a node (field selector `spec.driver=<driver>,spec.nodeName=`) whose
//! `spec.pool.name` is the pool's, picked here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};

use crate::canbus::{CanBus, MAX_NAME_BYTES, NAME_TOO_LONG, SpecError};

/// The API allows at most this many devices per slice.
pub const MAX_DEVICES_PER_SLICE: usize = 128;

/// The API allows at most this many attributes and capacities together on one device
/// (`pkg/apis/resource/validation/validation.go`, `ResourceSliceMaxAttributesAndCapacitiesPerDevice`).
const MAX_ATTRIBUTES_AND_CAPACITIES: usize = 32;

/// The API allows string and version attribute values of at most this many bytes
/// (`DeviceAttributeMaxValueLength`).
const MAX_ATTRIBUTE_VALUE_BYTES: usize = 64;

/// How many times a sync starts over after a conflicting write before giving up.
const SYNC_ATTEMPTS: usize = 3;

/// The first segment of every bus pool's name.
const POOL_PREFIX: &str = "canbus/";

/// The longest pool name or slice name (a DNS subdomain) the API accepts.
const MAX_NAME: usize = 253;

/// Errors of computing or publishing a bus's slices.
#[derive(Debug, thiserror::Error)]
pub enum SliceError {
    /// The bus spec is unusable.
    #[error("CanBus {bus}: {source}")]
    Spec {
        /// The bus name.
        bus: String,
        /// What is wrong.
        #[source]
        source: SpecError,
    },
    /// The bus's name is too long to be its devices' `bus` attribute (a bus admitted before the
    /// CRD's rule, or by a CRD without it): the API server would refuse every slice.
    #[error("CanBus {bus}: {NAME_TOO_LONG}")]
    NameTooLong {
        /// The bus name.
        bus: String,
    },
    /// A desired slice breaks another limit the API server enforces; it is not sent.
    #[error("CanBus {bus}: ResourceSlice {slice}: {field}: {reason}")]
    Unpublishable {
        /// The bus name.
        bus: String,
        /// The slice name.
        slice: String,
        /// The offending field, e.g. `spec.devices[0].attributes[bus].string`.
        field: String,
        /// The limit it breaks.
        reason: String,
    },
    /// The bus has no name or uid (it was not read from the API server).
    #[error("CanBus has no {0}; only stored objects can own slices")]
    Unstored(&'static str),
    /// The pool's slices could not be listed.
    #[error("cannot list the ResourceSlices of pool {pool}: {source}")]
    List {
        /// The pool name.
        pool: String,
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
    /// Whether only a change of the bus can fix it: retrying the same bus writes the same refused
    /// slices, so it is reported in the status instead.
    pub fn needs_bus_change(&self) -> bool {
        matches!(
            self,
            Self::Spec { .. } | Self::NameTooLong { .. } | Self::Unpublishable { .. }
        )
    }

    /// Whether a fresh list may fix it (someone else changed the slices meanwhile).
    fn is_race(&self) -> bool {
        matches!(self, Self::Write { source: kube::Error::Api(status), .. }
            if status.code == 409 || status.code == 404)
    }
}

/// FNV-1a, to shorten over-long names deterministically.
fn fnv1a32(input: &str) -> u32 {
    input.bytes().fold(0x811c_9dc5, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// The pool of bus `bus`: `canbus/<bus>`, or `canbus/<hash>` should that exceed 253 characters.
///
/// ```
/// use can_dra_controller::slices::pool_name;
/// assert_eq!(pool_name("powertrain"), "canbus/powertrain");
/// ```
pub fn pool_name(bus: &str) -> String {
    let name = format!("{POOL_PREFIX}{bus}");
    if name.len() <= MAX_NAME {
        name
    } else {
        format!("{POOL_PREFIX}{:08x}", fnv1a32(bus))
    }
}

/// The field selector of `driver`'s slices that belong to no single node, where bus pools live:
/// `spec.driver=<driver>,spec.nodeName=` (an absent node name selects as empty). kube-apiserver
/// accepts only `metadata.name`, `spec.nodeName` and `spec.driver` for ResourceSlices, so a pool
/// is picked from these by `spec.pool.name` on the client.
///
/// ```
/// use can_dra_controller::slices::bus_pools_selector;
/// assert_eq!(bus_pools_selector("can.dra.dev"), "spec.driver=can.dra.dev,spec.nodeName=");
/// ```
pub fn bus_pools_selector(driver: &str) -> String {
    format!("spec.driver={driver},spec.nodeName=")
}

/// The name of slice `index` of bus `bus`: `canbus-<bus>-<driver>-<index>`, or
/// `<hash>-<index>.canbus.<driver>` should that exceed 253 characters.
///
/// ```
/// use can_dra_controller::slices::slice_name;
/// assert_eq!(slice_name("powertrain", "can.dra.dev", 0), "canbus-powertrain-can.dra.dev-0");
/// ```
pub fn slice_name(bus: &str, driver: &str, index: usize) -> String {
    let name = format!("canbus-{bus}-{driver}-{index}");
    if name.len() <= MAX_NAME {
        name
    } else {
        format!(
            "{:08x}-{index}.canbus.{driver}",
            fnv1a32(&format!("{bus}\0{driver}"))
        )
    }
}

fn string(value: &str) -> DeviceAttribute {
    DeviceAttribute {
        string: Some(value.to_owned()),
        ..DeviceAttribute::default()
    }
}

fn int(value: u32) -> DeviceAttribute {
    DeviceAttribute {
        int: Some(i64::from(value)),
        ..DeviceAttribute::default()
    }
}

/// The member slots of `bus`, `m0` to `m<maxMembers-1>`, with their attributes.
pub fn member_devices(bus: &CanBus) -> Result<Vec<Device>, SliceError> {
    let name = bus.name_any();
    let spec_error = |source| SliceError::Spec {
        bus: name.clone(),
        source,
    };
    bus.spec.validate().map_err(spec_error)?;
    let bitrate = bus.spec.bitrate().map_err(spec_error)?;
    let data_bitrate = bus.spec.data_bitrate().map_err(spec_error)?;
    let devices = (0..bus.spec.max_members)
        .map(|slot| {
            let mut attributes = BTreeMap::from([
                ("type".to_owned(), string("virtual")),
                ("bus".to_owned(), string(&name)),
                ("slot".to_owned(), int(slot)),
                (
                    "fd".to_owned(),
                    DeviceAttribute {
                        bool: Some(bus.spec.fd),
                        ..DeviceAttribute::default()
                    },
                ),
                ("bitrate".to_owned(), int(bitrate.bits_per_second())),
            ]);
            if let Some(rate) = data_bitrate {
                attributes.insert("dataBitrate".to_owned(), int(rate.bits_per_second()));
            }
            Device {
                name: format!("m{slot}"),
                attributes: Some(attributes),
                ..Device::default()
            }
        })
        .collect();
    Ok(devices)
}

/// The desired slices of `bus`'s pool at `generation` (a pure function, see the module docs).
/// The bus must be a stored object: its uid goes into the owner references.
pub fn desired_slices(
    bus: &CanBus,
    driver: &str,
    generation: i64,
) -> Result<Vec<ResourceSlice>, SliceError> {
    let name = bus
        .meta()
        .name
        .clone()
        .ok_or(SliceError::Unstored("name"))?;
    if name.len() > MAX_NAME_BYTES {
        return Err(SliceError::NameTooLong { bus: name });
    }
    let uid = bus.meta().uid.clone().ok_or(SliceError::Unstored("uid"))?;
    let devices = member_devices(bus)?;
    let owner = OwnerReference {
        api_version: CanBus::api_version(&()).into_owned(),
        kind: CanBus::kind(&()).into_owned(),
        name: name.clone(),
        uid,
        ..OwnerReference::default()
    };
    let (all_nodes, node_selector) = match &bus.spec.node_selector {
        Some(selector) => (None, Some(selector.clone())),
        None => (Some(true), None),
    };
    let chunks: Vec<&[Device]> = devices.chunks(MAX_DEVICES_PER_SLICE).collect();
    let count = i64::try_from(chunks.len()).unwrap_or(i64::MAX);
    let slices: Vec<ResourceSlice> = chunks
        .into_iter()
        .enumerate()
        .map(|(index, chunk)| ResourceSlice {
            metadata: ObjectMeta {
                name: Some(slice_name(&name, driver, index)),
                owner_references: Some(vec![owner.clone()]),
                ..ObjectMeta::default()
            },
            spec: ResourceSliceSpec {
                driver: driver.to_owned(),
                pool: ResourcePool {
                    name: pool_name(&name),
                    generation,
                    resource_slice_count: count,
                },
                all_nodes,
                node_selector: node_selector.clone(),
                devices: Some(chunk.to_vec()),
                ..ResourceSliceSpec::default()
            },
        })
        .collect();
    for slice in &slices {
        check_limits(&name, slice)?;
    }
    Ok(slices)
}

/// Checks the limits kube-apiserver enforces on what a bus controls (the attribute values and
/// counts of its devices), so a slice it would refuse is reported rather than sent again and
/// again (`pkg/apis/resource/validation/validation.go` `validateDevice`).
fn check_limits(bus: &str, slice: &ResourceSlice) -> Result<(), SliceError> {
    let refused = |field: String, reason: String| SliceError::Unpublishable {
        bus: bus.to_owned(),
        slice: slice.name_any(),
        field,
        reason,
    };
    for (i, device) in slice.spec.devices.iter().flatten().enumerate() {
        let attributes = device.attributes.as_ref();
        let total =
            attributes.map_or(0, BTreeMap::len) + device.capacity.as_ref().map_or(0, BTreeMap::len);
        if total > MAX_ATTRIBUTES_AND_CAPACITIES {
            return Err(refused(
                format!("spec.devices[{i}]"),
                format!(
                    "{total} attributes and capacities, at most {MAX_ATTRIBUTES_AND_CAPACITIES}"
                ),
            ));
        }
        for (key, attribute) in attributes.into_iter().flatten() {
            for (kind, value) in [
                ("string", &attribute.string),
                ("version", &attribute.version),
            ] {
                if let Some(value) = value
                    && value.len() > MAX_ATTRIBUTE_VALUE_BYTES
                {
                    return Err(refused(
                        format!("spec.devices[{i}].attributes[{key}].{kind}"),
                        format!("{} bytes, at most {MAX_ATTRIBUTE_VALUE_BYTES}", value.len()),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Whether `existing` already says what `desired` says (ignoring server-set metadata).
fn same_content(existing: &ResourceSlice, desired: &ResourceSlice) -> bool {
    existing.spec == desired.spec
        && desired.owner_references().iter().all(|owner| {
            existing
                .owner_references()
                .iter()
                .any(|o| o.uid == owner.uid)
        })
}

/// What one sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReport {
    /// The pool generation now published (0 after [`BusSlicePublisher::remove`]).
    pub generation: i64,
    /// The slice names, in index order.
    pub slices: Vec<String>,
    /// Slices created.
    pub created: usize,
    /// Slices updated.
    pub updated: usize,
    /// Obsolete slices deleted.
    pub deleted: usize,
}

impl PublishReport {
    /// Whether the sync wrote nothing.
    pub fn unchanged(&self) -> bool {
        self.created + self.updated + self.deleted == 0
    }
}

/// Publishes the pools of `CanBus` resources for one driver.
#[derive(Clone)]
pub struct BusSlicePublisher {
    client: Client,
    driver: String,
}

impl fmt::Debug for BusSlicePublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusSlicePublisher")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

impl BusSlicePublisher {
    /// A publisher of `driver`'s bus pools.
    pub fn new(client: Client, driver: impl Into<String>) -> Self {
        Self {
            client,
            driver: driver.into(),
        }
    }

    /// Makes `bus`'s pool say exactly what the bus asks for, writing only if something differs.
    /// A write that races with another change is retried from a fresh list a few times.
    pub async fn publish(&self, bus: &CanBus) -> Result<PublishReport, SliceError> {
        let mut attempt = 1;
        loop {
            match self.sync(bus).await {
                Err(error) if error.is_race() && attempt < SYNC_ATTEMPTS => {
                    tracing::info!(%error, attempt, "ResourceSlices changed meanwhile; syncing again");
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// Deletes every slice of bus `bus`'s pool (the bus is gone); returns how many went.
    pub async fn remove(&self, bus: &str) -> Result<usize, SliceError> {
        let pool = pool_name(bus);
        let api: Api<ResourceSlice> = Api::all(self.client.clone());
        let mut deleted = 0;
        for slice in self.list(&api, &pool).await? {
            let name = slice.name_any();
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => deleted += 1,
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
        if deleted > 0 {
            tracing::info!(%pool, deleted, "removed the ResourceSlices of a deleted CanBus");
        }
        Ok(deleted)
    }

    /// Deletes the slices of bus pools (`canbus/...`) whose bus is not in `live` (bus names),
    /// such as those of a bus deleted while the controller was down and not yet collected by the
    /// garbage collector. Node pools are never touched. Returns how many went.
    pub async fn sweep(&self, live: &BTreeSet<String>) -> Result<usize, SliceError> {
        let api: Api<ResourceSlice> = Api::all(self.client.clone());
        let selector = format!("spec.driver={}", self.driver);
        let listed = api
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(|source| SliceError::List {
                pool: "canbus/*".to_owned(),
                source,
            })?;
        let live_pools: BTreeSet<String> = live.iter().map(|bus| pool_name(bus)).collect();
        let mut deleted = 0;
        for slice in listed.items.into_iter().filter(|s| {
            s.spec.driver == self.driver
                && s.spec.pool.name.starts_with(POOL_PREFIX)
                && !live_pools.contains(&s.spec.pool.name)
        }) {
            let name = slice.name_any();
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => deleted += 1,
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
        if deleted > 0 {
            tracing::info!(
                deleted,
                "removed the ResourceSlices of CanBuses that are gone"
            );
        }
        Ok(deleted)
    }

    async fn list(
        &self,
        api: &Api<ResourceSlice>,
        pool: &str,
    ) -> Result<Vec<ResourceSlice>, SliceError> {
        // kube-apiserver refuses `spec.pool.name` as a field label (400): select the driver's
        // slices without a node name (bus pools are never node-local; an empty `spec.nodeName`
        // selects exactly those) and pick the pool's here by `spec.pool.name`, the one identity
        // every slice of the pool carries whatever the bus name's length (`docs/controller.md`).
        let selector = bus_pools_selector(&self.driver);
        let listed = api
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(|source| SliceError::List {
                pool: pool.to_owned(),
                source,
            })?;
        Ok(listed
            .items
            .into_iter()
            .filter(|s| s.spec.driver == self.driver && s.spec.pool.name == pool)
            .collect())
    }

    async fn sync(&self, bus: &CanBus) -> Result<PublishReport, SliceError> {
        let pool = pool_name(&bus.name_any());
        let api: Api<ResourceSlice> = Api::all(self.client.clone());
        let existing = self.list(&api, &pool).await?;
        let current = existing
            .iter()
            .map(|s| s.spec.pool.generation)
            .max()
            .unwrap_or(0);
        let find = |name: &str| existing.iter().find(|s| s.name_any() == name);
        let as_is = desired_slices(bus, &self.driver, current)?;
        let names: Vec<String> = as_is.iter().map(ResourceExt::name_any).collect();
        let up_to_date = existing.len() == as_is.len()
            && as_is
                .iter()
                .all(|d| find(&d.name_any()).is_some_and(|e| same_content(e, d)));
        if up_to_date {
            return Ok(PublishReport {
                generation: current,
                slices: names,
                created: 0,
                updated: 0,
                deleted: 0,
            });
        }

        let generation = current + 1;
        let desired = desired_slices(bus, &self.driver, generation)?;
        let mut report = PublishReport {
            generation,
            slices: names,
            created: 0,
            updated: 0,
            deleted: 0,
        };
        for obsolete in existing
            .iter()
            .filter(|e| !report.slices.contains(&e.name_any()))
        {
            let name = obsolete.name_any();
            match api.delete(&name, &DeleteParams::default()).await {
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
            let name = slice.name_any();
            let write = match find(&name) {
                Some(old) => {
                    // Keep what others put in the metadata; take our spec and owner.
                    let mut metadata = old.metadata.clone();
                    metadata.owner_references = slice.metadata.owner_references.take();
                    metadata.managed_fields = None;
                    slice.metadata = metadata;
                    report.updated += 1;
                    api.replace(&name, &PostParams::default(), &slice)
                        .await
                        .map_err(|source| ("update", source))
                }
                None => {
                    report.created += 1;
                    api.create(&PostParams::default(), &slice)
                        .await
                        .map_err(|source| ("create", source))
                }
            };
            write.map_err(|(action, source)| SliceError::Write {
                action,
                name: name.clone(),
                source,
            })?;
        }
        tracing::info!(
            %pool,
            generation,
            slices = report.slices.len(),
            members = bus.spec.max_members,
            created = report.created,
            updated = report.updated,
            deleted = report.deleted,
            "published the ResourceSlices of a CanBus"
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canbus::CanBusSpec;

    fn bus(name: &str, spec: CanBusSpec) -> CanBus {
        let mut bus = CanBus::new(name, spec);
        bus.metadata.uid = Some(format!("uid-{name}"));
        bus
    }

    #[test]
    fn names_and_attributes_the_api_server_would_refuse_are_not_published() {
        let at_limit = "a".repeat(MAX_NAME_BYTES);
        assert!(desired_slices(&bus(&at_limit, CanBusSpec::new("500k")), "can.dra.dev", 1).is_ok());
        let long = format!("{at_limit}b");
        let err =
            desired_slices(&bus(&long, CanBusSpec::new("500k")), "can.dra.dev", 1).unwrap_err();
        assert!(matches!(err, SliceError::NameTooLong { .. }), "{err}");
        assert!(err.needs_bus_change());

        let mut slices =
            desired_slices(&bus("body", CanBusSpec::new("500k")), "can.dra.dev", 1).unwrap();
        let attributes = slices[0].spec.devices.as_mut().unwrap()[0]
            .attributes
            .as_mut()
            .unwrap();
        attributes.insert("note".into(), string(&"é".repeat(33)));
        let err = check_limits("body", &slices[0]).unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.devices[0].attributes[note].string: 66 bytes, at most 64"),
            "{err}"
        );
        let attributes = slices[0].spec.devices.as_mut().unwrap()[0]
            .attributes
            .as_mut()
            .unwrap();
        attributes.remove("note");
        for i in 0..30 {
            attributes.insert(format!("extra{i}"), int(i));
        }
        let err = check_limits("body", &slices[0]).unwrap_err();
        assert!(
            err.to_string()
                .contains("attributes and capacities, at most 32"),
            "{err}"
        );
    }

    #[test]
    fn slots_carry_the_bus_attributes() {
        let mut spec = CanBusSpec::new("500k");
        spec.fd = true;
        spec.data_bitrate = Some("2M".into());
        spec.max_members = 3;
        let slices = desired_slices(&bus("body", spec), "can.dra.dev", 7).unwrap();
        assert_eq!(slices.len(), 1);
        let slice = &slices[0];
        assert_eq!(slice.spec.pool.name, "canbus/body");
        assert_eq!(slice.spec.pool.generation, 7);
        assert_eq!(slice.spec.all_nodes, Some(true));
        assert_eq!(slice.spec.node_name, None);
        let devices = slice.spec.devices.as_ref().unwrap();
        let names: Vec<_> = devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["m0", "m1", "m2"]);
        let attrs = devices[2].attributes.as_ref().unwrap();
        assert_eq!(attrs["type"].string.as_deref(), Some("virtual"));
        assert_eq!(attrs["bus"].string.as_deref(), Some("body"));
        assert_eq!(attrs["slot"].int, Some(2));
        assert_eq!(attrs["fd"].bool, Some(true));
        assert_eq!(attrs["bitrate"].int, Some(500_000));
        assert_eq!(attrs["dataBitrate"].int, Some(2_000_000));
        let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("CanBus", "uid-body")
        );
        assert_eq!(owner.api_version, "can.dra.dev/v1alpha1");
    }

    #[test]
    fn classic_bus_has_no_data_bitrate_and_selector_replaces_all_nodes() {
        use k8s_openapi::api::core::v1::{NodeSelector, NodeSelectorRequirement, NodeSelectorTerm};
        let mut spec = CanBusSpec::new("125k");
        spec.node_selector = Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: "rack".into(),
                    operator: "Exists".into(),
                    values: None,
                }]),
                match_fields: None,
            }],
        });
        let slice = desired_slices(&bus("b", spec.clone()), "can.dra.dev", 1)
            .unwrap()
            .remove(0);
        assert_eq!(slice.spec.all_nodes, None);
        assert_eq!(slice.spec.node_selector, spec.node_selector);
        let attrs = slice.spec.devices.unwrap()[0].attributes.clone().unwrap();
        assert!(!attrs.contains_key("dataBitrate"));
        assert_eq!(attrs["fd"].bool, Some(false));
    }

    #[test]
    fn invalid_or_unstored_buses_make_no_slices() {
        let mut spec = CanBusSpec::new("500k");
        spec.data_bitrate = Some("2M".into());
        let error = desired_slices(&bus("b", spec), "can.dra.dev", 1).unwrap_err();
        assert!(error.to_string().contains("spec.dataBitrate"), "{error}");
        let unstored = CanBus::new("b", CanBusSpec::new("500k"));
        assert!(matches!(
            desired_slices(&unstored, "can.dra.dev", 1),
            Err(SliceError::Unstored("uid"))
        ));
    }

    #[test]
    fn long_names_stay_within_limits() {
        let long = format!("{}.bus", "x".repeat(60)).repeat(4);
        let long = &long[..250];
        assert!(pool_name(long).len() <= MAX_NAME);
        assert_ne!(pool_name(long), pool_name(&long.replace('x', "y")));
        let name = slice_name(long, "can.dra.dev", 3);
        assert!(name.len() <= MAX_NAME);
        assert!(
            name.split('.').all(|l| !l.is_empty() && l.len() <= 63),
            "{name}"
        );
    }
}
