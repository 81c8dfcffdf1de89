//! Helpers shared by the offline checks: where the files are and how to read them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use can_dra_deploy::{Document, Release, chart_dir, render_chart, split_documents};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use can_dra_cluster::canbus::{CanBus, CanBusSpec};
use can_dra_kubelet_plugin::inventory::{CanState, Inventory, PhysicalController, VirtualBus};
use k8s_openapi::api::resource::v1::Device;

/// The driver name of the examples and the chart's defaults.
pub const DRIVER: &str = "can.dra.dev";

/// The repository root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `deploy/manifests/can-dra.yaml`.
pub fn plain_manifests_path() -> PathBuf {
    repo_root().join("deploy/manifests/can-dra.yaml")
}

/// The kind demo's directory.
pub fn kind_dir() -> PathBuf {
    repo_root().join("demo/kind")
}

/// The values file the kind demo installs the chart with.
pub fn kind_values() -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(kind_dir().join("values.yaml")).unwrap()).unwrap()
}

/// The chart rendered with its defaults.
pub fn default_render() -> Vec<Document> {
    render_chart(&chart_dir(), &Release::default(), None).unwrap()
}

/// The chart rendered as the kind demo installs it.
pub fn kind_render() -> Vec<Document> {
    let release = Release {
        name: "can-dra".into(),
        namespace: "can-dra".into(),
    };
    render_chart(&chart_dir(), &release, Some(&kind_values())).unwrap()
}

/// Every YAML file under `dir` (recursively), except Helm templates, which are not YAML until
/// rendered.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.ends_with("templates") || path.ends_with("target") {
                    continue;
                }
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a YAML file.
pub fn file_documents(path: &Path) -> Vec<Document> {
    let text = std::fs::read_to_string(path).unwrap();
    split_documents(&text)
        .into_iter()
        .map(|text| Document {
            source: path
                .strip_prefix(repo_root())
                .unwrap_or(path)
                .display()
                .to_string(),
            text,
        })
        .collect()
}

/// The kind demo's workload manifests.
pub fn demo_documents() -> Vec<Document> {
    yaml_files(&kind_dir().join("manifests"))
        .iter()
        .flat_map(|p| file_documents(p))
        .collect()
}

/// A document as JSON (the form the API server and CEL see).
pub fn to_json(doc: &Document) -> Value {
    let yaml: serde_yaml::Value = serde_yaml::from_str(&doc.text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}\n{}", doc.source, doc.text));
    serde_json::to_value(yaml)
        .unwrap_or_else(|e| panic!("{}: not JSON-compatible: {e}", doc.source))
}

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

/// Deserialises `json` into `T` (whose apiVersion and kind are `type_meta`) and checks that
/// serialising it back loses no field: a field the type does not know would be dropped by the
/// API server too.
pub fn check_typed<T: DeserializeOwned + Serialize>(
    doc: &Document,
    json: &Value,
    type_meta: (&str, &str),
) -> T {
    let (api_version, kind) = type_meta;
    assert_eq!(
        (json["apiVersion"].as_str(), json["kind"].as_str()),
        (Some(api_version), Some(kind)),
        "{}: apiVersion/kind",
        doc.source
    );
    let typed: T = serde_json::from_value(json.clone())
        .unwrap_or_else(|e| panic!("{}: not a valid {kind}: {e}", doc.source));
    let back = serde_json::to_value(&typed).unwrap();
    let mut lost = Vec::new();
    lost_fields(json, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{}: {kind} {:?} has fields its type does not know: {lost:?}",
        doc.source,
        doc.name()
    );
    typed
}

fn check_as<T: k8s_openapi::Resource + DeserializeOwned + Serialize>(doc: &Document, json: &Value) {
    check_typed::<T>(doc, json, (T::API_VERSION, T::KIND));
}

/// Checks one Kubernetes object against its type: a k8s-openapi type, or the project's `CanBus`
/// (whose spec must also pass the controller's own checks). Panics on a kind it has no type for.
pub fn check_object(doc: &Document) {
    use k8s_openapi::api::{admissionregistration, apps, core, rbac, resource};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions;
    let json = to_json(doc);
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
        "CanBus" => {
            use can_dra_cluster::canbus::{CanBus, GROUP, VERSION};
            let api_version = format!("{GROUP}/{VERSION}");
            let bus: CanBus = check_typed(doc, &json, (&api_version, "CanBus"));
            bus.spec
                .validate()
                .unwrap_or_else(|e| panic!("{}: CanBus {:?}: {e}", doc.source, doc.name()));
        }
        other => panic!("{}: no check for kind {other:?}", doc.source),
    }
}

/// The opaque parameters for `driver` in a DeviceClass, ResourceClaim or ResourceClaimTemplate.
pub fn opaque_parameters<'a>(object: &'a Value, driver: &str) -> Vec<&'a Value> {
    let configs = match object["kind"].as_str() {
        Some("DeviceClass") => &object["spec"]["config"],
        Some("ResourceClaim") => &object["spec"]["devices"]["config"],
        Some("ResourceClaimTemplate") => &object["spec"]["spec"]["devices"]["config"],
        _ => return Vec::new(),
    };
    configs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["opaque"]["driver"] == driver)
        .map(|c| &c["opaque"]["parameters"])
        .collect()
}

/// JSON to CEL as the API server's unstructured conversion does it: integers are `int`.
pub fn to_cel(value: &Value) -> cel::Value {
    use cel::Value as Cel;
    match value {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Cel::Int(i),
            None => Cel::Float(n.as_f64().unwrap()),
        },
        Value::String(s) => Cel::String(s.clone().into()),
        Value::Array(items) => Cel::List(items.iter().map(to_cel).collect::<Vec<_>>().into()),
        Value::Object(map) => Cel::from(
            map.iter()
                .map(|(k, v)| (k.clone(), to_cel(v)))
                .collect::<std::collections::HashMap<String, Cel>>(),
        ),
    }
}

/// Where a sample device comes from (the words of the README's "On" column): a physical
/// controller's slot or a node-local virtual bus's slot in a node's pool, or a CanBus slot.
pub const PHYSICAL: &str = "physical";
/// See [`PHYSICAL`].
pub const VIRTUAL: &str = "virtual";
/// See [`PHYSICAL`].
pub const CANBUS: &str = "CanBus";

fn rate(text: &str) -> can_dra_api::Bitrate {
    text.parse().unwrap()
}

/// Devices of every kind the driver publishes, with every optional attribute both present and
/// absent: an FD controller with rates and a classic one without, FD and classic node-local
/// buses, FD and classic CanBuses.
pub fn sample_devices() -> Vec<(&'static str, Device)> {
    let controller = |interface: &str, fd: bool, bitrate: Option<&str>| PhysicalController {
        interface: interface.into(),
        controller: if fd { "gs_usb" } else { "unknown" }.into(),
        bitrate: bitrate.map(rate),
        data_bitrate: fd.then(|| rate("2M")),
        fd,
        state: if fd {
            Some(CanState::ErrorActive)
        } else {
            None
        },
        slots: 2,
    };
    let physical = Inventory {
        physical: vec![
            controller("can0", true, Some("500k")),
            controller("vcan0", false, None),
        ],
        virtual_buses: Vec::new(),
    };
    let node_bus = |name: &str, fd: bool| VirtualBus {
        name: name.into(),
        bitrate: rate("125k"),
        fd,
        data_bitrate: fd.then(|| rate("1M")),
        slots: 2,
    };
    let virtual_buses = Inventory {
        physical: Vec::new(),
        virtual_buses: vec![node_bus("body", false), node_bus("chassis", true)],
    };
    let canbus = |name: &str, fd: bool| {
        let mut spec = CanBusSpec::new("500k");
        spec.fd = fd;
        spec.data_bitrate = fd.then(|| "5M".to_owned());
        spec.max_members = 2;
        can_dra_controller::bus_pool::member_devices(&CanBus::new(name, spec)).unwrap()
    };
    let mut out = Vec::new();
    out.extend(
        physical
            .devices()
            .unwrap()
            .into_iter()
            .map(|d| (PHYSICAL, d)),
    );
    out.extend(
        virtual_buses
            .devices()
            .unwrap()
            .into_iter()
            .map(|d| (VIRTUAL, d)),
    );
    out.extend(
        canbus("powertrain", true)
            .into_iter()
            .chain(canbus("diag", false))
            .map(|d| (CANBUS, d)),
    );
    out
}

/// The `device` variable of a DRA CEL selector for one device of this driver.
fn cel_device(device: &Device) -> cel::Value {
    let attributes: serde_json::Map<String, Value> = device
        .attributes
        .iter()
        .flatten()
        .map(|(name, a)| {
            let value = serde_json::to_value(a).unwrap();
            let inner = value.as_object().unwrap().values().next().unwrap().clone();
            (name.clone(), inner)
        })
        .collect();
    to_cel(&json!({
        "driver": DRIVER,
        "attributes": {DRIVER: attributes},
        "capacity": {DRIVER: {}},
        "allowMultipleAllocations": false,
    }))
}

/// Evaluates a DRA device selector on `device` of driver [`DRIVER`]: its boolean result, or why
/// it failed to compile or evaluate.
pub fn select(expression: &str, device: &Device) -> Result<bool, String> {
    let program = cel::Program::compile(expression).map_err(|e| e.to_string())?;
    let mut context = cel::Context::default();
    context.add_variable_from_value("device", cel_device(device));
    match program.execute(&context) {
        Ok(cel::Value::Bool(selected)) => Ok(selected),
        other => Err(format!("{other:?}")),
    }
}
