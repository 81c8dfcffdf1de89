//! Publishing the node's pool as ResourceSlices, against the API server double: what the daemon
//! wrote is read back from the double as resource.k8s.io/v1 objects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use api_support::{DRIVER, NODE, server_with_node};
use can_dra_api::Bitrate;
use can_dra_cluster::publisher::PublishError;
use can_dra_doubles::apiserver::FeatureGate;
use can_dra_kubelet_plugin::inventory::{CanState, Inventory, PhysicalController, VirtualBus};
use can_dra_kubelet_plugin::slices::{SliceError, SlicePublisher};
use k8s_openapi::api::resource::v1::{Device, ResourceSlice};
use serde_json::json;

fn rate(text: &str) -> Bitrate {
    text.parse().unwrap()
}

fn controller(interface: &str, slots: u32) -> PhysicalController {
    PhysicalController {
        interface: interface.into(),
        controller: "gs_usb".into(),
        bitrate: Some(rate("500k")),
        data_bitrate: None,
        fd: false,
        state: Some(CanState::ErrorActive),
        slots,
    }
}

fn small_inventory() -> Inventory {
    Inventory {
        physical: vec![controller("can0", 2)],
        virtual_buses: vec![VirtualBus {
            name: "powertrain".into(),
            bitrate: rate("1M"),
            fd: true,
            data_bitrate: Some(rate("5M")),
            slots: 1,
        }],
    }
}

fn device<'a>(slice: &'a ResourceSlice, name: &str) -> &'a Device {
    slice
        .spec
        .devices
        .iter()
        .flatten()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no device {name}"))
}

fn string_attr<'a>(device: &'a Device, key: &str) -> Option<&'a str> {
    device.attributes.as_ref()?.get(key)?.string.as_deref()
}

fn int_attr(device: &Device, key: &str) -> Option<i64> {
    device.attributes.as_ref()?.get(key)?.int
}

fn ours(slices: Vec<ResourceSlice>) -> Vec<ResourceSlice> {
    slices
        .into_iter()
        .filter(|s| s.spec.driver == DRIVER && s.spec.node_name.as_deref() == Some(NODE))
        .collect()
}

#[tokio::test]
async fn published_slice_names_the_node_pool_owner_and_device_attributes() {
    let (server, client, node) = server_with_node().await;
    let report = SlicePublisher::new(client, DRIVER, NODE)
        .publish(&small_inventory())
        .await
        .unwrap();
    assert_eq!(report.generation, 1);
    assert_eq!(report.created, 1);

    let slices = server.slices();
    assert_eq!(slices.len(), 1);
    let slice = &slices[0];
    assert_eq!(slice.metadata.name.as_deref(), Some("node-a-can.dra.dev-0"));
    assert_eq!(slice.spec.driver, DRIVER);
    assert_eq!(slice.spec.node_name.as_deref(), Some(NODE));
    assert_eq!(slice.spec.pool.name, NODE);
    assert_eq!(slice.spec.pool.generation, 1);
    assert_eq!(slice.spec.pool.resource_slice_count, 1);
    let owners = slice.metadata.owner_references.as_ref().unwrap();
    assert_eq!(owners.len(), 1);
    assert_eq!(
        (owners[0].api_version.as_str(), owners[0].kind.as_str()),
        ("v1", "Node")
    );
    assert_eq!(owners[0].name, NODE);
    assert_eq!(Some(&owners[0].uid), node.metadata.uid.as_ref());

    let names: Vec<_> = slice
        .spec
        .devices
        .iter()
        .flatten()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(names, ["can0-m0", "can0-m1", "powertrain-m0"]);
    let phys = device(slice, "can0-m1");
    assert_eq!(string_attr(phys, "type"), Some("physical"));
    assert_eq!(string_attr(phys, "bus"), Some("can0"));
    assert_eq!(string_attr(phys, "interface"), Some("can0"));
    assert_eq!(string_attr(phys, "controller"), Some("gs_usb"));
    assert_eq!(string_attr(phys, "state"), Some("error-active"));
    assert_eq!(int_attr(phys, "bitrate"), Some(500_000));
    assert_eq!(int_attr(phys, "slot"), Some(1));
    let virt = device(slice, "powertrain-m0");
    assert_eq!(string_attr(virt, "type"), Some("virtual"));
    assert_eq!(string_attr(virt, "bus"), Some("powertrain"));
    assert_eq!(int_attr(virt, "bitrate"), Some(1_000_000));
    assert_eq!(int_attr(virt, "dataBitrate"), Some(5_000_000));
    assert_eq!(virt.attributes.as_ref().unwrap()["fd"].bool, Some(true));

    // Every call the publisher made is one the double serves (and RBAC must cover).
    assert!(
        server
            .requests()
            .iter()
            .all(|r| r.endpoint.is_some() && r.status < 300)
    );
}

#[tokio::test]
async fn more_than_128_slots_split_into_slices_that_count_each_other() {
    let (server, client, _) = server_with_node().await;
    let inventory = Inventory {
        physical: vec![
            controller("can0", 64),
            controller("can1", 64),
            controller("can2", 64),
        ],
        virtual_buses: vec![],
    };
    SlicePublisher::new(client, DRIVER, NODE)
        .publish(&inventory)
        .await
        .unwrap();
    let slices = server.slices();
    let sizes: Vec<_> = slices
        .iter()
        .map(|s| {
            (
                s.metadata.name.clone().unwrap(),
                s.spec.devices.as_ref().map_or(0, Vec::len),
            )
        })
        .collect();
    assert_eq!(
        sizes,
        [
            ("node-a-can.dra.dev-0".to_owned(), 128),
            ("node-a-can.dra.dev-1".to_owned(), 64)
        ]
    );
    for slice in &slices {
        assert_eq!(slice.spec.pool.resource_slice_count, 2);
        assert_eq!(slice.spec.pool.generation, 1);
        assert_eq!(slice.spec.pool.name, NODE);
    }
    // The split keeps the slot order: the first slice ends with can1's 64th slot.
    assert_eq!(
        slices[0].spec.devices.as_ref().unwrap()[127].name,
        "can1-m63"
    );
    assert_eq!(slices[1].spec.devices.as_ref().unwrap()[0].name, "can2-m0");
}

#[tokio::test]
async fn republishing_the_same_inventory_writes_nothing() {
    let (server, client, _) = server_with_node().await;
    let publisher = SlicePublisher::new(client, DRIVER, NODE);
    publisher.publish(&small_inventory()).await.unwrap();
    let before = server.slices();
    server.clear_requests();

    let report = publisher.publish(&small_inventory()).await.unwrap();
    assert!(report.unchanged(), "{report:?}");
    assert_eq!(report.generation, 1);
    assert_eq!(server.writes(), []);
    assert_eq!(server.slices(), before);
}

#[tokio::test]
async fn a_state_change_bumps_the_pool_generation() {
    let (server, client, _) = server_with_node().await;
    let publisher = SlicePublisher::new(client, DRIVER, NODE);
    publisher.publish(&small_inventory()).await.unwrap();
    let mut inventory = small_inventory();
    inventory.physical[0].state = Some(CanState::BusOff);
    server.clear_requests();

    let report = publisher.publish(&inventory).await.unwrap();
    assert_eq!(
        (
            report.generation,
            report.updated,
            report.created,
            report.deleted
        ),
        (2, 1, 0, 0)
    );
    let slices = server.slices();
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].spec.pool.generation, 2);
    assert_eq!(
        string_attr(device(&slices[0], "can0-m0"), "state"),
        Some("bus-off")
    );
    let writes: Vec<_> = server
        .writes()
        .into_iter()
        .map(|r| (r.method, r.status))
        .collect();
    assert_eq!(writes, [("PUT".to_owned(), 200)]);
    // And once more without change: still generation 2, no write.
    server.clear_requests();
    assert_eq!(publisher.publish(&inventory).await.unwrap().generation, 2);
    assert_eq!(server.writes(), []);
}

#[tokio::test]
async fn obsolete_slices_are_deleted_and_others_left_alone() {
    let (server, client, _) = server_with_node().await;
    // Someone else's slices: another node, and another driver on this node.
    for (name, driver, node) in [
        ("node-b-can.dra.dev-0", DRIVER, "node-b"),
        ("node-a-gpu.example.com-0", "gpu.example.com", NODE),
    ] {
        server.insert_slice(
            serde_json::from_value(json!({
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceSlice",
                "metadata": {"name": name},
                "spec": {"driver": driver, "nodeName": node,
                         "pool": {"name": node, "generation": 7, "resourceSliceCount": 1}},
            }))
            .unwrap(),
        );
    }
    // A stray slice of ours from an older layout, at a higher generation.
    server.insert_slice(
        serde_json::from_value(json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {"name": "node-a-can.dra.dev-old"},
            "spec": {"driver": DRIVER, "nodeName": NODE,
                     "pool": {"name": NODE, "generation": 4, "resourceSliceCount": 1}},
        }))
        .unwrap(),
    );
    let publisher = SlicePublisher::new(client, DRIVER, NODE);
    let big = Inventory {
        physical: vec![
            controller("can0", 64),
            controller("can1", 64),
            controller("can2", 64),
        ],
        virtual_buses: vec![],
    };
    let report = publisher.publish(&big).await.unwrap();
    // Generations continue above whatever the pool had.
    assert_eq!(
        (report.generation, report.deleted, report.created),
        (5, 1, 2)
    );

    // An adapter is unplugged: one slice is enough now.
    let report = publisher.publish(&small_inventory()).await.unwrap();
    assert_eq!(
        (report.generation, report.deleted, report.updated),
        (6, 1, 1)
    );
    let mine = ours(server.slices());
    assert_eq!(mine.len(), 1);
    assert_eq!(
        mine[0].metadata.name.as_deref(),
        Some("node-a-can.dra.dev-0")
    );
    assert_eq!(mine[0].spec.pool.resource_slice_count, 1);
    assert_eq!(mine[0].spec.pool.generation, 6);
    let all: Vec<_> = server
        .slices()
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert_eq!(
        all,
        [
            "node-a-can.dra.dev-0",
            "node-a-gpu.example.com-0",
            "node-b-can.dra.dev-0"
        ]
    );

    // Deletion comes before the writes of the new generation.
    let methods: Vec<_> = server.writes().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["DELETE", "POST", "POST", "DELETE", "PUT"]);
}

#[tokio::test]
async fn an_empty_pool_is_published_as_one_empty_slice() {
    let (server, client, _) = server_with_node().await;
    let publisher = SlicePublisher::new(client, DRIVER, NODE);
    publisher.publish(&small_inventory()).await.unwrap();
    let report = publisher.publish(&Inventory::default()).await.unwrap();
    assert_eq!(report.generation, 2);
    let slices = server.slices();
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].spec.devices.as_deref().unwrap_or_default(), []);
    assert_eq!(slices[0].spec.pool.resource_slice_count, 1);
}

#[tokio::test]
async fn a_missing_node_is_an_error_that_names_it() {
    let (server, client, _) = server_with_node().await;
    let err = SlicePublisher::new(client, DRIVER, "node-z")
        .publish(&small_inventory())
        .await
        .unwrap_err();
    assert!(matches!(err, SliceError::Node { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with("cannot read node node-z:"),
        "{err}"
    );
    assert!(server.slices().is_empty());
}

#[tokio::test]
async fn a_slice_deleted_behind_the_publishers_back_is_recreated() {
    let (server, client, _) = server_with_node().await;
    let publisher = SlicePublisher::new(client.clone(), DRIVER, NODE);
    publisher.publish(&small_inventory()).await.unwrap();
    // The kubelet wipes the node's slices when the plugin was away.
    let api: kube::Api<ResourceSlice> = kube::Api::all(client);
    api.delete("node-a-can.dra.dev-0", &Default::default())
        .await
        .unwrap();
    let report = publisher.publish(&small_inventory()).await.unwrap();
    assert_eq!((report.created, report.generation), (1, 1));
    assert_eq!(server.slices().len(), 1);
}

const SLICE_0: &str = "/apis/resource.k8s.io/v1/resourceslices/node-a-can.dra.dev-0";

#[tokio::test]
async fn a_conflicting_update_is_retried_from_a_fresh_list() {
    let (server, client, _) = server_with_node().await;
    let publisher = SlicePublisher::new(client, DRIVER, NODE);
    publisher.publish(&small_inventory()).await.unwrap();
    let mut inventory = small_inventory();
    inventory.physical[0].state = Some(CanState::ErrorPassive);
    server.inject_failure("PUT", SLICE_0, 409, 1);
    server.clear_requests();

    let report = publisher.publish(&inventory).await.unwrap();
    assert_eq!((report.generation, report.updated), (2, 1));
    let puts: Vec<_> = server
        .writes()
        .into_iter()
        .map(|r| (r.method, r.status))
        .collect();
    assert_eq!(puts, [("PUT".to_owned(), 409), ("PUT".to_owned(), 200)]);
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.endpoint.is_some_and(|e| e.verb == "list"))
        .count();
    assert_eq!(lists, 2, "the retry starts from a fresh list");
    assert_eq!(
        string_attr(device(&server.slices()[0], "can0-m0"), "state"),
        Some("error-passive")
    );
}

#[tokio::test]
async fn persistent_conflicts_and_server_errors_are_reported() {
    let (server, client, _) = server_with_node().await;
    let publisher = SlicePublisher::new(client, DRIVER, NODE);
    publisher.publish(&small_inventory()).await.unwrap();
    let mut inventory = small_inventory();
    inventory.physical[0].state = Some(CanState::BusOff);
    server.inject_failure("PUT", SLICE_0, 409, 10);
    let err = publisher.publish(&inventory).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot update ResourceSlice node-a-can.dra.dev-0:"),
        "{err}"
    );
    let attempts = server
        .requests()
        .iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(attempts, 3);

    // A server error is not a race: reported at once, without retrying.
    let (server, client, _) = server_with_node().await;
    server.inject_failure("GET", "/apis/resource.k8s.io/v1/resourceslices", 500, 1);
    let err = SlicePublisher::new(client, DRIVER, NODE)
        .publish(&small_inventory())
        .await
        .unwrap_err();
    assert!(
        matches!(err, SliceError::Publish(PublishError::List { .. })),
        "{err:?}"
    );
    assert!(server.slices().is_empty());
}

/// Log output collected in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Collects the warnings logged on this thread while the guard lives.
    fn warnings() -> (Self, tracing::subscriber::DefaultGuard) {
        let captured = Self::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    fn lines_with(&self, text: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(text))
            .map(str::to_owned)
            .collect()
    }
}

/// `n` devices, each with a taint (a field behind `DRADeviceTaints`, alpha in 1.34).
fn tainted(n: usize) -> Vec<Device> {
    (0..n)
        .map(|i| {
            serde_json::from_value(json!({
                "name": format!("can0-m{i}"),
                "taints": [{"key": "can.dra.dev/bus-off", "effect": "NoSchedule"}],
            }))
            .unwrap()
        })
        .collect()
}

fn stored_taints(server: &can_dra_doubles::apiserver::ApiServer) -> usize {
    ours(server.slices())
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .map(|d| d.taints.as_ref().map_or(0, Vec::len))
        .sum()
}

#[tokio::test]
async fn a_field_the_server_drops_is_warned_about_once_and_not_written_again() {
    let (warnings, _guard) = Captured::warnings();
    let (server, client, _) = server_with_node().await;
    // A 1.34 API server, where device taints are alpha and off.
    assert!(!server.feature_gate(FeatureGate::DraDeviceTaints));
    let publisher = SlicePublisher::new(client, DRIVER, NODE);
    let first = publisher.publish_devices(&tainted(1)).await.unwrap();
    assert_eq!(first.created, 1);
    assert_eq!(first.dropped, ["spec.devices[*].taints"]);
    assert_eq!(stored_taints(&server), 0);

    server.clear_requests();
    for _ in 0..2 {
        let again = publisher.publish_devices(&tainted(1)).await.unwrap();
        assert!(again.unchanged(), "{again:?}");
        assert!(again.dropped.is_empty());
    }
    assert_eq!(server.writes(), []);

    // A changed pool is written, and checked, again; the warning is not repeated.
    let changed = publisher.publish_devices(&tainted(2)).await.unwrap();
    assert_eq!(changed.updated, 1);
    assert_eq!(changed.dropped, ["spec.devices[*].taints"]);
    assert_eq!(
        ours(server.slices())[0].spec.devices.as_ref().map(Vec::len),
        Some(2)
    );
    let lines = warnings.lines_with("spec.devices[*].taints");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("feature gate"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_field_behind_an_enabled_gate_is_kept_and_not_reported() {
    let (warnings, _guard) = Captured::warnings();
    let (server, client, _) = server_with_node().await;
    server.set_feature_gate(FeatureGate::DraDeviceTaints, true);
    let publisher = SlicePublisher::new(client, DRIVER, NODE);
    let first = publisher.publish_devices(&tainted(1)).await.unwrap();
    assert_eq!(first.created, 1);
    assert!(first.dropped.is_empty());
    assert_eq!(stored_taints(&server), 1);
    // The server stamps the taint's timeAdded; that is no reason to write again either.
    server.clear_requests();
    assert!(
        publisher
            .publish_devices(&tainted(1))
            .await
            .unwrap()
            .unchanged()
    );
    assert_eq!(server.writes(), []);
    assert_eq!(warnings.lines_with("WARN"), Vec::<String>::new());
}
