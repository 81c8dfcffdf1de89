//! Shared set-up for the tests of the daemon's API-server side: the API server double, a Node, and
//! ResourceClaims built from resource.k8s.io/v1 JSON as the scheduler would leave them.

#![allow(dead_code, clippy::unwrap_used)]

use can_dra_doubles::apiserver::{ApiServer, RbacPolicy};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use serde_json::{Value, json};

pub const DRIVER: &str = "can.dra.dev";
pub const NODE: &str = "node-a";

/// A started double with the node `node-a` in it, and a client for it.
pub async fn server_with_node() -> (ApiServer, kube::Client, Node) {
    let server = ApiServer::start().await.unwrap();
    let node = server.insert_node(
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE},
        }))
        .unwrap(),
    );
    let client = server.client().unwrap();
    (server, client, node)
}

/// An allocation result for `driver` in the node's pool.
pub fn result_for(driver: &str, request: &str, device: &str) -> Value {
    json!({"request": request, "driver": driver, "pool": NODE, "device": device})
}

/// An allocation result for this driver.
pub fn result(request: &str, device: &str) -> Value {
    result_for(DRIVER, request, device)
}

/// An opaque config entry of `source` (`FromClass` or `FromClaim`) for this driver.
pub fn config(source: &str, requests: &[&str], parameters: Value) -> Value {
    let mut parameters = parameters;
    if parameters.is_object() {
        parameters["apiVersion"] = json!("can.dra.dev/v1alpha1");
        parameters["kind"] = json!("MemberConfig");
    }
    json!({
        "source": source,
        "requests": requests,
        "opaque": {"driver": DRIVER, "parameters": parameters},
    })
}

/// A claim `ns/name` with the given allocation (`None`: not allocated).
pub fn claim(name: &str, uid: &str, allocation: Option<(Value, Value)>) -> ResourceClaim {
    let mut claim = json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "ns", "uid": uid},
        "spec": {"devices": {"requests": [
            {"name": "a", "exactly": {"deviceClassName": "can.dra.dev"}},
        ]}},
    });
    if let Some((results, configs)) = allocation {
        claim["status"] = json!({
            "allocation": {"devices": {"results": results, "config": configs}},
        });
    }
    serde_json::from_value(claim).unwrap()
}

/// The CanBus API, untyped.
pub fn canbuses(client: &kube::Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
        "can.dra.dev",
        "v1alpha1",
        "CanBus",
    ));
    let resource = ApiResource {
        plural: "canbuses".into(),
        ..resource
    };
    Api::all_with(client.clone(), &resource)
}

/// Creates CanBus `name` (FD, two member slots) with the status the controller would write.
pub async fn create_bus(client: &kube::Client, name: &str) {
    let api = canbuses(client);
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "can.dra.dev/v1alpha1",
        "kind": "CanBus",
        "metadata": {"name": name},
        "spec": {"bitrate": "500k", "fd": true, "maxMembers": 2},
    }))
    .unwrap();
    api.create(&PostParams::default(), &object).await.unwrap();
    let status = json!({"status": {
        "tunnelPort": 47000,
        "endpoints": {NODE: "192.0.2.1:47000"},
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// The chart's roles and bindings, as rendered into `deploy/manifests/can-dra.yaml` (release
/// `can-dra` in namespace `can-dra`, driver `can.dra.dev`).
pub fn chart_rbac() -> RbacPolicy {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/manifests/can-dra.yaml"
    );
    RbacPolicy::from_yaml(&std::fs::read_to_string(path).unwrap()).unwrap()
}
