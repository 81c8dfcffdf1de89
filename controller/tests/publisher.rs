//! The CanBus slice publisher against the API server double: what lands in the store, what is
//! written, and what is left alone.

use can_dra_cluster::canbus::{CanBus, CanBusSpec};
use can_dra_cluster::naming::pool_name;
use can_dra_controller::bus_pool::BusPools;
use can_dra_doubles::apiserver::ApiServer;
use k8s_openapi::api::resource::v1::{ResourcePool, ResourceSlice, ResourceSliceSpec};
use kube::api::ObjectMeta;

const DRIVER: &str = "can.dra.dev";

fn bus(name: &str, members: u32) -> CanBus {
    let mut spec = CanBusSpec::new("500k");
    spec.max_members = members;
    let mut bus = CanBus::new(name, spec);
    bus.metadata.uid = Some(format!("uid-{name}"));
    bus
}

fn pool_slices(server: &ApiServer, bus: &str) -> Vec<ResourceSlice> {
    server
        .slices()
        .into_iter()
        .filter(|s| s.spec.pool.name == pool_name(bus))
        .collect()
}

fn device_count(slices: &[ResourceSlice]) -> usize {
    slices
        .iter()
        .map(|s| s.spec.devices.as_ref().map_or(0, Vec::len))
        .sum()
}

/// A node pool's slice, as the node daemon would publish it.
fn node_slice() -> ResourceSlice {
    ResourceSlice {
        metadata: ObjectMeta {
            name: Some("node-a-can.dra.dev-0".into()),
            ..ObjectMeta::default()
        },
        spec: ResourceSliceSpec {
            driver: DRIVER.into(),
            node_name: Some("node-a".into()),
            pool: ResourcePool {
                name: "node-a".into(),
                generation: 5,
                resource_slice_count: 1,
            },
            ..ResourceSliceSpec::default()
        },
    }
}

#[tokio::test]
async fn publishes_and_shrinks_a_pool_bumping_the_generation_only_on_change() {
    let server = ApiServer::start().await.unwrap();
    server.insert_slice(node_slice());
    let publisher = BusPools::new(server.client().unwrap(), DRIVER);

    // The largest bus fits the API's 128 devices per slice.
    let report = publisher.publish(&bus("powertrain", 128)).await.unwrap();
    assert_eq!((report.generation, report.created), (1, 1));
    let stored = pool_slices(&server, "powertrain");
    assert_eq!(stored.len(), 1);
    assert_eq!(device_count(&stored), 128);
    assert_eq!(stored[0].spec.pool.generation, 1);
    assert_eq!(stored[0].spec.pool.resource_slice_count, 1);
    assert_eq!(stored[0].spec.all_nodes, Some(true));
    assert_eq!(stored[0].spec.driver, DRIVER);
    let owner = &stored[0].metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("CanBus", "uid-powertrain")
    );

    // Publishing the same bus again writes nothing.
    server.clear_requests();
    let report = publisher.publish(&bus("powertrain", 128)).await.unwrap();
    assert!(report.unchanged());
    assert_eq!(report.generation, 1);
    assert!(server.writes().is_empty(), "{:?}", server.writes());

    // Shrinking rewrites the slice under a new generation.
    server.clear_requests();
    let report = publisher.publish(&bus("powertrain", 4)).await.unwrap();
    assert_eq!(
        (report.generation, report.updated, report.created),
        (2, 1, 0)
    );
    let stored = pool_slices(&server, "powertrain");
    assert_eq!(stored[0].spec.pool.generation, 2);
    assert_eq!(device_count(&stored), 4);

    // The node daemon's pool is not touched.
    let node = server
        .slices()
        .into_iter()
        .find(|s| s.spec.pool.name == "node-a")
        .unwrap();
    assert_eq!(node.spec.pool.generation, 5);
}

#[tokio::test]
async fn a_stray_slice_in_the_pool_is_deleted_before_the_rewrite() {
    let server = ApiServer::start().await.unwrap();
    let publisher = BusPools::new(server.client().unwrap(), DRIVER);
    publisher.publish(&bus("powertrain", 8)).await.unwrap();
    // A second slice of the pool, e.g. left by an older controller that split the pool.
    let mut stray = pool_slices(&server, "powertrain").remove(0);
    stray.metadata = ObjectMeta {
        name: Some("canbus-powertrain-can.dra.dev-1".into()),
        ..ObjectMeta::default()
    };
    stray.spec.pool.generation = 3;
    server.insert_slice(stray);

    server.clear_requests();
    let report = publisher.publish(&bus("powertrain", 8)).await.unwrap();
    assert_eq!(
        (report.generation, report.deleted, report.updated),
        (4, 1, 1)
    );
    let methods: Vec<_> = server.writes().iter().map(|w| w.method.clone()).collect();
    assert_eq!(methods, ["DELETE", "PUT"]);
    let stored = pool_slices(&server, "powertrain");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].spec.pool.generation, 4);
}

#[tokio::test]
async fn a_changed_bitrate_updates_the_attributes() {
    let server = ApiServer::start().await.unwrap();
    let publisher = BusPools::new(server.client().unwrap(), DRIVER);
    let mut powertrain = bus("powertrain", 2);
    publisher.publish(&powertrain).await.unwrap();
    powertrain.spec.bitrate = "1M".into();
    powertrain.spec.fd = true;
    powertrain.spec.data_bitrate = Some("5M".into());
    let report = publisher.publish(&powertrain).await.unwrap();
    assert_eq!((report.generation, report.updated), (2, 1));
    let stored = pool_slices(&server, "powertrain");
    let attrs = stored[0].spec.devices.as_ref().unwrap()[1]
        .attributes
        .clone()
        .unwrap();
    assert_eq!(attrs["bitrate"].int, Some(1_000_000));
    assert_eq!(attrs["dataBitrate"].int, Some(5_000_000));
    assert_eq!(attrs["fd"].bool, Some(true));
}

#[tokio::test]
async fn removing_a_bus_deletes_only_its_pool() {
    let server = ApiServer::start().await.unwrap();
    server.insert_slice(node_slice());
    let publisher = BusPools::new(server.client().unwrap(), DRIVER);
    publisher.publish(&bus("body", 100)).await.unwrap();
    publisher.publish(&bus("chassis", 3)).await.unwrap();

    assert_eq!(publisher.remove("body").await.unwrap(), 1);
    assert!(pool_slices(&server, "body").is_empty());
    assert_eq!(pool_slices(&server, "chassis").len(), 1);
    assert_eq!(server.slices().len(), 2);
    // Removing again is not an error.
    assert_eq!(publisher.remove("body").await.unwrap(), 0);
}

#[tokio::test]
async fn a_conflicting_update_is_retried_from_a_fresh_list() {
    let server = ApiServer::start().await.unwrap();
    let publisher = BusPools::new(server.client().unwrap(), DRIVER);
    publisher.publish(&bus("body", 2)).await.unwrap();
    let name = pool_slices(&server, "body")[0]
        .metadata
        .name
        .clone()
        .unwrap();
    server.inject_failure(
        "PUT",
        &format!("/apis/resource.k8s.io/v1/resourceslices/{name}"),
        409,
        1,
    );
    let report = publisher.publish(&bus("body", 3)).await.unwrap();
    assert_eq!(report.generation, 2);
    assert_eq!(device_count(&pool_slices(&server, "body")), 3);
}

#[tokio::test]
async fn an_outage_is_reported_not_hidden() {
    let server = ApiServer::start().await.unwrap();
    let publisher = BusPools::new(server.client().unwrap(), DRIVER);
    server.inject_failure("POST", "/apis/resource.k8s.io/v1/resourceslices", 500, 5);
    let error = publisher.publish(&bus("body", 2)).await.unwrap_err();
    assert!(error.to_string().contains("cannot create"), "{error}");
}

#[tokio::test]
async fn sweeping_removes_pools_of_buses_that_are_gone_and_nothing_else() {
    let server = ApiServer::start().await.unwrap();
    server.insert_slice(node_slice());
    let publisher = BusPools::new(server.client().unwrap(), DRIVER);
    publisher.publish(&bus("body", 2)).await.unwrap();
    publisher.publish(&bus("chassis", 2)).await.unwrap();
    // A bus pool of another driver is not ours to sweep.
    let other = BusPools::new(server.client().unwrap(), "other.example.com");
    other.publish(&bus("body", 2)).await.unwrap();

    let live = std::collections::BTreeSet::from(["chassis".to_owned()]);
    assert_eq!(publisher.sweep(&live).await.unwrap(), 1);
    let pools: Vec<_> = server
        .slices()
        .into_iter()
        .map(|s| (s.spec.driver, s.spec.pool.name))
        .collect();
    assert_eq!(pools.len(), 3, "{pools:?}");
    assert!(pools.contains(&(DRIVER.to_owned(), "node-a".to_owned())));
    assert!(pools.contains(&(DRIVER.to_owned(), "canbus/chassis".to_owned())));
    assert!(pools.contains(&("other.example.com".to_owned(), "canbus/body".to_owned())));
    assert_eq!(publisher.sweep(&live).await.unwrap(), 0);
}
