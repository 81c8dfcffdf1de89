//! The authorizer's rules, each against the upstream behaviour it restates.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use super::super::ApiServer;
use super::{RbacPolicy, User, request_verb, selected_name};

const DRIVER: &str = "can.dra.dev";

/// A daemon-like ServiceAccount `drivers/node-agent` that may get Nodes (only `node-a` by name),
/// list them, apply claim status and, per `driver_verbs`, write `resourceclaims/driver` for its
/// own driver; and a Role in namespace `lab` for Leases.
fn policy(driver_verbs: &[&str]) -> RbacPolicy {
    let verbs = serde_json::to_string(driver_verbs).unwrap_or_default();
    RbacPolicy::from_yaml(&format!(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: node-agent, namespace: drivers}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: node-agent}}
rules:
  - apiGroups: [""]
    resources: ["nodes"]
    resourceNames: ["node-a"]
    verbs: ["get"]
  - apiGroups: [""]
    resources: ["nodes"]
    verbs: ["list"]
  - apiGroups: ["resource.k8s.io"]
    resources: ["*/status"]
    verbs: ["patch"]
  - apiGroups: ["resource.k8s.io"]
    resources: ["resourceclaims/driver"]
    resourceNames: ["{DRIVER}"]
    verbs: {verbs}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: node-agent}}
subjects: [{{kind: ServiceAccount, name: node-agent, namespace: drivers}}]
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: node-agent}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: leases, namespace: lab}}
rules: [{{apiGroups: [coordination.k8s.io], resources: [leases], verbs: [create]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: leases, namespace: lab}}
subjects: [{{kind: ServiceAccount, name: node-agent, namespace: drivers}}]
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: leases}}
"#
    ))
    .unwrap()
}

async fn server(driver_verbs: &[&str]) -> ApiServer {
    let server = ApiServer::start().await.unwrap();
    for name in ["node-a", "node-b"] {
        server.insert_node(serde_json::from_value(json!({"metadata": {"name": name}})).unwrap());
    }
    server.enable_rbac(policy(driver_verbs));
    server.add_token(
        "agent",
        User::service_account("drivers", "node-agent").on_node("node-a"),
    );
    server.add_token("admin", User::admin());
    server
}

fn api_error(error: kube::Error) -> (u16, String, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason, status.message),
        other => panic!("not an API error: {other:?}"),
    }
}

#[tokio::test]
async fn a_bound_rule_allows_and_anything_else_is_forbidden_with_the_servers_message() {
    let server = server(&[]).await;
    let nodes: Api<Node> = Api::all(server.client_as("agent").await.unwrap());
    nodes.get("node-a").await.unwrap();
    assert_eq!(
        nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );

    // resourceNames: another node's name is not granted.
    let (code, reason, message) = api_error(nodes.get("node-b").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        message,
        "nodes \"node-b\" is forbidden: User \"system:serviceaccount:drivers:node-agent\" cannot \
         get resource \"nodes\" in API group \"\" at the cluster scope"
    );
    // A watch is its own verb.
    let watch = server
        .client_as("agent")
        .await
        .unwrap()
        .request_text(
            http::Request::get(format!("{}/api/v1/nodes?watch=true", server.url()))
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let (code, _, message) = api_error(watch);
    assert_eq!(code, 403);
    assert!(
        message.contains("cannot watch resource \"nodes\""),
        "{message}"
    );
    // Anything with a denied request is logged like any other.
    assert!(server.requests().iter().any(|r| r.status == 403));
}

#[tokio::test]
async fn unknown_tokens_are_unauthorized_and_no_token_is_anonymous() {
    let server = server(&[]).await;
    let stranger: Api<Node> = Api::all(server.client_as("who").await.unwrap());
    let (code, reason, _) = api_error(stranger.get("node-a").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (401, "Unauthorized"));
    let anonymous: Api<Node> = Api::all(server.client().unwrap());
    let (code, _, message) = api_error(anonymous.get("node-a").await.unwrap_err());
    assert_eq!(code, 403);
    assert!(message.contains("User \"system:anonymous\""), "{message}");
    let admin: Api<Node> = Api::all(server.client_as("admin").await.unwrap());
    admin.get("node-b").await.unwrap();
}

#[tokio::test]
async fn a_role_binding_grants_only_in_its_namespace() {
    let server = server(&[]).await;
    let client = server.client_as("agent").await.unwrap();
    let lease = |ns: &str| -> Lease {
        serde_json::from_value(json!({"metadata": {"name": "l", "namespace": ns}})).unwrap()
    };
    Api::<Lease>::namespaced(client.clone(), "lab")
        .create(&PostParams::default(), &lease("lab"))
        .await
        .unwrap();
    let (code, _, message) = api_error(
        Api::<Lease>::namespaced(client, "elsewhere")
            .create(&PostParams::default(), &lease("elsewhere"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert!(
        message.ends_with(
            "cannot create resource \"leases\" in API group \"coordination.k8s.io\" in the \
             namespace \"elsewhere\""
        ),
        "{message}"
    );
}

#[test]
fn verbs_and_names_follow_request_info() {
    let query = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    assert_eq!(request_verb("GET", true, &[]), "get");
    assert_eq!(request_verb("GET", false, &[]), "list");
    assert_eq!(
        request_verb("GET", false, &query(&[("watch", "true")])),
        "watch"
    );
    assert_eq!(
        request_verb("GET", false, &query(&[("watch", "1")])),
        "watch"
    );
    assert_eq!(request_verb("POST", false, &[]), "create");
    assert_eq!(request_verb("PUT", true, &[]), "update");
    assert_eq!(request_verb("PATCH", true, &[]), "patch");
    assert_eq!(request_verb("DELETE", true, &[]), "delete");
    assert_eq!(request_verb("DELETE", false, &[]), "deletecollection");
    let selector = |s: &str| selected_name(&query(&[("fieldSelector", s)]));
    assert_eq!(selector("metadata.name=n1").as_deref(), Some("n1"));
    assert_eq!(
        selector("spec.driver=d,metadata.name==n1").as_deref(),
        Some("n1")
    );
    assert_eq!(selector("metadata.name!=n1"), None);
    assert_eq!(selector("spec.nodeName=n1"), None);
}

/// A claim allocated `pool/dev0` of [`DRIVER`], bound to `node` (`None`: a pool spanning nodes).
fn claim(node: Option<&str>) -> ResourceClaim {
    let mut allocation = json!({"devices": {"results": [
        {"request": "a", "driver": DRIVER, "pool": "pool", "device": "dev0"},
    ]}});
    if let Some(node) = node {
        allocation["nodeSelector"] = json!({"nodeSelectorTerms": [{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": [node]},
        ]}]});
    }
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "c", "namespace": "ns", "uid": "u1"},
        "spec": {"devices": {"requests": [{"name": "a", "exactly": {"deviceClassName": "x"}}]}},
        "status": {"allocation": allocation},
    }))
    .unwrap()
}

/// Applies a Ready status entry for `dev0`, as the daemon does.
async fn write_status(client: Client, interface: &str) -> Result<ResourceClaim, kube::Error> {
    let body = json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "c", "namespace": "ns"},
        "status": {"devices": [{"driver": DRIVER, "pool": "pool", "device": "dev0",
                                "networkData": {"interfaceName": interface}}]},
    });
    Api::<ResourceClaim>::namespaced(client, "ns")
        .patch_status(
            "c",
            &PatchParams::apply(DRIVER).force(),
            &Patch::Apply(&body),
        )
        .await
}

#[tokio::test]
async fn from_1_36_status_devices_need_the_driver_subresource_by_node_association() {
    // Granted associated-node only: the node-bound claim is writable, a multi-node one is not.
    let server = server(&["associated-node:patch"]).await;
    server.set_minor_version(36);
    server.insert_claim(claim(Some("node-a")));
    let agent = server.client_as("agent").await.unwrap();
    write_status(agent.clone(), "can0").await.unwrap();

    server.insert_claim(claim(None));
    let (code, reason, message) = api_error(write_status(agent.clone(), "can0").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert_eq!(
        message,
        "ResourceClaim.resource.k8s.io \"c\" is invalid: status.devices: Forbidden: changing \
         status.devices requires resource=\"resourceclaims/driver\", \
         verb=\"[arbitrary-node:patch]\" permission: \
         resourceclaims.resource.k8s.io \"can.dra.dev\" is forbidden: \
         User \"system:serviceaccount:drivers:node-agent\" cannot arbitrary-node:patch \
         resource \"resourceclaims/driver\" in API group \"resource.k8s.io\" \
         in the namespace \"ns\""
    );
    assert!(
        server
            .claim("ns", "c")
            .unwrap()
            .status
            .unwrap()
            .devices
            .is_none(),
        "a refused write changes nothing"
    );

    // A claim bound to another node is not associated with the caller either.
    server.insert_claim(claim(Some("node-b")));
    let (_, _, message) = api_error(write_status(agent, "can0").await.unwrap_err());
    assert!(
        message.contains("verb=\"[arbitrary-node:patch]\""),
        "{message}"
    );
}

#[tokio::test]
async fn arbitrary_node_covers_any_claim_and_associated_node_is_tried_first() {
    let server = server(&["arbitrary-node:patch"]).await;
    server.set_minor_version(37);
    let agent = server.client_as("agent").await.unwrap();
    server.insert_claim(claim(None));
    write_status(agent.clone(), "can0").await.unwrap();
    server.insert_claim(claim(Some("node-a")));
    write_status(agent, "can0").await.unwrap();

    // Denied on a node-bound claim: the first verb tried, associated-node, is reported.
    let server = self::server(&[]).await;
    server.set_minor_version(36);
    server.insert_claim(claim(Some("node-a")));
    let agent = server.client_as("agent").await.unwrap();
    let (_, _, message) = api_error(write_status(agent, "can0").await.unwrap_err());
    assert!(
        message.contains(
            "verb=\"[associated-node:patch arbitrary-node:patch]\" permission: \
             resourceclaims.resource.k8s.io \"can.dra.dev\" is forbidden: User \
             \"system:serviceaccount:drivers:node-agent\" cannot associated-node:patch"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn before_1_36_and_for_unchanged_entries_the_driver_subresource_is_not_checked() {
    let server = server(&[]).await;
    server.set_minor_version(35);
    server.insert_claim(claim(None));
    let agent = server.client_as("agent").await.unwrap();
    write_status(agent.clone(), "can0").await.unwrap();

    // 1.36 with the same entry applied again: no driver's entries change, nothing to check.
    server.set_minor_version(36);
    write_status(agent.clone(), "can0").await.unwrap();
    let (code, _, _) = api_error(write_status(agent, "can1").await.unwrap_err());
    assert_eq!(code, 422, "a changed entry is checked");
}

#[tokio::test]
async fn without_rbac_every_token_is_served() {
    let server = ApiServer::start().await.unwrap();
    server.set_minor_version(36);
    server.insert_node(serde_json::from_value(json!({"metadata": {"name": "node-b"}})).unwrap());
    server.insert_claim(claim(None));
    let client = server.client_as("anyone").await.unwrap();
    Api::<Node>::all(client.clone())
        .get("node-b")
        .await
        .unwrap();
    write_status(client, "can0").await.unwrap();
}

#[test]
fn documents_that_are_not_rbac_objects_are_skipped_and_bad_ones_named() {
    let policy = policy(&[]);
    assert_eq!(
        (
            policy.cluster_roles.len(),
            policy.roles.len(),
            policy.cluster_role_bindings.len(),
            policy.role_bindings.len()
        ),
        (1, 1, 1, 1)
    );
    let error = RbacPolicy::from_yaml("kind: Role\nrules: 3\n").unwrap_err();
    assert!(error.to_string().starts_with("RBAC document 0:"), "{error}");
}
