//! The real daemon under the chart's RBAC on a Kubernetes 1.36 API server double, where writing a
//! claim's `status.devices` also needs `resourceclaims/driver`: a member of a CanBus pool (an
//! allocation not bound to the daemon's node) gets its status with the chart's roles, and without
//! the `arbitrary-node` grant the write is refused and the refusal is logged by name.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod daemon_support;

use std::path::Path;

use api_support::{DRIVER, NODE, chart_rbac, claim, config, create_bus, server_with_node};
use can_dra_doubles::apiserver::{ApiServer, RbacPolicy, User};
use can_dra_proto::dra::v1::Claim;
use daemon_support::{Daemon, NodeDirs};
use serde_json::{Value, json};

/// The daemon's token: its ServiceAccount, bound to a pod on [`NODE`].
const TOKEN: &str = "kubelet-plugin-token";
const HOOK: &str = "/opt/can-dra/bin/can-dra-cdi-hook";
const NODE_CONFIG: &str = "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\n\
physical:\n  include: []\nvirtualBuses:\n- name: body\n  bitrate: 500k\n  slots: 2\n";

/// A 1.`minor` double with RBAC from `policy`, the CanBus `powertrain` and a claim `c1` for its
/// member slot `m0`, allocated with `node_selector` (`None`: the bus spans all nodes).
async fn cluster(minor: u32, policy: RbacPolicy, node_selector: Option<Value>) -> ApiServer {
    let (api, _, _) = server_with_node().await;
    api.enable_rbac(policy);
    api.set_minor_version(minor);
    api.add_token(
        TOKEN,
        User::service_account("can-dra", "can-dra-kubelet-plugin").on_node(NODE),
    );
    api.add_token("admin", User::admin());
    create_bus(&api.client_as("admin").await.unwrap(), "powertrain").await;
    let mut claim = claim(
        "c1",
        "uid-c1",
        Some((
            json!([
                {"request": "a", "driver": DRIVER, "pool": "canbus/powertrain", "device": "m0"},
            ]),
            json!([config("FromClaim", &[], json!({"interfaceName": "ecu0"}))]),
        )),
    );
    if let (Some(selector), Some(allocation)) = (
        node_selector,
        claim.status.as_mut().and_then(|s| s.allocation.as_mut()),
    ) {
        allocation.node_selector = Some(serde_json::from_value(selector).unwrap());
    }
    api.insert_claim(claim);
    api
}

/// Starts the daemon as [`TOKEN`] and asks it to prepare `c1`; the daemon, for its log.
async fn prepare(api: &ApiServer, root: &Path) -> Daemon {
    let dirs = NodeDirs::new(root, api, NODE_CONFIG);
    api.write_kubeconfig_as(&dirs.kubeconfig, TOKEN).unwrap();
    let daemon = Daemon::start(&dirs, NODE, DRIVER, Path::new(HOOK)).await;
    let response = daemon
        .plugin
        .prepare(vec![Claim {
            namespace: "ns".into(),
            uid: "uid-c1".into(),
            name: "c1".into(),
        }])
        .await
        .unwrap();
    let answer = &response.claims["uid-c1"];
    assert_eq!(answer.error, "", "the claim is usable either way");
    assert_eq!(answer.devices.len(), 1);
    daemon
}

/// The interface names this driver wrote into `c1`'s `status.devices`.
fn written(api: &ApiServer) -> Vec<String> {
    api.claim("ns", "c1")
        .unwrap()
        .status
        .and_then(|s| s.devices)
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.driver == DRIVER)
        .filter_map(|d| d.network_data.and_then(|n| n.interface_name))
        .collect()
}

/// The daemon's requests the double refused, as `status method path`.
fn refused(api: &ApiServer) -> Vec<String> {
    api.requests()
        .iter()
        .filter(|r| r.is_from(TOKEN) && r.status >= 400 && r.status != 404)
        .map(|r| format!("{} {} {}", r.status, r.method, r.path))
        .collect()
}

/// The chart's roles without the `arbitrary-node` verbs on `resourceclaims/driver`: what the
/// chart granted before 1.36 support.
fn without_arbitrary_node(mut policy: RbacPolicy) -> RbacPolicy {
    for role in &mut policy.cluster_roles {
        for rule in role.rules.iter_mut().flatten() {
            rule.verbs.retain(|v| !v.starts_with("arbitrary-node:"));
        }
    }
    policy
}

#[tokio::test]
async fn a_canbus_member_gets_its_status_under_the_charts_rbac_on_1_36() {
    let root = tempfile::tempdir().unwrap();
    let api = cluster(36, chart_rbac(), None).await;
    let daemon = prepare(&api, root.path()).await;
    assert_eq!(written(&api), ["ecu0"], "{}", daemon.log_text());
    assert_eq!(
        refused(&api),
        Vec::<String>::new(),
        "every call of the daemon is granted"
    );
    assert!(daemon.stop());
}

#[tokio::test]
async fn a_selector_spanning_nodes_is_not_associated_with_the_daemons_node() {
    let root = tempfile::tempdir().unwrap();
    let selector = json!({"nodeSelectorTerms": [{"matchFields": [
        {"key": "metadata.name", "operator": "In", "values": [NODE, "node-b"]},
    ]}]});
    let api = cluster(36, chart_rbac(), Some(selector.clone())).await;
    let daemon = prepare(&api, root.path()).await;
    assert_eq!(written(&api), ["ecu0"], "{}", daemon.log_text());
    drop(daemon);

    let root = tempfile::tempdir().unwrap();
    let api = cluster(36, without_arbitrary_node(chart_rbac()), Some(selector)).await;
    let daemon = prepare(&api, root.path()).await;
    assert!(written(&api).is_empty());
    let log = daemon.log_text();
    assert!(log.contains("arbitrary-node:patch"), "{log}");
}

#[tokio::test]
async fn without_the_arbitrary_node_grant_the_write_is_refused_and_logged() {
    let root = tempfile::tempdir().unwrap();
    let api = cluster(36, without_arbitrary_node(chart_rbac()), None).await;
    let daemon = prepare(&api, root.path()).await;
    assert!(written(&api).is_empty(), "the status write must be refused");
    assert_eq!(
        refused(&api),
        ["422 PATCH /apis/resource.k8s.io/v1/namespaces/ns/resourceclaims/c1/status"]
    );
    let log = daemon.log_text();
    assert!(
        log.contains("writing the claim status failed")
            && log.contains(
                "cannot arbitrary-node:patch resource \\\"resourceclaims/driver\\\" in API group \
                 \\\"resource.k8s.io\\\" in the namespace \\\"ns\\\""
            ),
        "{log}"
    );

    // The same roles on a 1.35 server: no per-driver check, the status is written.
    let root = tempfile::tempdir().unwrap();
    let api = cluster(35, without_arbitrary_node(chart_rbac()), None).await;
    let daemon = prepare(&api, root.path()).await;
    assert_eq!(written(&api), ["ecu0"], "{}", daemon.log_text());
}
