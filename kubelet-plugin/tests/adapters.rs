//! Following the node's adapters without a kernel: controllers as the link listing would report
//! them are fed to the adapter watch; the node driver serves the new slots, and what it
//! published is read back from the API server double.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod node_support;

use std::sync::Arc;

use api_support::{DRIVER, NODE, claim, config, result, server_with_node};
use can_dra_api::{Bitrate, NodeConfig};
use can_dra_cluster::naming::node_slice_name;
use can_dra_doubles::apiserver::ApiServer;
use can_dra_kubelet_plugin::adapters::{AdapterChange, AdapterWatch};
use can_dra_kubelet_plugin::inventory::{CanState, Inventory, PhysicalController};
use can_dra_kubelet_plugin::node::NodeDriver;
use can_dra_kubelet_plugin::slices::SlicePublisher;
use dra_kubeletplugin::driver::{ClaimRef, Driver, HealthStatus};
use node_support::node_parts;
use serde_json::json;

const NODE_CONFIG: &str =
    "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\nphysical:\n  slots: 2\n";

fn controller(interface: &str, state: Option<CanState>) -> PhysicalController {
    PhysicalController {
        interface: interface.into(),
        controller: "gs_usb".into(),
        bitrate: Bitrate::from_bits_per_second(500_000),
        data_bitrate: None,
        fd: false,
        state,
        slots: 0,
    }
}

fn active(interface: &str) -> PhysicalController {
    controller(interface, Some(CanState::ErrorActive))
}

struct Rig {
    api: ApiServer,
    driver: Arc<NodeDriver>,
    watch: AdapterWatch,
    _root: tempfile::TempDir,
}

/// A driver serving `found` (published once), and a watch over it.
async fn rig(found: Vec<PhysicalController>) -> Rig {
    let root = tempfile::tempdir().unwrap();
    let (api, client, _) = server_with_node().await;
    let config = NodeConfig::from_yaml_str(NODE_CONFIG).unwrap();
    let inventory = Inventory::from_config(found, &config);
    let publisher = SlicePublisher::new(client.clone(), DRIVER, NODE);
    publisher.publish(&inventory).await.unwrap();
    let driver = Arc::new(NodeDriver::new(node_parts(root.path(), &client, inventory)).unwrap());
    let watch = AdapterWatch::new(driver.clone(), publisher, config);
    Rig {
        api,
        driver,
        watch,
        _root: root,
    }
}

/// The published devices with their `state` attribute, and the pool generation.
fn published(api: &ApiServer) -> (Vec<(String, String)>, i64) {
    let slices = api.slices();
    let generation = slices.iter().map(|s| s.spec.pool.generation).max().unwrap();
    let mut devices: Vec<(String, String)> = slices
        .iter()
        .flat_map(|s| s.spec.devices.clone().unwrap_or_default())
        .map(|d| {
            let state = d
                .attributes
                .unwrap_or_default()
                .get("state")
                .and_then(|a| a.string.clone())
                .unwrap_or_default();
            (d.name, state)
        })
        .collect();
    devices.sort();
    (devices, generation)
}

/// Puts claim `name` allocated `device` into the double and prepares it.
async fn prepare(rig: &Rig, name: &str, device: &str) -> Result<(), String> {
    let uid = format!("uid-{name}");
    rig.api.insert_claim(claim(
        name,
        &uid,
        Some((
            json!([result("a", device)]),
            json!([config("FromClaim", &[], json!({"interfaceName": "ecu0"}))]),
        )),
    ));
    let reference = claim_ref(name);
    let mut answers = rig.driver.prepare(vec![reference]).await.unwrap();
    answers.remove(&uid).unwrap().map(drop)
}

fn claim_ref(name: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ns".into(),
        uid: format!("uid-{name}"),
        name: name.into(),
    }
}

fn health_of(driver: &NodeDriver) -> Vec<(String, HealthStatus, String)> {
    driver
        .health()
        .borrow()
        .iter()
        .map(|h| (h.device.clone(), h.status, h.message.clone()))
        .collect()
}

fn pair(device: &str, state: &str) -> (String, String) {
    (device.to_owned(), state.to_owned())
}

#[tokio::test]
async fn a_new_controller_is_published_and_served_and_a_repeat_writes_nothing() {
    let mut rig = rig(vec![active("can0")]).await;
    assert!(prepare(&rig, "early", "can1-m0").await.is_err());

    let (changes, report) = rig
        .watch
        .apply(vec![active("can0"), active("can1")])
        .await
        .unwrap();

    assert!(
        matches!(&changes[..], [AdapterChange::Appeared { interface, .. }] if interface == "can1"),
        "{changes:?}"
    );
    assert_eq!(report.unwrap().generation, 2);
    let (devices, generation) = published(&rig.api);
    assert_eq!(generation, 2);
    assert_eq!(
        devices,
        [
            pair("can0-m0", "error-active"),
            pair("can0-m1", "error-active"),
            pair("can1-m0", "error-active"),
            pair("can1-m1", "error-active"),
        ]
    );
    prepare(&rig, "late", "can1-m0").await.unwrap();

    rig.api.clear_requests();
    let (changes, report) = rig
        .watch
        .apply(vec![active("can1"), active("can0")])
        .await
        .unwrap();
    assert!(changes.is_empty(), "{changes:?}");
    assert!(report.is_none());
    assert!(rig.api.writes().is_empty(), "{:?}", rig.api.writes());
    assert_eq!(published(&rig.api).1, 2);
}

#[tokio::test]
async fn a_state_change_republishes_once_and_turns_health() {
    let mut rig = rig(vec![active("can0")]).await;

    let (changes, _) = rig
        .watch
        .apply(vec![controller("can0", Some(CanState::BusOff))])
        .await
        .unwrap();

    assert_eq!(
        changes,
        [AdapterChange::Changed {
            interface: "can0".into(),
            what: "state: error-active -> bus-off".into(),
        }]
    );
    assert_eq!(
        published(&rig.api),
        (
            vec![pair("can0-m0", "bus-off"), pair("can0-m1", "bus-off")],
            2
        )
    );
    assert!(
        health_of(&rig.driver)
            .iter()
            .all(|(_, status, message)| *status == HealthStatus::Unhealthy
                && message.contains("bus-off"))
    );

    // Down (a stopped controller) is unhealthy too; back up, healthy again.
    rig.watch
        .apply(vec![controller("can0", Some(CanState::Stopped))])
        .await
        .unwrap();
    assert!(health_of(&rig.driver)[0].2.contains("down"));
    rig.watch.apply(vec![active("can0")]).await.unwrap();
    assert!(
        health_of(&rig.driver)
            .iter()
            .all(|(_, status, _)| *status == HealthStatus::Healthy)
    );
    assert_eq!(published(&rig.api).1, 4);
}

#[tokio::test]
async fn a_vanished_controller_keeps_prepared_slots_unhealthy_until_unprepare() {
    let mut rig = rig(vec![active("can0"), active("can1")]).await;
    prepare(&rig, "held", "can1-m0").await.unwrap();

    let (changes, _) = rig.watch.apply(vec![active("can0")]).await.unwrap();

    assert_eq!(
        changes,
        [AdapterChange::Vanished {
            interface: "can1".into()
        }]
    );
    let (devices, _) = published(&rig.api);
    assert_eq!(
        devices,
        [
            pair("can0-m0", "error-active"),
            pair("can0-m1", "error-active")
        ]
    );
    let health = health_of(&rig.driver);
    let can1: Vec<_> = health.iter().filter(|h| h.0.starts_with("can1")).collect();
    assert_eq!(can1.len(), 1, "{health:?}");
    assert_eq!(can1[0].0, "can1-m0");
    assert_eq!(can1[0].1, HealthStatus::Unhealthy);
    assert!(can1[0].2.contains("can1 is gone"), "{}", can1[0].2);
    assert!(rig.driver.state().await.claims.contains_key("uid-held"));
    // The prepared claim still answers; a new one on the gone controller is refused.
    prepare(&rig, "held", "can1-m0").await.unwrap();
    let refused = prepare(&rig, "new", "can1-m1").await.unwrap_err();
    assert!(refused.contains("can1-m1"), "{refused}");

    let mut answers = rig.driver.unprepare(vec![claim_ref("held")]).await.unwrap();
    answers.remove("uid-held").unwrap().unwrap();
    assert!(rig.driver.state().await.claims.is_empty());
    let health = health_of(&rig.driver);
    assert!(
        health.iter().all(|h| !h.0.starts_with("can1")),
        "{health:?}"
    );

    // The next pass finds nothing to change.
    rig.api.clear_requests();
    let (changes, report) = rig.watch.apply(vec![active("can0")]).await.unwrap();
    assert!(changes.is_empty() && report.is_none());
    assert!(rig.api.writes().is_empty());
}

#[tokio::test]
async fn a_failed_publish_is_retried_on_the_next_pass() {
    let mut rig = rig(vec![active("can0")]).await;
    let slice = node_slice_name(NODE, DRIVER, 0);
    rig.api.inject_failure(
        "PUT",
        &format!("/apis/resource.k8s.io/v1/resourceslices/{slice}"),
        500,
        1,
    );

    let failed = rig.watch.apply(vec![active("can0"), active("can1")]).await;
    assert!(failed.is_err());
    // The driver serves the new controller already.
    assert!(rig.driver.served_devices().contains(&"can1-m0".to_string()));

    let (changes, report) = rig
        .watch
        .apply(vec![active("can0"), active("can1")])
        .await
        .unwrap();
    assert!(changes.is_empty());
    assert!(report.is_some());
    let (devices, _) = published(&rig.api);
    assert_eq!(devices.len(), 4, "{devices:?}");
}
