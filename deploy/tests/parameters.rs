//! The documents the driver itself reads: every opaque `parameters` object for can.dra.dev in the
//! demos and the chart is a valid `MemberConfig`, and every NodeConfig is a valid `NodeConfig`
//! that publishes what the demos select.

// Test helpers outside #[test] functions panic on bad input by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use can_dra_api::{MemberConfig, NodeConfig};
use common::opaque_parameters;
use serde_json::Value;

#[test]
fn demo_claim_parameters_are_valid_member_configs() {
    let mut checked = 0;
    for doc in common::demo_documents()
        .iter()
        .chain(&common::default_render())
    {
        let object = common::to_json(doc);
        for parameters in opaque_parameters(&object, "can.dra.dev") {
            let config = MemberConfig::from_json_value(parameters)
                .unwrap_or_else(|e| panic!("{} {:?}: {e}", doc.source, doc.name()));
            config
                .resolve(0)
                .unwrap_or_else(|e| panic!("{} {:?}: {e}", doc.source, doc.name()));
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} parameter objects found");
}

#[test]
fn the_check_rejects_a_bad_demo_parameter() {
    let object: Value = serde_json::json!({
        "kind": "ResourceClaimTemplate",
        "spec": {"spec": {"devices": {"config": [{"opaque": {"driver": "can.dra.dev", "parameters": {
            "apiVersion": "can.dra.dev/v1alpha1", "kind": "MemberConfig",
            "shaping": {"rx": {"loss": "25"}}
        }}}]}}}
    });
    let parameters = opaque_parameters(&object, "can.dra.dev");
    let err = MemberConfig::from_json_value(parameters[0]).unwrap_err();
    assert_eq!(err.field(), "shaping.rx.loss");
}

/// The NodeConfig documents: in the chart's values, the kind values, and every rendered ConfigMap.
fn node_configs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let defaults: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(can_dra_deploy::chart_dir().join("values.yaml")).unwrap(),
    )
    .unwrap();
    for (source, values) in [
        ("values.yaml", defaults),
        ("demo/kind/values.yaml", common::kind_values()),
    ] {
        let text = values["kubeletPlugin"]["nodeConfig"]
            .as_str()
            .unwrap()
            .to_owned();
        out.push((source.to_owned(), text));
    }
    let plain = common::file_documents(&common::plain_manifests_path());
    for doc in plain.iter().chain(&common::kind_render()) {
        let object = common::to_json(doc);
        if object["kind"] == "ConfigMap" {
            let text = object["data"]["node-config.yaml"]
                .as_str()
                .unwrap()
                .to_owned();
            out.push((doc.source.clone(), text));
        }
    }
    out
}

#[test]
fn node_configs_are_valid() {
    let configs = node_configs();
    assert_eq!(configs.len(), 4, "{configs:?}");
    for (source, text) in configs {
        NodeConfig::from_yaml_str(&text).unwrap_or_else(|e| panic!("{source}: {e}\n{text}"));
    }
}

#[test]
fn the_kind_node_config_publishes_what_the_demos_select() {
    let values = common::kind_values();
    let config =
        NodeConfig::from_yaml_str(values["kubeletPlugin"]["nodeConfig"].as_str().unwrap()).unwrap();
    // Demo (c) selects interface vcan0, which run.sh creates on the worker.
    assert!(config.publishes_physical("vcan0"));
    // Demos (a), (b), (d) select bus "demo" and run up to 4 members at once.
    let bus = config
        .virtual_buses
        .iter()
        .find(|b| b.name == "demo")
        .unwrap();
    assert!(bus.slots >= 4);
    // Demo (c) runs 3 members on vcan0.
    assert!(config.physical.slots >= 3);
    // The selectors in the demos name exactly these.
    let selectors: String = common::demo_documents()
        .iter()
        .map(|d| d.text.clone())
        .filter(|t| t.contains("expression:"))
        .collect();
    assert!(selectors.contains(r#"device.attributes["can.dra.dev"].bus == "demo""#));
    assert!(selectors.contains(r#"device.attributes["can.dra.dev"].interface == "vcan0""#));
}
