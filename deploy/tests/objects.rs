//! Every YAML file of the deploy and demo trees parses, and every Kubernetes object in them (and
//! in the chart's renderings) is a valid object of its k8s-openapi type, with no field the type
//! does not know: a misspelt field would otherwise be dropped silently by the API server.

// Test helpers outside #[test] functions panic on bad input by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use can_dra_deploy::Document;
use common::check_object;

#[test]
fn every_yaml_file_parses() {
    let root = common::repo_root();
    let files: Vec<_> = common::yaml_files(&root.join("deploy"))
        .into_iter()
        .chain(common::yaml_files(&root.join("demo")))
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
    assert!(docs.len() >= 15, "only {} demo objects", docs.len());
    for doc in &docs {
        check_object(doc);
    }
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
fn a_canbus_the_controller_refuses_is_caught() {
    // CanBus objects get the controller's checks too: a data bitrate on a classic bus is refused.
    let doc = Document {
        source: "inline".into(),
        text: "apiVersion: can.dra.dev/v1alpha1\nkind: CanBus\nmetadata:\n  name: b\nspec:\n  \
               bitrate: 500k\n  dataBitrate: 2M\n"
            .into(),
    };
    let result = std::panic::catch_unwind(|| check_object(&doc));
    let message = *result.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("spec.dataBitrate"), "{message}");
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
