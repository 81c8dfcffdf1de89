//! Publishing the node's pool as ResourceSlices, and keeping it current.
//!
//! The pool is named after the node and holds every member slot of the [`Inventory`]. Devices are
//! split into slices of at most [`MAX_DEVICES_PER_SLICE`], named `<node>-<driver>-<index>`
//! ([`node_slice_name`], so the names never change for a given device order), each with
//! `spec.nodeName`, `spec.driver`, `pool.resourceSliceCount` and an owner reference to the Node,
//! so the slices disappear with it. An empty pool is still published, as one slice with no
//! devices, so schedulers see the node.
//!
//! The writing is the cluster model's one pool publisher
//! ([`can_dra_cluster::publisher::PoolPublisher`], shared with the controller's bus pools): it
//! lists the node's slices (field selector `spec.nodeName`, `spec.driver`), keeps those of the
//! node's pool, writes only what differs under a new `pool.generation`, deletes obsolete slices
//! first, and reads back what the API server kept: a field a disabled feature gate dropped is
//! warned about once, listed in the [`PublishReport`], and not written again on every pass. This
//! module adds what only the node has: its devices and the Node as owner.
//!
//! [`node_slice_name`]: can_dra_cluster::naming::node_slice_name

use std::fmt;

use can_dra_cluster::naming::node_slice_name;
use can_dra_cluster::pool::{DesiredPool, Placement};
use can_dra_cluster::publisher::{PoolPublisher, PublishError, PublishReport};
use k8s_openapi::Resource;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::Device;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Api, Client};

use crate::inventory::{Inventory, InventoryError};

pub use can_dra_cluster::pool::MAX_DEVICES_PER_SLICE;

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
    /// The node's slices could not be listed, written or deleted.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// What the node's pool should hold: `devices`, owned by Node `node` (uid `node_uid`).
pub fn desired_pool(driver: &str, node: &str, node_uid: &str, devices: &[Device]) -> DesiredPool {
    let owner = OwnerReference {
        api_version: Node::API_VERSION.to_owned(),
        kind: Node::KIND.to_owned(),
        name: node.to_owned(),
        uid: node_uid.to_owned(),
        ..OwnerReference::default()
    };
    DesiredPool::split(
        node,
        Placement::Node(node.to_owned()),
        owner,
        devices,
        |i| node_slice_name(node, driver, i),
    )
}

/// Publishes one node's pool. Clones publish the same pool and share what the server kept.
#[derive(Clone)]
pub struct SlicePublisher {
    client: Client,
    node: String,
    publisher: PoolPublisher,
}

impl fmt::Debug for SlicePublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlicePublisher")
            .field("driver", &self.publisher.driver())
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl SlicePublisher {
    /// A publisher for `driver`'s pool on `node`.
    pub fn new(client: Client, driver: impl Into<String>, node: impl Into<String>) -> Self {
        Self {
            publisher: PoolPublisher::new(client.clone(), driver),
            client,
            node: node.into(),
        }
    }

    /// Publishes the inventory's devices (see [`publish_devices`](Self::publish_devices)).
    pub async fn publish(&self, inventory: &Inventory) -> Result<PublishReport, SliceError> {
        self.publish_devices(&inventory.devices()?).await
    }

    /// Makes the node's slices say exactly `devices`, writing only if something differs.
    /// A write that races with another change is retried from a fresh list a few times.
    pub async fn publish_devices(&self, devices: &[Device]) -> Result<PublishReport, SliceError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes
            .get(&self.node)
            .await
            .map_err(|source| SliceError::Node {
                node: self.node.clone(),
                source,
            })?;
        let node_uid = node.metadata.uid.unwrap_or_default();
        let pool = desired_pool(self.publisher.driver(), &self.node, &node_uid, devices);
        Ok(self.publisher.publish(&pool).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_the_nodes_and_owned_by_the_node() {
        let devices = vec![Device {
            name: "can0-m0".into(),
            ..Device::default()
        }];
        let slices = desired_pool("can.dra.dev", "node-a", "uid-1", &devices)
            .resource_slices("can.dra.dev", 3);
        assert_eq!(slices.len(), 1);
        let slice = &slices[0];
        assert_eq!(slice.metadata.name.as_deref(), Some("node-a-can.dra.dev-0"));
        assert_eq!(
            (
                slice.spec.pool.name.as_str(),
                slice.spec.node_name.as_deref()
            ),
            ("node-a", Some("node-a"))
        );
        assert_eq!(slice.spec.pool.generation, 3);
        let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (
                owner.api_version.as_str(),
                owner.kind.as_str(),
                owner.name.as_str(),
                owner.uid.as_str()
            ),
            ("v1", "Node", "node-a", "uid-1")
        );
    }
}
