//! The node daemon's attach path against a real kernel: two claims on one virtual bus are
//! prepared through the driver, attached to processes in their own network namespaces as the CDI
//! hook would, and checked with iproute2 and can-utils, which share no code with the driver.
//!
//! The observers (testkit's) run with `ip netns exec`; the host side of the bus lives in the
//! test process's namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod node_support;

use std::time::Duration;

use api_support::{NODE, claim, config, result, server_with_node};
use can_dra_kubelet_plugin::checkpoint::CheckpointStore;
use can_dra_kubelet_plugin::hook_socket::{AttachRequest, Attacher, Requester};
use can_dra_kubelet_plugin::node::{NodeDriver, NodeParts, NodeState};
use can_dra_testkit::{
    Candump, Host, TestNetns, cangw_rules_uncounted, cansend, link_in, links_in,
};
use dra_kubeletplugin::driver::{ClaimRef, Driver};
use node_support::{body_bus, node_parts};
use serde_json::json;

/// Names of the links in the test's namespace that the driver owns (`cdra` prefix).
fn host_member_links() -> Vec<String> {
    links_in(&Host)
        .unwrap()
        .into_iter()
        .map(|link| link.name)
        .filter(|name| name.starts_with("cdra"))
        .collect()
}

fn claim_ref(name: &str, uid: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ns".into(),
        uid: uid.into(),
        name: name.into(),
    }
}

fn attach_request(uid: &str, device: &str, pid: u32) -> AttachRequest {
    AttachRequest {
        claim_uid: uid.into(),
        pool: NODE.into(),
        device: device.into(),
        pid,
        container_id: format!("ctr-{uid}"),
        deadline_unix_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
async fn two_pods_attached_to_one_bus_exchange_frames_and_unprepare_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (api, client, _) = server_with_node().await;
    let parts = node_parts(root.path(), &client, body_bus(4));
    let cdi = parts.cdi.clone();
    let checkpoint = CheckpointStore::new(root.path().join("plugins/checkpoint.json"));
    let driver = NodeDriver::new(NodeParts {
        checkpoint: checkpoint.clone(),
        ..parts
    })
    .unwrap();
    for (name, uid, device, interface) in [
        ("ecu-a", "uid-a", "body-m0", "can0"),
        ("ecu-b", "uid-b", "body-m1", "bus"),
    ] {
        api.insert_claim(claim(
            name,
            uid,
            Some((
                json!([result("a", device)]),
                json!([config(
                    "FromClaim",
                    &[],
                    json!({"interfaceName": interface})
                )]),
            )),
        ));
    }
    let rules_before = cangw_rules_uncounted(&Host).unwrap();
    let links_before = host_member_links();

    let claims = vec![claim_ref("ecu-a", "uid-a"), claim_ref("ecu-b", "uid-b")];
    let prepared = driver.prepare(claims.clone()).await.unwrap();
    for uid in ["uid-a", "uid-b"] {
        let devices = prepared[uid].as_ref().unwrap();
        assert_eq!(devices.len(), 1, "{uid}: {devices:?}");
    }
    // Prepare alone touches no kernel state.
    assert_eq!(cangw_rules_uncounted(&Host).unwrap(), rules_before);

    let pod_a = TestNetns::new("attach-a").unwrap();
    let pod_b = TestNetns::new("attach-b").unwrap();
    // Processes standing for the pods' containers: the driver finds a namespace by pid.
    let (ctr_a, ctr_b) = (pod_a.resident().unwrap(), pod_b.resident().unwrap());
    let attached_a = driver
        .attach(
            attach_request("uid-a", "body-m0", ctr_a.pid()),
            Requester::default(),
        )
        .await
        .unwrap();
    assert!(attached_a.contains("attached"), "{attached_a}");
    let attached_b = driver
        .attach(
            attach_request("uid-b", "body-m1", ctr_b.pid()),
            Requester::default(),
        )
        .await
        .unwrap();
    assert!(attached_b.contains("attached"), "{attached_b}");

    // Each pod sees its member under the name its claim asked for, as a vxcan end.
    for (pod, interface) in [(&pod_a, "can0"), (&pod_b, "bus")] {
        let link = link_in(pod, interface)
            .unwrap()
            .unwrap_or_else(|| panic!("no {interface} in {}", pod.name()));
        assert_eq!(link.kind.as_deref(), Some("vxcan"), "{link:?}");
        assert!(link.up, "{interface} is not up: {link:?}");
    }
    let host_links = host_member_links();
    assert_eq!(
        host_links.len(),
        links_before.len() + 2,
        "one host end per member: {host_links:?}"
    );
    let rules_attached = cangw_rules_uncounted(&Host).unwrap();
    // A full mesh of two members: one rule each way.
    assert_eq!(
        rules_attached.len(),
        rules_before.len() + 2,
        "{rules_attached:?}"
    );

    // A frame from pod A reaches pod B exactly once, and the other way round.
    for (from, from_if, to, to_if, frame, id, data) in [
        (
            &pod_a,
            "can0",
            &pod_b,
            "bus",
            "123#DEADBEEF",
            0x123,
            &[0xde, 0xad, 0xbe, 0xef][..],
        ),
        (
            &pod_b,
            "bus",
            &pod_a,
            "can0",
            "456#0102",
            0x456,
            &[1, 2][..],
        ),
    ] {
        let dump = Candump::start(to, to_if).unwrap();
        cansend(from, from_if, frame).unwrap();
        dump.wait_for(1, Duration::from_secs(10));
        let frames = dump.stop().unwrap();
        let seen = frames
            .iter()
            .filter(|f| f.id == id && f.data == data)
            .count();
        assert_eq!(
            seen, 1,
            "{frame} from {from_if} seen {seen} times on {to_if}: {frames:?}"
        );
        assert_eq!(frames.len(), 1, "unexpected frames on {to_if}: {frames:?}");
    }

    // The hook runs again for a second container of the pod: nothing changes.
    let again = driver
        .attach(
            attach_request("uid-a", "body-m0", ctr_a.pid()),
            Requester::default(),
        )
        .await
        .unwrap();
    assert!(again.contains("already attached"), "{again}");
    assert_eq!(
        cangw_rules_uncounted(&Host).unwrap(),
        rules_attached,
        "a repeated attach added rules"
    );
    assert_eq!(host_member_links(), host_links);
    let state: NodeState = checkpoint.load().unwrap();
    for uid in ["uid-a", "uid-b"] {
        assert!(
            state.claims[uid].devices[0].attachment.is_some(),
            "{uid} not attached in the checkpoint"
        );
    }

    let gone = driver.unprepare(claims).await.unwrap();
    for uid in ["uid-a", "uid-b"] {
        assert_eq!(gone[uid], Ok(()), "{uid}");
    }
    assert_eq!(
        host_member_links(),
        links_before,
        "member links left behind"
    );
    assert_eq!(
        cangw_rules_uncounted(&Host).unwrap(),
        rules_before,
        "can-gw rules left behind"
    );
    for (pod, interface) in [(&pod_a, "can0"), (&pod_b, "bus")] {
        let link = link_in(pod, interface).unwrap();
        assert!(
            link.is_none(),
            "{interface} left in {}: {link:?}",
            pod.name()
        );
    }
    assert!(cdi.claims_with_specs().unwrap().is_empty());
    let state: NodeState = checkpoint.load().unwrap();
    assert!(state.claims.is_empty(), "{:?}", state.claims);
}
