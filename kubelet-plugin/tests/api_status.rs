//! This driver's `status.devices` entries on a ResourceClaim, written through the API server
//! double's status subresource with server-side apply and read back as resource.k8s.io/v1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use api_support::{DRIVER, NODE, claim, result, result_for, server_with_node};
use can_dra_kubelet_plugin::claim_status::{Cleared, DeviceReady, StatusWriter};
use can_dra_kubelet_plugin::claims::ClaimRef;
use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, ResourceClaim};
use serde_json::json;

fn claim_ref() -> ClaimRef {
    ClaimRef {
        namespace: "ns".into(),
        uid: "uid-1".into(),
        name: "c".into(),
    }
}

/// A claim with two devices of ours and one GPU whose driver already wrote its status entry.
fn seeded_claim() -> ResourceClaim {
    let mut claim = claim(
        "c",
        "uid-1",
        Some((
            json!([
                result("a", "can0-m0"),
                result("b", "body-m0"),
                result_for("gpu.example.com", "gpu", "gpu-0"),
            ]),
            json!([]),
        )),
    );
    let status = claim.status.as_mut().unwrap();
    status.devices = Some(vec![
        serde_json::from_value(json!({
            "driver": "gpu.example.com", "pool": NODE, "device": "gpu-0",
            "conditions": [{"type": "Ready", "status": "True", "reason": "GpuReady",
                            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        }))
        .unwrap(),
    ]);
    claim
}

fn entries<'a>(claim: &'a ResourceClaim, driver: &str) -> Vec<&'a AllocatedDeviceStatus> {
    claim
        .status
        .as_ref()
        .and_then(|s| s.devices.as_ref())
        .into_iter()
        .flatten()
        .filter(|e| e.driver == driver)
        .collect()
}

#[tokio::test]
async fn ready_condition_and_interface_name_are_written_next_to_other_drivers_entries() {
    let (server, client, _) = server_with_node().await;
    let stored = server.insert_claim(seeded_claim());
    let writer = StatusWriter::new(client, DRIVER);
    writer
        .mark_ready(
            &claim_ref(),
            &[
                DeviceReady::new(NODE, "can0-m0", "can0"),
                DeviceReady::new(NODE, "body-m0", "body"),
            ],
            Some(&stored),
        )
        .await
        .unwrap();

    let claim = server.claim("ns", "c").unwrap();
    let ours = entries(&claim, DRIVER);
    assert_eq!(ours.len(), 2);
    let first = ours.iter().find(|e| e.device == "can0-m0").unwrap();
    assert_eq!(first.pool, NODE);
    assert_eq!(
        first
            .network_data
            .as_ref()
            .and_then(|n| n.interface_name.as_deref()),
        Some("can0")
    );
    let condition = &first.conditions.as_ref().unwrap()[0];
    assert_eq!(
        (condition.type_.as_str(), condition.status.as_str()),
        ("Ready", "True")
    );
    assert_eq!(condition.reason, "MemberPrepared");
    assert_eq!(
        condition.message,
        "CAN bus member prepared as can0 in the pod"
    );
    let second = ours.iter().find(|e| e.device == "body-m0").unwrap();
    assert_eq!(
        second
            .network_data
            .as_ref()
            .and_then(|n| n.interface_name.as_deref()),
        Some("body")
    );
    assert_eq!(
        entries(&claim, "gpu.example.com").len(),
        1,
        "another driver's entry was lost"
    );

    let patch = server.writes().pop().unwrap();
    assert_eq!(patch.method, "PATCH");
    assert_eq!(
        patch.path,
        "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims/c/status"
    );
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    let query = patch.query.unwrap_or_default();
    assert!(
        query.contains("fieldManager=can.dra.dev") && query.contains("force=true"),
        "{query}"
    );
}

#[tokio::test]
async fn preparing_again_with_fewer_devices_drops_the_stale_entry() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(seeded_claim());
    let writer = StatusWriter::new(client, DRIVER);
    let both = [
        DeviceReady::new(NODE, "can0-m0", "can0"),
        DeviceReady::new(NODE, "body-m0", "body"),
    ];
    writer.mark_ready(&claim_ref(), &both, None).await.unwrap();
    writer
        .mark_ready(&claim_ref(), &both[..1], None)
        .await
        .unwrap();
    let claim = server.claim("ns", "c").unwrap();
    let ours: Vec<_> = entries(&claim, DRIVER)
        .iter()
        .map(|e| e.device.clone())
        .collect();
    assert_eq!(ours, ["can0-m0"]);
}

#[tokio::test]
async fn unprepare_removes_only_our_entries_and_is_idempotent() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(seeded_claim());
    let writer = StatusWriter::new(client, DRIVER);
    writer
        .mark_ready(
            &claim_ref(),
            &[DeviceReady::new(NODE, "can0-m0", "can0")],
            None,
        )
        .await
        .unwrap();

    assert_eq!(writer.clear(&claim_ref()).await.unwrap(), Cleared::Removed);
    let claim = server.claim("ns", "c").unwrap();
    assert!(entries(&claim, DRIVER).is_empty());
    assert_eq!(entries(&claim, "gpu.example.com").len(), 1);

    server.clear_requests();
    assert_eq!(
        writer.clear(&claim_ref()).await.unwrap(),
        Cleared::NothingToDo
    );
    assert_eq!(server.writes(), [], "a second unprepare must not write");

    server.delete_claim("ns", "c");
    assert_eq!(
        writer.clear(&claim_ref()).await.unwrap(),
        Cleared::NothingToDo
    );
}

#[tokio::test]
async fn unprepare_leaves_a_replaced_claim_alone() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(seeded_claim());
    let writer = StatusWriter::new(client, DRIVER);
    writer
        .mark_ready(
            &claim_ref(),
            &[DeviceReady::new(NODE, "can0-m0", "can0")],
            None,
        )
        .await
        .unwrap();
    let stale = ClaimRef {
        uid: "uid-0".into(),
        ..claim_ref()
    };
    assert_eq!(writer.clear(&stale).await.unwrap(), Cleared::NothingToDo);
    assert_eq!(entries(&server.claim("ns", "c").unwrap(), DRIVER).len(), 1);
}

#[tokio::test]
async fn a_device_outside_the_allocation_is_refused_by_the_api() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(seeded_claim());
    let err = StatusWriter::new(client, DRIVER)
        .mark_ready(
            &claim_ref(),
            &[DeviceReady::new(NODE, "can9-m0", "can0")],
            None,
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("claim ns/c: cannot write status.devices:"),
        "{text}"
    );
    assert!(
        text.contains("must be an allocated device in the claim"),
        "{text}"
    );
}
