//! What a pool should hold, as a pure value: its name, where its devices can be used, its owner
//! and its slices; and the rules that decide whether a stored slice already says it.

use k8s_openapi::api::core::v1::NodeSelector;
use k8s_openapi::api::resource::v1::{Device, ResourcePool, ResourceSlice, ResourceSliceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// The API allows at most this many devices per slice (features this driver does not use would
/// lower it to 64).
pub const MAX_DEVICES_PER_SLICE: usize = 128;

/// Where a pool's devices can be used.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// On one node: the slices carry `spec.nodeName` (the node daemon's own pool).
    Node(String),
    /// On every node (`spec.allNodes`).
    AllNodes,
    /// On the nodes a selector picks (`spec.nodeSelector`).
    Selector(NodeSelector),
}

impl Placement {
    /// The node the pool's slices name, if it is one node's.
    pub fn node(&self) -> Option<&str> {
        match self {
            Self::Node(node) => Some(node),
            Self::AllNodes | Self::Selector(_) => None,
        }
    }
}

/// One slice of a [`DesiredPool`]: its name and devices.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredSlice {
    /// The ResourceSlice name.
    pub name: String,
    /// Its devices (at most [`MAX_DEVICES_PER_SLICE`]).
    pub devices: Vec<Device>,
}

/// What one pool should hold. [`PoolPublisher`](crate::publisher::PoolPublisher) chooses the
/// generation; `resourceSliceCount` is the number of slices.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPool {
    /// The pool name (`spec.pool.name`).
    pub name: String,
    /// Where the devices can be used.
    pub placement: Placement,
    /// The owner reference every slice carries, so the garbage collector removes the slices with
    /// their owner.
    pub owner: OwnerReference,
    /// The slices, in index order.
    pub slices: Vec<DesiredSlice>,
}

impl DesiredPool {
    /// A pool of `devices` split in order into slices of at most [`MAX_DEVICES_PER_SLICE`], slice
    /// `i` named `slice_name(i)`. No devices make one slice without devices, so that schedulers
    /// still see the pool.
    pub fn split(
        name: impl Into<String>,
        placement: Placement,
        owner: OwnerReference,
        devices: &[Device],
        slice_name: impl Fn(usize) -> String,
    ) -> Self {
        let chunks: Vec<&[Device]> = if devices.is_empty() {
            vec![&[]]
        } else {
            devices.chunks(MAX_DEVICES_PER_SLICE).collect()
        };
        Self {
            name: name.into(),
            placement,
            owner,
            slices: chunks
                .into_iter()
                .enumerate()
                .map(|(index, chunk)| DesiredSlice {
                    name: slice_name(index),
                    devices: chunk.to_vec(),
                })
                .collect(),
        }
    }

    /// The pool as `driver`'s ResourceSlices at `generation` (a pure function).
    pub fn resource_slices(&self, driver: &str, generation: i64) -> Vec<ResourceSlice> {
        let count = i64::try_from(self.slices.len()).unwrap_or(i64::MAX);
        let (node_name, all_nodes, node_selector) = match &self.placement {
            Placement::Node(node) => (Some(node.clone()), None, None),
            Placement::AllNodes => (None, Some(true), None),
            Placement::Selector(selector) => (None, None, Some(selector.clone())),
        };
        self.slices
            .iter()
            .map(|slice| ResourceSlice {
                metadata: ObjectMeta {
                    name: Some(slice.name.clone()),
                    owner_references: Some(vec![self.owner.clone()]),
                    ..ObjectMeta::default()
                },
                spec: ResourceSliceSpec {
                    driver: driver.to_owned(),
                    node_name: node_name.clone(),
                    all_nodes,
                    node_selector: node_selector.clone(),
                    pool: ResourcePool {
                        name: self.name.clone(),
                        generation,
                        resource_slice_count: count,
                    },
                    devices: (!slice.devices.is_empty()).then(|| slice.devices.clone()),
                    ..ResourceSliceSpec::default()
                },
            })
            .collect()
    }

    /// Whether a listed slice belongs to this pool of `driver`: same driver, pool name and node
    /// (none for a pool that is not one node's). A list's field selector asks the server for
    /// this much at most, and a selector the server did not apply must not make the publisher
    /// rewrite or delete someone else's slices.
    pub fn holds(&self, driver: &str, slice: &ResourceSlice) -> bool {
        holds(driver, &self.name, self.placement.node(), slice)
    }
}

/// Whether `slice` is one of `driver`'s slices of pool `pool` on node `node` (`None`: no node).
pub(crate) fn holds(driver: &str, pool: &str, node: Option<&str>, slice: &ResourceSlice) -> bool {
    slice.spec.driver == driver
        && slice.spec.pool.name == pool
        && slice.spec.node_name.as_deref().filter(|n| !n.is_empty()) == node
}

/// The spec as the API server returns it: empty lists and maps are omitted on the wire, so they
/// compare equal to absent ones.
pub(crate) fn normalised(spec: &ResourceSliceSpec) -> ResourceSliceSpec {
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

/// Whether `existing` names `owner` among its owners: the same object (uid) of the same kind and
/// name. Other owners someone added do not matter.
fn has_owner(existing: &ResourceSlice, owner: &OwnerReference) -> bool {
    existing
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == owner.uid && o.kind == owner.kind && o.name == owner.name)
}

/// Whether `existing` already says what `desired` says: the same spec once empty collections are
/// normalised, and every owner of `desired` (server-set metadata is ignored).
pub(crate) fn same_content(existing: &ResourceSlice, desired: &ResourceSlice) -> bool {
    normalised(&existing.spec) == normalised(&desired.spec)
        && desired
            .metadata
            .owner_references
            .iter()
            .flatten()
            .all(|owner| has_owner(existing, owner))
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

    fn owner(uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: "n".into(),
            uid: uid.into(),
            ..OwnerReference::default()
        }
    }

    fn pool(devices: &[Device]) -> DesiredPool {
        DesiredPool::split("n", Placement::Node("n".into()), owner("u"), devices, |i| {
            format!("n-d.dev-{i}")
        })
    }

    #[test]
    fn an_empty_pool_is_one_slice_without_devices() {
        let slices = pool(&[]).resource_slices("d.dev", 4);
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].spec.devices, None);
        assert_eq!(slices[0].spec.pool.resource_slice_count, 1);
        assert_eq!(slices[0].spec.pool.generation, 4);
    }

    #[test]
    fn devices_split_at_the_api_limit_and_count_each_other() {
        let slices = pool(&devices(257)).resource_slices("d.dev", 1);
        let sizes: Vec<_> = slices
            .iter()
            .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
            .collect();
        assert_eq!(sizes, [128, 128, 1]);
        assert!(slices.iter().all(|s| s.spec.pool.resource_slice_count == 3));
        assert_eq!(slices[2].metadata.name.as_deref(), Some("n-d.dev-2"));
        assert_eq!(
            slices[2].spec.devices.as_ref().unwrap()[0].name,
            "can0-m256"
        );
    }

    #[test]
    fn placement_sets_exactly_one_of_node_all_nodes_and_selector() {
        let mut desired = pool(&devices(1));
        let slice = desired.resource_slices("d.dev", 1).remove(0);
        assert_eq!(
            (slice.spec.node_name.as_deref(), slice.spec.all_nodes),
            (Some("n"), None)
        );
        desired.placement = Placement::AllNodes;
        let slice = desired.resource_slices("d.dev", 1).remove(0);
        assert_eq!(
            (slice.spec.node_name, slice.spec.all_nodes),
            (None, Some(true))
        );
        desired.placement = Placement::Selector(NodeSelector::default());
        let slice = desired.resource_slices("d.dev", 1).remove(0);
        assert_eq!(slice.spec.all_nodes, None);
        assert_eq!(slice.spec.node_selector, Some(NodeSelector::default()));
    }

    #[test]
    fn empty_collections_compare_equal_to_absent_ones() {
        let mut desired = pool(&devices(1)).resource_slices("d.dev", 1).remove(0);
        let stored = desired.clone();
        desired.spec.devices.as_mut().unwrap()[0].attributes = Some(Default::default());
        desired.spec.devices.as_mut().unwrap()[0].capacity = Some(Default::default());
        assert!(same_content(&stored, &desired));
        let mut empty = pool(&[]).resource_slices("d.dev", 1).remove(0);
        let stored_empty = empty.clone();
        empty.spec.devices = Some(Vec::new());
        assert!(same_content(&stored_empty, &empty));
        desired.spec.devices.as_mut().unwrap()[0].name = "other".into();
        assert!(!same_content(&stored, &desired));
    }

    #[test]
    fn an_owner_matches_by_uid_kind_and_name_and_others_may_be_added() {
        let desired = pool(&devices(1)).resource_slices("d.dev", 1).remove(0);
        let mut stored = desired.clone();
        stored.metadata.owner_references = Some(vec![owner("someone-else"), owner("u")]);
        assert!(same_content(&stored, &desired));
        // The same uid under another kind or name is not the same owner.
        let mut renamed = owner("u");
        renamed.name = "m".into();
        stored.metadata.owner_references = Some(vec![renamed]);
        assert!(!same_content(&stored, &desired));
        stored.metadata.owner_references = Some(vec![owner("old-uid")]);
        assert!(!same_content(&stored, &desired));
        stored.metadata.owner_references = None;
        assert!(!same_content(&stored, &desired));
    }

    #[test]
    fn a_pool_holds_only_its_drivers_slices_of_its_name_and_node() {
        let desired = pool(&devices(1));
        let ours = desired.resource_slices("d.dev", 1).remove(0);
        assert!(desired.holds("d.dev", &ours));
        let mut other_driver = ours.clone();
        other_driver.spec.driver = "gpu.example.com".into();
        assert!(!desired.holds("d.dev", &other_driver));
        let mut other_pool = ours.clone();
        other_pool.spec.pool.name = "canbus/n".into();
        assert!(!desired.holds("d.dev", &other_pool));
        let mut other_node = ours.clone();
        other_node.spec.node_name = Some("m".into());
        assert!(!desired.holds("d.dev", &other_node));

        let mut bus = desired.clone();
        bus.name = "canbus/body".into();
        bus.placement = Placement::AllNodes;
        let mut bus_slice = bus.resource_slices("d.dev", 1).remove(0);
        assert!(bus.holds("d.dev", &bus_slice));
        bus_slice.spec.node_name = Some(String::new());
        assert!(bus.holds("d.dev", &bus_slice), "an empty node name is none");
        bus_slice.spec.node_name = Some("n".into());
        assert!(!bus.holds("d.dev", &bus_slice));
    }
}
