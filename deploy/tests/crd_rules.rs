//! The CanBus CRD's CEL rules (`x-kubernetes-validations`), evaluated with a CEL interpreter on
//! CanBus objects as the API server would at admission: a bus whose name could not be published
//! as the `bus` attribute of its devices is refused, with a message naming the limit.
//!
//! The interpreter is cel-rust, not the API server's cel-go (see `admission.rs`); the rules use
//! only functions both implement.

// Test helpers outside #[test] functions panic on bad input by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cel::{Context, Program, Value as Cel};
use common::{repo_root, to_cel};
use serde_json::{Value, json};

/// The rules on the root of the served version's schema: (rule, message).
fn root_rules() -> Vec<(String, String)> {
    let path = repo_root().join("deploy/helm/can-dra/crds/canbus.yaml");
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).expect("the CRD is YAML");
    let crd: Value = serde_json::to_value(yaml).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
        .as_array()
        .expect("the root schema has CEL rules")
        .iter()
        .map(|rule| {
            (
                rule["rule"].as_str().unwrap().to_owned(),
                rule["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The messages of the root rules `bus` fails.
fn denials(bus: &Value) -> Vec<String> {
    let mut context = Context::default();
    context.add_variable_from_value("self", to_cel(bus));
    root_rules()
        .into_iter()
        .filter_map(|(rule, message)| {
            let program = Program::compile(&rule).unwrap_or_else(|e| panic!("{rule}: {e}"));
            match program.execute(&context) {
                Ok(Cel::Bool(true)) => None,
                Ok(Cel::Bool(false)) => Some(message),
                other => Some(format!("{message} (evaluation: {other:?})")),
            }
        })
        .collect()
}

fn bus(name: &str) -> Value {
    json!({
        "apiVersion": "can.dra.dev/v1alpha1",
        "kind": "CanBus",
        "metadata": {"name": name},
        "spec": {"bitrate": "500k"},
    })
}

/// A DNS-subdomain name (labels of at most 63 bytes) of exactly `len` bytes.
fn name_of(len: usize) -> String {
    if len <= 33 {
        "a".repeat(len)
    } else {
        format!("{}.{}", "a".repeat(32), "b".repeat(len - 33))
    }
}

#[test]
fn names_of_up_to_64_bytes_are_admitted() {
    for len in [1, 63, 64] {
        let name = name_of(len);
        assert_eq!(name.len(), len);
        assert_eq!(denials(&bus(&name)), Vec::<String>::new(), "{name}");
    }
}

#[test]
fn a_65_byte_name_is_refused_naming_the_limit() {
    let name = name_of(65);
    assert_eq!(name.len(), 65);
    let denied = denials(&bus(&name));
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(
        denied[0].contains("at most 64 bytes") && denied[0].contains("`bus` attribute"),
        "the message names the limit and why: {}",
        denied[0]
    );
}
