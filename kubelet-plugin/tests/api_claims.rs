//! Reading ResourceClaims for NodePrepareResources, against the API server double: the claim is
//! fetched over HTTP, checked, and its configs for this driver merged per request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use api_support::{DRIVER, NODE, claim, config, result, result_for, server_with_node};
use can_dra_api::Access;
use can_dra_kubelet_plugin::claims::{ClaimError, ClaimReader, ClaimRef, KnownDevices};
use serde_json::json;

fn claim_ref(name: &str, uid: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ns".into(),
        uid: uid.into(),
        name: name.into(),
    }
}

fn known() -> KnownDevices {
    KnownDevices::from_pool(NODE, ["can0-m0", "can0-m1", "body-m0"])
}

#[tokio::test]
async fn class_and_claim_configs_merge_per_request_and_later_entries_win() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(claim(
        "c",
        "uid-1",
        Some((
            json!([result("a", "can0-m0"), result("b", "body-m0")]),
            json!([
                // Class config for every request: listen only, with a receive delay and loss.
                config(
                    "FromClass",
                    &[],
                    json!({"access": "listenOnly",
                    "shaping": {"rx": {"delay": "10ms", "loss": "1%"}}})
                ),
                // Claim config for request a only: its own name and a shorter delay.
                config(
                    "FromClaim",
                    &["a"],
                    json!({"interfaceName": "ecu0",
                    "shaping": {"rx": {"delay": "2ms"}}})
                ),
                // A later claim config for a wins over the earlier one.
                config("FromClaim", &["a"], json!({"interfaceName": "ecu1"})),
            ]),
        )),
    ));
    let reader = ClaimReader::new(client, DRIVER);
    let allocated = reader
        .allocated(&claim_ref("c", "uid-1"), &known())
        .await
        .unwrap();
    let members = &allocated.members;
    assert_eq!(members.len(), 2);

    let a = &members[0];
    assert_eq!(
        (a.request.as_str(), a.pool.as_str(), a.device.as_str()),
        ("a", NODE, "can0-m0")
    );
    assert_eq!(a.member.interface_name.as_str(), "ecu1");
    assert_eq!(a.member.access, Access::ListenOnly);
    assert_eq!(
        a.member.shaping.rx.delay,
        std::time::Duration::from_millis(2)
    );
    assert_eq!(a.member.shaping.rx.loss.to_string(), "1%");

    let b = &members[1];
    assert_eq!(b.device, "body-m0");
    // No name configured: the default follows the device's position among this driver's results.
    assert_eq!(b.member.interface_name.as_str(), "can1");
    assert_eq!(
        b.member.shaping.rx.delay,
        std::time::Duration::from_millis(10)
    );

    let gets: Vec<_> = server
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(
        gets,
        [(
            "GET".to_owned(),
            "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims/c".to_owned()
        )]
    );
}

#[tokio::test]
async fn a_replaced_claim_is_refused_with_both_uids() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(claim(
        "c",
        "uid-new",
        Some((json!([result("a", "can0-m0")]), json!([]))),
    ));
    let err = ClaimReader::new(client, DRIVER)
        .allocated(&claim_ref("c", "uid-old"), &known())
        .await
        .unwrap_err();
    assert!(matches!(err, ClaimError::Replaced { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "claim ns/c was replaced: uid uid-new, expected uid-old"
    );
}

#[tokio::test]
async fn an_unallocated_claim_is_refused() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(claim("c", "uid-1", None));
    let err = ClaimReader::new(client, DRIVER)
        .allocated(&claim_ref("c", "uid-1"), &known())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "claim ns/c is not allocated");
}

#[tokio::test]
async fn a_deleted_claim_is_reported_as_not_found() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(claim(
        "c",
        "uid-1",
        Some((json!([result("a", "can0-m0")]), json!([]))),
    ));
    assert!(server.delete_claim("ns", "c").is_some());
    let err = ClaimReader::new(client, DRIVER)
        .allocated(&claim_ref("c", "uid-1"), &known())
        .await
        .unwrap_err();
    assert!(matches!(err, ClaimError::NotFound { .. }), "{err:?}");
    assert_eq!(err.to_string(), "claim ns/c not found");
}

#[tokio::test]
async fn results_and_configs_of_other_drivers_are_ignored() {
    let (server, client, _) = server_with_node().await;
    let mut foreign = config("FromClaim", &[], json!({"anything": "goes"}));
    foreign["opaque"]["driver"] = json!("gpu.example.com");
    server.insert_claim(claim(
        "c",
        "uid-1",
        Some((
            json!([
                result_for("gpu.example.com", "gpu", "gpu-0"),
                result("a", "can0-m1"),
            ]),
            json!([foreign]),
        )),
    ));
    let members = ClaimReader::new(client, DRIVER)
        .allocated(&claim_ref("c", "uid-1"), &known())
        .await
        .unwrap()
        .members;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].device, "can0-m1");
    // Our first result gets can0, whatever other drivers were allocated before it.
    assert_eq!(members[0].member.interface_name.as_str(), "can0");
}

#[tokio::test]
async fn a_device_this_node_does_not_publish_is_named() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(claim(
        "c",
        "uid-1",
        Some((json!([result("a", "can7-m0")]), json!([]))),
    ));
    let err = ClaimReader::new(client, DRIVER)
        .allocated(&claim_ref("c", "uid-1"), &known())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "claim ns/c, request \"a\": device node-a/can7-m0 is not published by this node"
    );
}

#[tokio::test]
async fn a_malformed_config_names_claim_request_and_field_and_fails_only_that_claim() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(claim(
        "bad",
        "uid-1",
        Some((
            json!([result("a", "can0-m0")]),
            json!([
                config("FromClass", &[], json!({})),
                config(
                    "FromClaim",
                    &["a"],
                    json!({"shaping": {"rx": {"loss": "120%"}}})
                ),
            ]),
        )),
    ));
    server.insert_claim(claim(
        "good",
        "uid-2",
        Some((json!([result("a", "can0-m1")]), json!([]))),
    ));
    let reader = ClaimReader::new(client, DRIVER);
    let err = reader
        .allocated(&claim_ref("bad", "uid-1"), &known())
        .await
        .unwrap_err();
    match &err {
        ClaimError::Config { request, field, .. } => {
            assert_eq!(request, "a");
            assert_eq!(
                field,
                "status.allocation.devices.config[1].opaque.parameters.shaping.rx.loss"
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "claim ns/bad, request \"a\": status.allocation.devices.config[1].opaque.parameters.shaping.rx.loss: 120% is above 100%"
    );
    let good = reader
        .allocated(&claim_ref("good", "uid-2"), &known())
        .await
        .unwrap();
    assert_eq!(good.members[0].member.interface_name.as_str(), "can0");
}

#[tokio::test]
async fn unknown_fields_in_a_config_are_refused_by_name() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(claim(
        "c",
        "uid-1",
        Some((
            json!([result("a", "can0-m0")]),
            json!([config("FromClaim", &[], json!({"interfaceNmae": "x"}))]),
        )),
    ));
    let err = ClaimReader::new(client, DRIVER)
        .allocated(&claim_ref("c", "uid-1"), &known())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("claim ns/c, request \"a\": status.allocation.devices.config[0].opaque.parameters.interfaceNmae: unknown field"),
        "{text}"
    );
}

#[tokio::test]
async fn an_api_server_failure_is_reported_for_that_claim() {
    let (server, client, _) = server_with_node().await;
    server.insert_claim(claim(
        "c",
        "uid-1",
        Some((json!([result("a", "can0-m0")]), json!([]))),
    ));
    server.inject_failure(
        "GET",
        "/apis/resource.k8s.io/v1/namespaces/ns/resourceclaims/c",
        500,
        1,
    );
    let reader = ClaimReader::new(client, DRIVER);
    let err = reader
        .allocated(&claim_ref("c", "uid-1"), &known())
        .await
        .unwrap_err();
    assert!(matches!(err, ClaimError::Api { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("claim ns/c: cannot read it from the API server:"),
        "{err}"
    );
    // The outage was transient: the next attempt succeeds.
    assert!(
        reader
            .allocated(&claim_ref("c", "uid-1"), &known())
            .await
            .is_ok()
    );
}
