//! The kind demo's cluster enables what the manifests need, and its script is sound.

// Test helpers outside #[test] functions panic on bad input by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use serde_json::Value;

/// A feature gate the manifests may depend on: the first minor release that has it on by
/// default (`None`: never, as of 1.37), and which objects need it. From the Kubernetes feature
/// gate tables (1.34 to 1.37).
struct GateUse {
    gate: &'static str,
    on_by_default_from: Option<u32>,
    needed_by: fn(&Value) -> bool,
}

fn claim_spec(object: &Value) -> Option<&Value> {
    match object["kind"].as_str()? {
        "ResourceClaim" => Some(&object["spec"]),
        "ResourceClaimTemplate" => Some(&object["spec"]["spec"]),
        _ => None,
    }
}

fn any_request(object: &Value, field: &str) -> bool {
    claim_spec(object).is_some_and(|spec| {
        spec["devices"]["requests"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| !r[field].is_null() || !r["exactly"][field].is_null())
    })
}

const GATES: &[GateUse] = &[
    // resource.k8s.io/v1 objects and pods with resourceClaims (GA in 1.34).
    GateUse {
        gate: "DynamicResourceAllocation",
        on_by_default_from: Some(34),
        needed_by: |o| {
            o["apiVersion"] == "resource.k8s.io/v1" || !o["spec"]["resourceClaims"].is_null()
        },
    },
    // requests[].firstAvailable.
    GateUse {
        gate: "DRAPrioritizedList",
        on_by_default_from: Some(34),
        needed_by: |o| any_request(o, "firstAvailable"),
    },
    // requests[].exactly.adminAccess.
    GateUse {
        gate: "DRAAdminAccess",
        on_by_default_from: Some(34),
        needed_by: |o| any_request(o, "adminAccess"),
    },
    // requests[].exactly.tolerations (beta, on, in 1.36).
    GateUse {
        gate: "DRADeviceTaints",
        on_by_default_from: Some(36),
        needed_by: |o| any_request(o, "tolerations"),
    },
    // requests[].exactly.capacity (beta, on, in 1.36).
    GateUse {
        gate: "DRAConsumableCapacity",
        on_by_default_from: Some(36),
        needed_by: |o| any_request(o, "capacity"),
    },
    // DeviceClass extendedResourceName (beta, on, in 1.36).
    GateUse {
        gate: "DRAExtendedResource",
        on_by_default_from: Some(36),
        needed_by: |o| o["kind"] == "DeviceClass" && !o["spec"]["extendedResourceName"].is_null(),
    },
    // The node daemon writes claim status.devices (conditions, networkData): granted by the
    // plugin's role. Beta and on from 1.33, GA in 1.37.
    GateUse {
        gate: "DRAResourceClaimDeviceStatus",
        on_by_default_from: Some(33),
        needed_by: |o| {
            o["kind"] == "ClusterRole" && o["rules"].to_string().contains("resourceclaims/status")
        },
    },
];

fn kind_config() -> Value {
    let text = std::fs::read_to_string(common::kind_dir().join("kind-config.yaml")).unwrap();
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    serde_json::to_value(yaml).unwrap()
}

/// The minor version of every node image (`kindest/node:v1.34.0` is 34).
fn node_minors(config: &Value) -> Vec<u32> {
    config["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| {
            let image = node["image"].as_str().expect("every node names its image");
            let version = image.strip_prefix("kindest/node:v1.").expect(image);
            version.split(['.', '@']).next().unwrap().parse().unwrap()
        })
        .collect()
}

/// Gates the objects need that the cluster would not have on.
fn missing_gates(objects: &[Value], config: &Value) -> Vec<String> {
    let oldest = node_minors(config).into_iter().min().unwrap();
    GATES
        .iter()
        .filter(|g| objects.iter().any(g.needed_by))
        .filter(|g| {
            let on_by_default = g.on_by_default_from.is_some_and(|m| oldest >= m);
            let enabled = config["featureGates"][g.gate] == true;
            !(on_by_default || enabled)
        })
        .map(|g| g.gate.to_owned())
        .collect()
}

fn all_objects() -> Vec<Value> {
    common::kind_render()
        .iter()
        .chain(&common::demo_documents())
        .map(common::to_json)
        .collect()
}

#[test]
fn kind_cluster_has_every_gate_the_manifests_need() {
    let missing = missing_gates(&all_objects(), &kind_config());
    assert!(missing.is_empty(), "kind-config.yaml lacks {missing:?}");
}

#[test]
fn the_gate_check_sees_a_missing_gate() {
    let mut config = kind_config();
    let claim = serde_json::json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "spec": {"devices": {"requests": [{"name": "a", "exactly": {
            "deviceClassName": "can.dra.dev", "tolerations": [{"operator": "Exists"}]}}]}}
    });
    assert_eq!(
        missing_gates(std::slice::from_ref(&claim), &config),
        ["DRADeviceTaints"]
    );
    config["featureGates"]["DRADeviceTaints"] = Value::Bool(true);
    assert!(missing_gates(&[claim], &config).is_empty());
}

#[test]
fn kind_config_sets_only_known_gates_and_a_dra_capable_image() {
    let config = kind_config();
    for (gate, value) in config["featureGates"].as_object().unwrap() {
        assert!(
            GATES.iter().any(|g| g.gate == gate),
            "unexplained gate {gate}"
        );
        assert_eq!(value, true, "{gate}");
    }
    // resource.k8s.io/v1 exists from 1.34.
    assert!(node_minors(&config).iter().all(|m| *m >= 34));
    // run.sh creates vcan0 on "<cluster>-worker", the name kind gives a single worker.
    let workers = config["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["role"] == "worker");
    assert_eq!(workers.count(), 1);
}

#[test]
fn containerd_reads_the_cdi_specs_the_daemon_writes() {
    let config = kind_config();
    let patches = config["containerdConfigPatches"].to_string();
    assert!(patches.contains("enable_cdi = true"), "{patches}");
    let chart_values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(can_dra_deploy::chart_dir().join("values.yaml")).unwrap(),
    )
    .unwrap();
    let cdi_dir = chart_values["kubeletPlugin"]["cdiDir"].as_str().unwrap();
    assert!(
        patches.contains(&format!("\\\"{cdi_dir}\\\"")),
        "{cdi_dir} not in {patches}"
    );
}

#[test]
fn run_script_is_valid_bash_and_uses_every_demo_manifest() {
    let script = common::kind_dir().join("run.sh");
    let status = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(status.success(), "bash -n run.sh");
    match Command::new("shellcheck").arg(&script).output() {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck run.sh:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => eprintln!("shellcheck is not installed; only bash -n checked run.sh"),
    }
    let text = std::fs::read_to_string(&script).unwrap();
    let manifests = common::yaml_files(&common::kind_dir().join("manifests"));
    assert!(manifests.len() >= 8);
    for manifest in &manifests {
        let name = manifest.file_name().unwrap().to_str().unwrap();
        assert!(
            text.contains(&format!("$MANIFESTS/{name}")),
            "run.sh never applies {name}"
        );
    }
    for used in text.split("$MANIFESTS/").skip(1) {
        let name: String = used.chars().take_while(|c| *c != '"').collect();
        assert!(
            common::kind_dir().join("manifests").join(&name).exists(),
            "{name}"
        );
    }
}
