//! Clean-up after deleted Nodes: the node-local ResourceSlices a node's daemon published for the
//! driver (pool = node name, `spec.nodeName`) are deleted when the node is gone.
//!
//! On a real cluster the garbage collector removes them through their owner reference to the
//! Node; this catches slices whose owner reference is missing (an older daemon, an edit, a
//! daemon that could not read its Node), which would otherwise offer devices of a node that no
//! longer exists to the scheduler.

use std::collections::BTreeSet;

use can_dra_cluster::naming::{driver_selector, node_pools_selector};
use can_dra_cluster::publisher::{delete_slices, list_slices};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::{Api, Client};

use crate::bus_pool::SliceError;

/// Deletes `slices` of deleted nodes, counting those this call removed (one already gone is not
/// an error).
async fn delete_all(
    api: &Api<ResourceSlice>,
    slices: Vec<ResourceSlice>,
) -> Result<usize, SliceError> {
    let deleted = delete_slices(api, slices).await?;
    for slice in &deleted {
        tracing::info!(slice = ?slice.metadata.name, node = ?slice.spec.node_name, "deleted the slice of a deleted node");
    }
    Ok(deleted.len())
}

/// The driver's node-local slices, optionally of one node.
async fn node_slices(
    api: &Api<ResourceSlice>,
    driver: &str,
    node: Option<&str>,
) -> Result<Vec<ResourceSlice>, SliceError> {
    let selector = match node {
        Some(node) => node_pools_selector(driver, node),
        None => driver_selector(driver),
    };
    Ok(list_slices(api, driver, &selector, |s| {
        s.spec
            .node_name
            .as_deref()
            .is_some_and(|n| !n.is_empty() && n == s.spec.pool.name)
    })
    .await?)
}

/// Deletes the driver's slices of node `node`, which was deleted; returns how many.
pub async fn remove_node_slices(
    client: Client,
    driver: &str,
    node: &str,
) -> Result<usize, SliceError> {
    let api: Api<ResourceSlice> = Api::all(client);
    let slices = node_slices(&api, driver, Some(node)).await?;
    delete_all(&api, slices).await
}

/// Deletes the driver's node-local slices of nodes not in `live` whose Node the API server
/// confirms is gone (a node the watch has not shown yet keeps its slices); returns how many.
pub async fn sweep_node_slices(
    client: Client,
    driver: &str,
    live: &BTreeSet<String>,
) -> Result<usize, SliceError> {
    let api: Api<ResourceSlice> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client);
    let mut orphans = Vec::new();
    let mut checked: BTreeSet<String> = BTreeSet::new();
    let mut gone: BTreeSet<String> = BTreeSet::new();
    for slice in node_slices(&api, driver, None).await? {
        let node = slice.spec.pool.name.clone();
        if live.contains(&node) {
            continue;
        }
        if checked.insert(node.clone()) {
            match nodes.get_opt(&node).await {
                Ok(None) => {
                    gone.insert(node.clone());
                }
                Ok(Some(_)) => {}
                Err(source) => return Err(SliceError::Node { node, source }),
            }
        }
        if gone.contains(&node) {
            orphans.push(slice);
        }
    }
    delete_all(&api, orphans).await
}
