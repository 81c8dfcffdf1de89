//! A `CanBus`'s pool: its member slots as devices, and the controller's side of publishing it.
//!
//! Each bus is one pool, [`pool_name`] (`canbus/<bus>`), offered on all nodes (`allNodes`) or on
//! the nodes its selector picks. It holds `maxMembers` member slots `m0`, `m1`, ..., each with the
//! attributes `type: virtual`, `bus`, `slot`, `fd`, `bitrate` and (on FD buses) `dataBitrate`,
//! split into slices of at most [`MAX_DEVICES_PER_SLICE`]. Every slice has an owner reference to
//! the bus, so the garbage collector removes them when the bus goes.
//!
//! Publishing goes through the cluster model's one pool publisher
//! ([`can_dra_cluster::publisher::PoolPublisher`], shared with the node daemon): it lists the
//! driver's slices without a node (field selector `spec.driver=<driver>,spec.nodeName=`, the
//! ResourceSlice field labels kube-apiserver allows being `metadata.name`, `spec.nodeName` and
//! `spec.driver`), keeps those of the bus's pool, writes nothing when they already say what is
//! desired, and otherwise bumps `pool.generation` past the highest one seen, deletes obsolete
//! slices first and creates or updates the rest. This module adds what only a bus has: its
//! devices, the limits the API server would refuse them for, and the sweep of pools whose bus is
//! gone.

use std::collections::{BTreeMap, BTreeSet};

use can_dra_cluster::attribute;
use can_dra_cluster::canbus::{CanBus, MAX_NAME_BYTES, NAME_TOO_LONG, SpecError};
use can_dra_cluster::naming::{bus_slice_name, driver_selector, is_bus_pool, pool_name};
use can_dra_cluster::pool::{DesiredPool, Placement};
use can_dra_cluster::publisher::{PoolPublisher, PublishError, PublishReport};
use k8s_openapi::api::resource::v1::{Device, DeviceAttribute};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Client, Resource, ResourceExt};

pub use can_dra_cluster::pool::MAX_DEVICES_PER_SLICE;

/// The API allows at most this many attributes and capacities together on one device
/// (`pkg/apis/resource/validation/validation.go`, `ResourceSliceMaxAttributesAndCapacitiesPerDevice`).
const MAX_ATTRIBUTES_AND_CAPACITIES: usize = 32;

/// The API allows string and version attribute values of at most this many bytes
/// (`DeviceAttributeMaxValueLength`).
const MAX_ATTRIBUTE_VALUE_BYTES: usize = 64;

/// Errors of computing or publishing a bus's slices, or of cleaning up slices.
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
    /// Listing, writing or deleting slices failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A Node could not be read (to tell whether it is gone).
    #[error("cannot read node {node}: {source}")]
    Node {
        /// The node name.
        node: String,
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
                (attribute::TYPE.to_owned(), string(attribute::VIRTUAL)),
                (attribute::BUS.to_owned(), string(&name)),
                (attribute::SLOT.to_owned(), int(slot)),
                (
                    attribute::FD.to_owned(),
                    DeviceAttribute {
                        bool: Some(bus.spec.fd),
                        ..DeviceAttribute::default()
                    },
                ),
                (
                    attribute::BITRATE.to_owned(),
                    int(bitrate.bits_per_second()),
                ),
            ]);
            if let Some(rate) = data_bitrate {
                attributes.insert(
                    attribute::DATA_BITRATE.to_owned(),
                    int(rate.bits_per_second()),
                );
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

/// What `bus`'s pool should hold for `driver` (a pure function, see the module docs). The bus
/// must be a stored object: its uid goes into the owner references.
pub fn desired_pool(bus: &CanBus, driver: &str) -> Result<DesiredPool, SliceError> {
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
    let placement = match &bus.spec.node_selector {
        Some(selector) => Placement::Selector(selector.clone()),
        None => Placement::AllNodes,
    };
    let pool = DesiredPool::split(pool_name(&name), placement, owner, &devices, |index| {
        bus_slice_name(&name, driver, index)
    });
    check_limits(&name, &pool)?;
    Ok(pool)
}

/// Checks the limits kube-apiserver enforces on what a bus controls (the attribute values and
/// counts of its devices), so a slice it would refuse is reported rather than sent again and
/// again (`pkg/apis/resource/validation/validation.go` `validateDevice`).
fn check_limits(bus: &str, pool: &DesiredPool) -> Result<(), SliceError> {
    for slice in &pool.slices {
        let refused = |field: String, reason: String| SliceError::Unpublishable {
            bus: bus.to_owned(),
            slice: slice.name.clone(),
            field,
            reason,
        };
        for (i, device) in slice.devices.iter().enumerate() {
            let attributes = device.attributes.as_ref();
            let total = attributes.map_or(0, BTreeMap::len)
                + device.capacity.as_ref().map_or(0, BTreeMap::len);
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
    }
    Ok(())
}

/// The pools of `CanBus` resources for one driver, published through the shared
/// [`PoolPublisher`].
#[derive(Clone, Debug)]
pub struct BusPools {
    publisher: PoolPublisher,
}

impl BusPools {
    /// The bus pools of `driver`.
    pub fn new(client: Client, driver: impl Into<String>) -> Self {
        Self {
            publisher: PoolPublisher::new(client, driver),
        }
    }

    /// Makes `bus`'s pool say exactly what the bus asks for, writing only if something differs.
    pub async fn publish(&self, bus: &CanBus) -> Result<PublishReport, SliceError> {
        let pool = desired_pool(bus, self.publisher.driver())?;
        Ok(self.publisher.publish(&pool).await?)
    }

    /// Deletes every slice of bus `bus`'s pool (the bus is gone); returns how many went.
    pub async fn remove(&self, bus: &str) -> Result<usize, SliceError> {
        let pool = pool_name(bus);
        let deleted = self.publisher.remove(&pool, None).await?;
        if deleted > 0 {
            tracing::info!(%pool, deleted, "removed the ResourceSlices of a deleted CanBus");
        }
        Ok(deleted)
    }

    /// Deletes the slices of bus pools (`canbus/...`) whose bus is not in `live` (bus names),
    /// such as those of a bus deleted while the controller was down and not yet collected by the
    /// garbage collector. Node pools are never touched. Returns how many went.
    pub async fn sweep(&self, live: &BTreeSet<String>) -> Result<usize, SliceError> {
        let live_pools: BTreeSet<String> = live.iter().map(|bus| pool_name(bus)).collect();
        let selector = driver_selector(self.publisher.driver());
        let orphans = self
            .publisher
            .list(&selector, |s| {
                is_bus_pool(&s.spec.pool.name) && !live_pools.contains(&s.spec.pool.name)
            })
            .await?;
        let deleted = self.publisher.delete(orphans).await?.len();
        if deleted > 0 {
            tracing::info!(
                deleted,
                "removed the ResourceSlices of CanBuses that are gone"
            );
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use can_dra_cluster::canbus::CanBusSpec;
    use k8s_openapi::api::resource::v1::ResourceSlice;

    fn desired_slices(
        bus: &CanBus,
        driver: &str,
        generation: i64,
    ) -> Result<Vec<ResourceSlice>, SliceError> {
        Ok(desired_pool(bus, driver)?.resource_slices(driver, generation))
    }

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

        let mut pool = desired_pool(&bus("body", CanBusSpec::new("500k")), "can.dra.dev").unwrap();
        let attributes = pool.slices[0].devices[0].attributes.as_mut().unwrap();
        attributes.insert("note".into(), string(&"é".repeat(33)));
        let err = check_limits("body", &pool).unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.devices[0].attributes[note].string: 66 bytes, at most 64"),
            "{err}"
        );
        let attributes = pool.slices[0].devices[0].attributes.as_mut().unwrap();
        attributes.remove("note");
        for i in 0..30 {
            attributes.insert(format!("extra{i}"), int(i));
        }
        let err = check_limits("body", &pool).unwrap_err();
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
}
