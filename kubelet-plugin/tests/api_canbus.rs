//! Members of cluster-wide buses (CanBus pools `canbus/<bus>`) prepared by the node driver against
//! the API server double: accepted when the CanBus exists and the slot is within its
//! `maxMembers`, refused with a message naming the bus or device otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod node_support;

use std::collections::HashMap;

use api_support::{DRIVER, claim, config, create_bus, server_with_node};
use can_dra_doubles::apiserver::ApiServer;
use can_dra_kubelet_plugin::inventory::Inventory;
use can_dra_kubelet_plugin::node::NodeDriver;
use can_dra_kubelet_plugin::shared_buses::CanBusReader;
use dra_kubeletplugin::driver::{ClaimRef, ClaimUid, Driver, PreparedDevice};
use node_support::node_parts;
use serde_json::json;

struct Rig {
    api: ApiServer,
    client: kube::Client,
    driver: NodeDriver,
    _root: tempfile::TempDir,
}

async fn rig(shared: bool) -> Rig {
    let root = tempfile::tempdir().unwrap();
    let (api, client, _) = server_with_node().await;
    let driver = NodeDriver::new(node_parts(root.path(), &client, Inventory::default())).unwrap();
    let driver = if shared {
        driver.with_shared_buses(CanBusReader::new(client.clone()))
    } else {
        driver
    };
    Rig {
        api,
        client,
        driver,
        _root: root,
    }
}

/// A claim `name` allocated `pool/device`.
fn shared_claim(rig: &Rig, name: &str, pool: &str, device: &str) -> ClaimRef {
    let uid = format!("uid-{name}");
    rig.api.insert_claim(claim(
        name,
        &uid,
        Some((
            json!([{"request": "a", "driver": DRIVER, "pool": pool, "device": device}]),
            json!([config("FromClaim", &[], json!({"interfaceName": "ecu0"}))]),
        )),
    ));
    ClaimRef {
        namespace: "ns".into(),
        name: name.into(),
        uid,
    }
}

async fn prepare(rig: &Rig, claim: ClaimRef) -> Result<Vec<PreparedDevice>, String> {
    let uid: ClaimUid = claim.uid.clone();
    let mut answers: HashMap<_, _> = rig.driver.prepare(vec![claim]).await.unwrap();
    answers.remove(&uid).unwrap()
}

#[tokio::test]
async fn a_member_slot_of_an_existing_canbus_is_prepared_on_the_buses_mesh() {
    let rig = rig(true).await;
    create_bus(&rig.client, "powertrain").await;
    let claim = shared_claim(&rig, "c1", "canbus/powertrain", "m1");
    let devices = prepare(&rig, claim.clone()).await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].pool_name, "canbus/powertrain");
    assert_eq!(devices[0].device_name, "m1");

    let state = rig.driver.state().await;
    let member = &state.claims[&claim.uid].devices[0];
    assert_eq!(member.bus, "canbus/powertrain");
    assert_eq!(member.shared_fd, Some(true));
    assert!(
        member.member.fd,
        "an FD bus makes its members FD unless they ask otherwise"
    );
    assert_eq!(
        rig.driver
            .shared_pools()
            .await
            .into_iter()
            .collect::<Vec<_>>(),
        ["canbus/powertrain"]
    );
}

#[tokio::test]
async fn unknown_buses_and_slots_beyond_max_members_are_refused_by_name() {
    let rig = rig(true).await;
    create_bus(&rig.client, "powertrain").await;
    let error = prepare(&rig, shared_claim(&rig, "ghost", "canbus/ghost", "m0"))
        .await
        .unwrap_err();
    assert!(
        error.contains("no CanBus publishes pool canbus/ghost"),
        "{error}"
    );
    let error = prepare(&rig, shared_claim(&rig, "far", "canbus/powertrain", "m2"))
        .await
        .unwrap_err();
    assert!(
        error.contains("m2") && error.contains("maxMembers 2"),
        "{error}"
    );
    assert!(rig.driver.state().await.claims.is_empty(), "nothing kept");
    assert!(rig.driver.shared_pools().await.is_empty());
}

#[tokio::test]
async fn without_shared_buses_a_canbus_device_is_not_served() {
    let rig = rig(false).await;
    create_bus(&rig.client, "powertrain").await;
    let error = prepare(&rig, shared_claim(&rig, "c1", "canbus/powertrain", "m0"))
        .await
        .unwrap_err();
    assert!(error.contains("canbus/powertrain/m0"), "{error}");
}

#[tokio::test]
async fn the_tunnels_are_told_which_pools_have_prepared_members() {
    let rig = rig(true).await;
    create_bus(&rig.client, "powertrain").await;
    let mut pools = rig.driver.watch_shared_pools();
    assert!(pools.borrow_and_update().is_empty());

    let claim = shared_claim(&rig, "c1", "canbus/powertrain", "m0");
    prepare(&rig, claim.clone()).await.unwrap();
    assert!(
        pools.has_changed().unwrap(),
        "prepare did not tell the tunnels"
    );
    assert_eq!(
        pools.borrow_and_update().iter().collect::<Vec<_>>(),
        ["canbus/powertrain"]
    );

    let answers = rig.driver.unprepare(vec![claim.clone()]).await.unwrap();
    assert_eq!(answers[&claim.uid], Ok(()));
    assert!(
        pools.has_changed().unwrap(),
        "unprepare did not tell the tunnels"
    );
    assert!(pools.borrow_and_update().is_empty());
}
