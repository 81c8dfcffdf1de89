//! Shared set-up for the tests of the daemon's API-server side: the API server double, a Node, and
//! ResourceClaims built from resource.k8s.io/v1 JSON as the scheduler would leave them.

#![allow(dead_code, clippy::unwrap_used)]

use can_dra_doubles::apiserver::ApiServer;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceClaim;
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
