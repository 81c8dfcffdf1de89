//! The RBAC the chart grants matches the API calls each binary makes: every call is allowed, and
//! nothing beyond them is granted.

// Test helpers outside #[test] functions panic on bad input by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use serde_json::Value;

/// (API group, resource or resource/subresource, verb, resource name if restricted).
type Call = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
);

/// What `can-dra-kubelet-plugin` calls.
const KUBELET_PLUGIN: &[Call] = &[
    // Prepare: fetch each claim to check its UID and allocation and read its opaque config.
    ("resource.k8s.io", "resourceclaims", "get", None),
    // Keep a cache of the claims allocated on this node.
    ("resource.k8s.io", "resourceclaims", "list", None),
    ("resource.k8s.io", "resourceclaims", "watch", None),
    // Claim status.devices: conditions and networkData.interfaceName, by server-side apply.
    ("resource.k8s.io", "resourceclaims/status", "patch", None),
    // Granular status authorization (1.36+) on its own driver name: arbitrary-node, because the
    // allocation of a CanBus member is not bound to the daemon's node.
    (
        "resource.k8s.io",
        "resourceclaims/driver",
        "arbitrary-node:patch",
        Some("can.dra.dev"),
    ),
    // The Node owns the node's ResourceSlices (its UID goes in ownerReferences).
    ("", "nodes", "get", None),
    // Cross-node buses: members of a CanBus pool are checked against their CanBus, and the
    // tunnels follow its status (tunnel port, the other nodes' endpoints).
    ("can.dra.dev", "canbuses", "get", None),
    ("can.dra.dev", "canbuses", "list", None),
    ("can.dra.dev", "canbuses", "watch", None),
    // Publishing the node's pool.
    ("resource.k8s.io", "resourceslices", "get", None),
    ("resource.k8s.io", "resourceslices", "list", None),
    ("resource.k8s.io", "resourceslices", "watch", None),
    ("resource.k8s.io", "resourceslices", "create", None),
    ("resource.k8s.io", "resourceslices", "update", None),
    ("resource.k8s.io", "resourceslices", "patch", None),
    ("resource.k8s.io", "resourceslices", "delete", None),
];

/// What `can-dra-controller` calls.
/// What `can-dra-controller` calls; its tests against the API server double check that every
/// request it makes is granted by the rendered manifests.
const CONTROLLER: &[Call] = &[
    ("can.dra.dev", "canbuses", "list", None),
    ("can.dra.dev", "canbuses", "watch", None),
    ("can.dra.dev", "canbuses/status", "patch", None),
    ("resource.k8s.io", "resourceslices", "list", None),
    ("resource.k8s.io", "resourceslices", "watch", None),
    ("resource.k8s.io", "resourceslices", "create", None),
    ("resource.k8s.io", "resourceslices", "update", None),
    ("resource.k8s.io", "resourceslices", "delete", None),
    ("resource.k8s.io", "resourceclaims", "list", None),
    ("resource.k8s.io", "resourceclaims", "watch", None),
    ("", "pods", "list", None),
    ("", "pods", "watch", None),
    ("", "nodes", "get", None),
    ("", "nodes", "list", None),
    ("", "nodes", "watch", None),
    ("coordination.k8s.io", "leases", "get", None),
    ("coordination.k8s.io", "leases", "create", None),
    ("coordination.k8s.io", "leases", "update", None),
];

/// Every (group, resource, verb, resourceName) the roles bound to `account` grant.
fn granted(objects: &[Value], account: &str) -> BTreeSet<(String, String, String, Option<String>)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    let mut out = BTreeSet::new();
    for binding in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
    {
        let bound = binding["subjects"].as_array().unwrap().iter().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == account && s["namespace"] == "can-dra"
        });
        if !bound {
            continue;
        }
        let role_ref = &binding["roleRef"];
        let role = objects
            .iter()
            .find(|o| o["kind"] == role_ref["kind"] && o["metadata"]["name"] == role_ref["name"])
            .unwrap_or_else(|| panic!("binding to a missing role {role_ref}"));
        for rule in role["rules"].as_array().unwrap() {
            let names = strings(&rule["resourceNames"]);
            let names: Vec<Option<String>> = if names.is_empty() {
                vec![None]
            } else {
                names.into_iter().map(Some).collect()
            };
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        for name in &names {
                            out.insert((
                                group.clone(),
                                resource.clone(),
                                verb.clone(),
                                name.clone(),
                            ));
                        }
                    }
                }
            }
        }
    }
    out
}

fn rendered_objects() -> Vec<Value> {
    common::file_documents(&common::plain_manifests_path())
        .iter()
        .map(common::to_json)
        .collect()
}

/// The service account a workload of `kind` runs as.
fn account_of(objects: &[Value], kind: &str) -> String {
    let workload = objects.iter().find(|o| o["kind"] == kind).unwrap();
    workload["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn assert_exact(objects: &[Value], account: &str, calls: &[Call]) {
    let granted = granted(objects, account);
    assert!(
        granted
            .iter()
            .all(|(g, r, v, _)| !g.contains('*') && !r.contains('*') && !v.contains('*')),
        "{account}: wildcards in {granted:?}"
    );
    let needed: BTreeSet<_> = calls
        .iter()
        .map(|(g, r, v, n)| {
            (
                g.to_string(),
                r.to_string(),
                v.to_string(),
                n.map(str::to_owned),
            )
        })
        .collect();
    let missing: Vec<_> = needed.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&needed).collect();
    assert!(missing.is_empty(), "{account} may not: {missing:?}");
    assert!(
        extra.is_empty(),
        "{account} may also, without need: {extra:?}"
    );
}

#[test]
fn kubelet_plugin_may_make_exactly_its_calls() {
    let objects = rendered_objects();
    let account = account_of(&objects, "DaemonSet");
    assert_exact(&objects, &account, KUBELET_PLUGIN);
}

#[test]
fn controller_may_make_exactly_its_calls() {
    let objects = rendered_objects();
    let account = account_of(&objects, "Deployment");
    assert_exact(&objects, &account, CONTROLLER);
}

#[test]
fn leader_election_is_limited_to_the_release_namespace() {
    let objects = rendered_objects();
    for role in objects.iter().filter(|o| o["kind"] == "ClusterRole") {
        let text = role["rules"].to_string();
        assert!(
            !text.contains("leases"),
            "{}: cluster-wide leases",
            role["metadata"]["name"]
        );
    }
    let role = objects
        .iter()
        .find(|o| o["kind"] == "Role" && o["rules"].to_string().contains("leases"))
        .unwrap();
    assert_eq!(role["metadata"]["namespace"], "can-dra");
}

#[test]
fn the_check_sees_a_missing_grant() {
    let mut objects = rendered_objects();
    let role = objects
        .iter_mut()
        .find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == "can-dra-kubelet-plugin")
        .unwrap();
    role["rules"]
        .as_array_mut()
        .unwrap()
        .retain(|r| r["resources"][0] != "nodes");
    let account = account_of(&objects, "DaemonSet");
    let result = std::panic::catch_unwind(|| assert_exact(&objects, &account, KUBELET_PLUGIN));
    let message = *result.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("\"nodes\", \"get\""), "{message}");
}
