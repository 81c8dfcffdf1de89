//! Clean-up after deleted Nodes: the node-local ResourceSlices a node's daemon published for the
//! driver (pool = node name, `spec.nodeName`) are deleted when the node is gone.
//!
//! On a real cluster the garbage collector removes them through their owner reference to the
//! Node; this catches slices whose owner reference is missing (an older daemon, an edit, a
//! daemon that could not read its Node), which would otherwise offer devices of a node that no
//! longer exists to the scheduler.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};

use crate::slices::SliceError;

fn is_gone(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// Deletes `slices`, counting those this call removed (one already gone is not an error).
async fn delete_all(
    api: &Api<ResourceSlice>,
    slices: Vec<ResourceSlice>,
) -> Result<usize, SliceError> {
    let mut deleted = 0;
    for slice in slices {
        let name = slice.name_any();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(slice = %name, node = ?slice.spec.node_name, "deleted the slice of a deleted node");
                deleted += 1;
            }
            Err(error) if is_gone(&error) => {}
            Err(source) => {
                return Err(SliceError::Write {
                    action: "delete",
                    name,
                    source,
                });
            }
        }
    }
    Ok(deleted)
}

/// The driver's node-local slices, optionally of one node.
async fn node_slices(
    api: &Api<ResourceSlice>,
    driver: &str,
    node: Option<&str>,
) -> Result<Vec<ResourceSlice>, SliceError> {
    let mut selector = format!("spec.driver={driver}");
    if let Some(node) = node {
        selector.push_str(&format!(",spec.nodeName={node}"));
    }
    let listed = api
        .list(&ListParams::default().fields(&selector))
        .await
        .map_err(|source| SliceError::List {
            pool: node.unwrap_or("<node-local pools>").to_owned(),
            source,
        })?;
    Ok(listed
        .items
        .into_iter()
        .filter(|s| {
            s.spec
                .node_name
                .as_deref()
                .is_some_and(|n| !n.is_empty() && n == s.spec.pool.name)
        })
        .collect())
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
                Err(source) => {
                    return Err(SliceError::List { pool: node, source });
                }
            }
        }
        if gone.contains(&node) {
            orphans.push(slice);
        }
    }
    delete_all(&api, orphans).await
}
