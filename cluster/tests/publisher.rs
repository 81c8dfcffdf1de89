//! The pool publisher against the API server double: what lands in the store, what is written,
//! what is left alone, for a node's pool and for a bus pool, including the cases where the
//! controller's and the node's publishers used to differ.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use can_dra_cluster::naming::{bus_slice_name, node_slice_name, pool_name};
use can_dra_cluster::pool::{DesiredPool, Placement};
use can_dra_cluster::publisher::{PoolPublisher, PublishError, delete_slices};
use can_dra_doubles::apiserver::{ApiServer, FeatureGate};
use k8s_openapi::api::resource::v1::{Device, ResourceSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::json;

const DRIVER: &str = "can.dra.dev";
const NODE: &str = "node-a";

fn owner(kind: &str, name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: if kind == "Node" {
            "v1".into()
        } else {
            "can.dra.dev/v1alpha1".into()
        },
        kind: kind.into(),
        name: name.into(),
        uid: uid.into(),
        ..OwnerReference::default()
    }
}

fn devices(prefix: &str, n: usize) -> Vec<Device> {
    (0..n)
        .map(|i| Device {
            name: format!("{prefix}-m{i}"),
            ..Device::default()
        })
        .collect()
}

fn node_pool(devices: &[Device]) -> DesiredPool {
    DesiredPool::split(
        NODE,
        Placement::Node(NODE.into()),
        owner("Node", NODE, "uid-node-a"),
        devices,
        |i| node_slice_name(NODE, DRIVER, i),
    )
}

fn bus_pool(bus: &str, uid: &str, devices: &[Device]) -> DesiredPool {
    DesiredPool::split(
        pool_name(bus),
        Placement::AllNodes,
        owner("CanBus", bus, uid),
        devices,
        |i| bus_slice_name(bus, DRIVER, i),
    )
}

fn slices_of(server: &ApiServer, pool: &str) -> Vec<ResourceSlice> {
    server
        .slices()
        .into_iter()
        .filter(|s| s.spec.driver == DRIVER && s.spec.pool.name == pool)
        .collect()
}

fn foreign_slice(name: &str, driver: &str, node: Option<&str>, pool: &str) -> ResourceSlice {
    let mut spec = json!({
        "driver": driver,
        "pool": {"name": pool, "generation": 7, "resourceSliceCount": 1},
    });
    match node {
        Some(node) => spec["nodeName"] = json!(node),
        None => spec["allNodes"] = json!(true),
    }
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

fn methods(server: &ApiServer) -> Vec<String> {
    server.writes().into_iter().map(|w| w.method).collect()
}

#[tokio::test]
async fn a_node_pool_is_written_once_and_rewritten_only_on_change() {
    let server = ApiServer::start().await.unwrap();
    let publisher = PoolPublisher::new(server.client().unwrap(), DRIVER);
    let report = publisher
        .publish(&node_pool(&devices("can0", 200)))
        .await
        .unwrap();
    assert_eq!(
        (report.generation, report.created, report.slices.len()),
        (1, 2, 2)
    );
    let stored = slices_of(&server, NODE);
    assert_eq!(stored.len(), 2);
    assert!(
        stored
            .iter()
            .all(|s| s.spec.node_name.as_deref() == Some(NODE)
                && s.spec.pool.resource_slice_count == 2
                && s.metadata.owner_references.as_ref().unwrap()[0].uid == "uid-node-a")
    );

    server.clear_requests();
    let again = publisher
        .publish(&node_pool(&devices("can0", 200)))
        .await
        .unwrap();
    assert!(again.unchanged(), "{again:?}");
    assert_eq!(again.generation, 1);
    assert_eq!(methods(&server), Vec::<String>::new());

    // Fewer devices: the second slice goes first, then the first is rewritten.
    let shrunk = publisher
        .publish(&node_pool(&devices("can0", 3)))
        .await
        .unwrap();
    assert_eq!(
        (shrunk.generation, shrunk.deleted, shrunk.updated),
        (2, 1, 1)
    );
    assert_eq!(methods(&server), ["DELETE", "PUT"]);
    let stored = slices_of(&server, NODE);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].spec.pool.generation, 2);
    assert_eq!(stored[0].spec.pool.resource_slice_count, 1);
}

#[tokio::test]
async fn bus_pools_and_node_pools_leave_each_other_alone() {
    let server = ApiServer::start().await.unwrap();
    let publisher = PoolPublisher::new(server.client().unwrap(), DRIVER);
    publisher
        .publish(&node_pool(&devices("can0", 2)))
        .await
        .unwrap();
    publisher
        .publish(&bus_pool("body", "uid-body", &devices("m", 4)))
        .await
        .unwrap();
    publisher
        .publish(&bus_pool("chassis", "uid-chassis", &devices("m", 1)))
        .await
        .unwrap();
    let body = slices_of(&server, "canbus/body");
    assert_eq!(body.len(), 1);
    assert_eq!(
        (body[0].spec.all_nodes, body[0].spec.node_name.as_deref()),
        (Some(true), None)
    );
    assert_eq!(
        body[0].metadata.name.as_deref(),
        Some("canbus-body-can.dra.dev-0")
    );

    // Changing one bus rewrites only its pool.
    server.clear_requests();
    let report = publisher
        .publish(&bus_pool("body", "uid-body", &devices("m", 2)))
        .await
        .unwrap();
    assert_eq!((report.generation, report.updated), (2, 1));
    let paths: Vec<_> = server.writes().into_iter().map(|w| w.path).collect();
    assert_eq!(
        paths,
        ["/apis/resource.k8s.io/v1/resourceslices/canbus-body-can.dra.dev-0"]
    );

    // Removing a pool deletes its slices only, and again is no error.
    assert_eq!(publisher.remove("canbus/body", None).await.unwrap(), 1);
    assert_eq!(publisher.remove("canbus/body", None).await.unwrap(), 0);
    let pools: Vec<_> = server
        .slices()
        .into_iter()
        .map(|s| s.spec.pool.name)
        .collect();
    assert_eq!(pools.len(), 2, "{pools:?}");
    assert!(pools.contains(&"canbus/chassis".to_owned()));
    assert!(pools.contains(&NODE.to_owned()));
}

/// The controller's publisher compared specs as sent, so a device with an empty attribute map
/// (omitted on the wire) differed from its stored self on every pass and was rewritten forever.
#[tokio::test]
async fn an_empty_list_or_map_equals_an_absent_one() {
    let server = ApiServer::start().await.unwrap();
    let publisher = PoolPublisher::new(server.client().unwrap(), DRIVER);
    // Stored as kube-apiserver keeps it: without the empty collections.
    publisher
        .publish(&bus_pool("body", "uid-body", &devices("m", 2)))
        .await
        .unwrap();
    let mut members = devices("m", 2);
    members[0].attributes = Some(BTreeMap::new());
    members[1].capacity = Some(BTreeMap::new());
    let pool = bus_pool("body", "uid-body", &members);

    server.clear_requests();
    for _ in 0..2 {
        assert!(publisher.publish(&pool).await.unwrap().unchanged());
    }
    assert_eq!(methods(&server), Vec::<String>::new());
}

/// Both publishers must agree on what "our owner" is: the same uid, kind and name. A bus deleted
/// and created again under the same name has a new uid, and its pool must follow it, or the
/// garbage collector removes the slices with the old bus.
#[tokio::test]
async fn a_slice_owned_by_someone_else_is_taken_over() {
    let server = ApiServer::start().await.unwrap();
    let publisher = PoolPublisher::new(server.client().unwrap(), DRIVER);
    publisher
        .publish(&bus_pool("body", "uid-old", &devices("m", 2)))
        .await
        .unwrap();

    let report = publisher
        .publish(&bus_pool("body", "uid-new", &devices("m", 2)))
        .await
        .unwrap();
    assert_eq!((report.generation, report.updated), (2, 1));
    let owners = slices_of(&server, "canbus/body")[0]
        .metadata
        .owner_references
        .clone()
        .unwrap();
    assert_eq!(owners, [owner("CanBus", "body", "uid-new")]);

    // The same uid under another kind is not our owner either.
    let mut node_owned = bus_pool("body", "uid-new", &devices("m", 2));
    node_owned.owner = owner("Node", "body", "uid-new");
    assert_eq!(publisher.publish(&node_owned).await.unwrap().updated, 1);

    // An owner someone added beside ours is kept and no reason to write.
    let mut slice = slices_of(&server, "canbus/body").remove(0);
    slice
        .metadata
        .owner_references
        .as_mut()
        .unwrap()
        .push(owner("ConfigMap", "extra", "uid-extra"));
    let api: kube::Api<ResourceSlice> = kube::Api::all(server.client().unwrap());
    api.replace(
        slice.metadata.name.as_deref().unwrap(),
        &Default::default(),
        &slice,
    )
    .await
    .unwrap();
    server.clear_requests();
    assert!(publisher.publish(&node_owned).await.unwrap().unchanged());
    assert_eq!(methods(&server), Vec::<String>::new());
}

/// The node's field selector `spec.nodeName=<node>,spec.driver=<driver>` also lists the driver's
/// other pools on that node; the node's publisher used to count and delete them as its own.
#[tokio::test]
async fn slices_a_list_returns_that_are_not_the_pools_are_left_alone() {
    let server = ApiServer::start().await.unwrap();
    for slice in [
        // Another pool of the driver on this node.
        foreign_slice("node-a-extra", DRIVER, Some(NODE), "node-a-extra"),
        // Another driver's slice on this node, and its bus pool of the same name as ours.
        foreign_slice("node-a-gpu", "gpu.example.com", Some(NODE), NODE),
        foreign_slice("gpu-body", "gpu.example.com", None, "canbus/body"),
        // A bus pool of the driver (no node): not the node's.
        foreign_slice("canbus-other-0", DRIVER, None, "canbus/other"),
    ] {
        server.insert_slice(slice);
    }
    let before: Vec<_> = server.slices();
    let publisher = PoolPublisher::new(server.client().unwrap(), DRIVER);
    let report = publisher
        .publish(&node_pool(&devices("can0", 1)))
        .await
        .unwrap();
    // Generations continue from the pool's own slices, not from the others' 7.
    assert_eq!(
        (report.generation, report.created, report.deleted),
        (1, 1, 0)
    );
    let report = publisher
        .publish(&bus_pool("body", "uid-body", &devices("m", 1)))
        .await
        .unwrap();
    assert_eq!(
        (report.generation, report.created, report.deleted),
        (1, 1, 0)
    );
    for slice in before {
        assert!(server.slices().contains(&slice), "{slice:?} was changed");
    }
    assert!(
        publisher
            .publish(&node_pool(&devices("can0", 1)))
            .await
            .unwrap()
            .unchanged()
    );
}

/// A field behind a disabled feature gate (device taints, alpha in 1.34) is dropped by the
/// server: reported, and not written again on every pass. The controller's publisher did not
/// read back and rewrote such a slice forever.
#[tokio::test]
async fn a_dropped_field_is_reported_and_not_written_again_for_any_pool() {
    let server = ApiServer::start().await.unwrap();
    assert!(!server.feature_gate(FeatureGate::DraDeviceTaints));
    let publisher = PoolPublisher::new(server.client().unwrap(), DRIVER);
    let tainted: Vec<Device> = (0..2)
        .map(|i| {
            serde_json::from_value(json!({
                "name": format!("m{i}"),
                "taints": [{"key": "can.dra.dev/bus-off", "effect": "NoSchedule"}],
            }))
            .unwrap()
        })
        .collect();
    for pool in [bus_pool("body", "uid-body", &tainted), node_pool(&tainted)] {
        let first = publisher.publish(&pool).await.unwrap();
        assert_eq!(first.created, 1);
        assert_eq!(first.dropped, ["spec.devices[*].taints"]);
        let stored = slices_of(&server, &pool.name);
        assert!(
            stored[0]
                .spec
                .devices
                .iter()
                .flatten()
                .all(|d| d.taints.is_none())
        );
        server.clear_requests();
        let again = publisher.publish(&pool).await.unwrap();
        assert!(again.unchanged() && again.dropped.is_empty(), "{again:?}");
        assert_eq!(methods(&server), Vec::<String>::new());
    }
    // Once the gate is on, a changed pool keeps the field.
    server.set_feature_gate(FeatureGate::DraDeviceTaints, true);
    let changed = publisher
        .publish(&bus_pool("body", "uid-body", &tainted[..1]))
        .await
        .unwrap();
    assert_eq!((changed.updated, changed.dropped.len()), (1, 0));
    assert!(
        slices_of(&server, "canbus/body")[0]
            .spec
            .devices
            .as_ref()
            .unwrap()[0]
            .taints
            .is_some()
    );
}

#[tokio::test]
async fn a_conflict_is_retried_from_a_fresh_list_and_an_outage_is_reported() {
    let server = ApiServer::start().await.unwrap();
    let publisher = PoolPublisher::new(server.client().unwrap(), DRIVER);
    publisher
        .publish(&node_pool(&devices("can0", 1)))
        .await
        .unwrap();
    let path = format!(
        "/apis/resource.k8s.io/v1/resourceslices/{}",
        node_slice_name(NODE, DRIVER, 0)
    );
    server.inject_failure("PUT", &path, 409, 1);
    let report = publisher
        .publish(&node_pool(&devices("can0", 2)))
        .await
        .unwrap();
    assert_eq!((report.generation, report.updated), (2, 1));

    server.inject_failure("PUT", &path, 409, 10);
    let error = publisher
        .publish(&node_pool(&devices("can0", 3)))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("cannot update ResourceSlice node-a-can.dra.dev-0:"),
        "{error}"
    );

    server.inject_failure("GET", "/apis/resource.k8s.io/v1/resourceslices", 500, 1);
    let error = publisher
        .publish(&node_pool(&devices("can0", 3)))
        .await
        .unwrap_err();
    assert!(matches!(error, PublishError::List { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("cannot list the ResourceSlices of pool node-a:"),
        "{error}"
    );
}

#[tokio::test]
async fn deleting_tolerates_slices_already_gone_and_names_one_that_cannot_go() {
    let server = ApiServer::start().await.unwrap();
    let api: kube::Api<ResourceSlice> = kube::Api::all(server.client().unwrap());
    let a = server.insert_slice(foreign_slice("a", DRIVER, Some(NODE), NODE));
    let b = server.insert_slice(foreign_slice("b", DRIVER, Some(NODE), NODE));
    api.delete("b", &Default::default()).await.unwrap();
    let deleted = delete_slices(&api, [a, b.clone()]).await.unwrap();
    let names: Vec<_> = deleted
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert_eq!(names, ["a"]);
    assert!(server.slices().is_empty());

    let c = server.insert_slice(foreign_slice("c", DRIVER, Some(NODE), NODE));
    server.inject_failure(
        "DELETE",
        "/apis/resource.k8s.io/v1/resourceslices/c",
        500,
        1,
    );
    let error = delete_slices(&api, [c]).await.unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("cannot delete ResourceSlice c:"),
        "{error}"
    );
    assert_eq!(server.slices().len(), 1);
}
