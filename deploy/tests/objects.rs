//! Every YAML file of the deploy and demo trees parses, and every Kubernetes object in them (and
//! in the chart's renderings) is a valid object of its k8s-openapi type, with no field the type
//! does not know: a misspelt field would otherwise be dropped silently by the API server.

// Test helpers outside #[test] functions panic on bad input by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use k8s_openapi::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use can_dra_deploy::Document;

/// Paths (`a.b[].c`) present in `input` but missing from `output`.
fn lost_fields(input: &Value, output: &Value, path: &str, lost: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => lost_fields(value, other, &here, lost),
                    // An explicit null or empty value is the same as an absent one.
                    None if value.is_null() => {}
                    None => lost.push(here),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                lost.push(format!("{path}[] (length {} became {})", a.len(), b.len()));
            }
            for (x, y) in a.iter().zip(b) {
                lost_fields(x, y, &format!("{path}[]"), lost);
            }
        }
        _ => {}
    }
}

fn check_as<T: Resource + DeserializeOwned + Serialize>(doc: &Document, json: &Value) {
    assert_eq!(
        (json["apiVersion"].as_str(), json["kind"].as_str()),
        (Some(T::API_VERSION), Some(T::KIND)),
        "{}: apiVersion/kind",
        doc.source
    );
    let typed: T = serde_json::from_value(json.clone())
        .unwrap_or_else(|e| panic!("{}: not a valid {}: {e}", doc.source, T::KIND));
    let back = serde_json::to_value(&typed).unwrap();
    let mut lost = Vec::new();
    lost_fields(json, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{}: {} {:?} has fields its type does not know: {lost:?}",
        doc.source,
        T::KIND,
        doc.name()
    );
}

/// Checks one object; returns false for kinds that have no type to check against yet.
fn check_object(doc: &Document) -> bool {
    use k8s_openapi::api::{admissionregistration, apps, core, rbac, resource};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions;
    let json = common::to_json(doc);
    let kind = json["kind"].as_str().unwrap_or_default().to_owned();
    match kind.as_str() {
        "Namespace" => check_as::<core::v1::Namespace>(doc, &json),
        "ServiceAccount" => check_as::<core::v1::ServiceAccount>(doc, &json),
        "ConfigMap" => check_as::<core::v1::ConfigMap>(doc, &json),
        "Pod" => check_as::<core::v1::Pod>(doc, &json),
        "DaemonSet" => check_as::<apps::v1::DaemonSet>(doc, &json),
        "Deployment" => check_as::<apps::v1::Deployment>(doc, &json),
        "ClusterRole" => check_as::<rbac::v1::ClusterRole>(doc, &json),
        "ClusterRoleBinding" => check_as::<rbac::v1::ClusterRoleBinding>(doc, &json),
        "Role" => check_as::<rbac::v1::Role>(doc, &json),
        "RoleBinding" => check_as::<rbac::v1::RoleBinding>(doc, &json),
        "DeviceClass" => check_as::<resource::v1::DeviceClass>(doc, &json),
        "ResourceClaim" => check_as::<resource::v1::ResourceClaim>(doc, &json),
        "ResourceClaimTemplate" => check_as::<resource::v1::ResourceClaimTemplate>(doc, &json),
        "ValidatingAdmissionPolicy" => {
            check_as::<admissionregistration::v1::ValidatingAdmissionPolicy>(doc, &json)
        }
        "ValidatingAdmissionPolicyBinding" => {
            check_as::<admissionregistration::v1::ValidatingAdmissionPolicyBinding>(doc, &json)
        }
        "CustomResourceDefinition" => {
            check_as::<apiextensions::v1::CustomResourceDefinition>(doc, &json)
        }
        // The CanBus type lives in the api crate once it exists; until then its objects are
        // only checked for being YAML.
        "CanBus" => return false,
        other => panic!("{}: no check for kind {other:?}", doc.source),
    }
    true
}

#[test]
fn every_yaml_file_parses() {
    let root = common::repo_root();
    let files: Vec<_> = common::yaml_files(&root.join("deploy"))
        .into_iter()
        .chain(common::yaml_files(&root.join("demo/kind")))
        .collect();
    assert!(files.len() >= 10, "found only {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in can_dra_deploy::split_documents(&text) {
            serde_yaml::from_str::<serde_yaml::Value>(&doc)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        }
    }
}

#[test]
fn plain_manifests_are_valid_objects() {
    let docs = common::file_documents(&common::plain_manifests_path());
    assert!(docs.len() > 10);
    for doc in &docs {
        check_object(doc);
    }
}

#[test]
fn chart_renderings_are_valid_objects() {
    for doc in common::default_render()
        .iter()
        .chain(&common::kind_render())
    {
        check_object(doc);
    }
}

#[test]
fn demo_manifests_are_valid_objects() {
    let docs = common::demo_documents();
    let checked = docs.iter().filter(|d| check_object(d)).count();
    assert!(checked >= 15, "only {checked} demo objects checked");
}

#[test]
fn a_misspelt_field_is_caught() {
    // The check itself: a DaemonSet with `hostPid` (for hostPID) must not pass.
    let doc = Document {
        source: "inline".into(),
        text:
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: x\nspec:\n  selector: {}\n  \
               template:\n    spec:\n      hostPid: true\n      containers: []\n"
                .into(),
    };
    let result = std::panic::catch_unwind(|| check_object(&doc));
    let message = *result.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains(".spec.template.spec.hostPid"), "{message}");
}

#[test]
fn demo_pods_use_only_claims_they_declare() {
    // A container that names a claim the pod does not declare is refused by the API server.
    for doc in common::demo_documents() {
        let json = common::to_json(&doc);
        if json["kind"] != "Pod" {
            continue;
        }
        let declared: Vec<&str> = json["spec"]["resourceClaims"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        for container in json["spec"]["containers"].as_array().unwrap() {
            for claim in container["resources"]["claims"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let name = claim["name"].as_str().unwrap();
                assert!(declared.contains(&name), "{}: claim {name}", doc.source);
            }
        }
    }
}
