//! The ValidatingAdmissionPolicies, evaluated with a CEL interpreter on claims and templates:
//! they accept every config the api crate accepts (in the demos and in a corpus of valid ones)
//! and reject, with a message naming the field, configs the api crate rejects.
//!
//! The interpreter is cel-rust, not the API server's cel-go: the inputs are converted the way the
//! API server converts objects (JSON integers become `int`), and the corpus avoids `µs`, which
//! cel-rust's `duration()` does not parse.

// Test helpers outside #[test] functions panic on bad input by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use can_dra_api::{InterfaceName, MemberConfig};
use cel::{Context, Program, Value as Cel};
use common::to_cel;
use serde_json::{Value, json};

/// One policy: its variables and validations, compiled.
struct Policy {
    variables: Vec<(String, Program)>,
    validations: Vec<(String, Program)>,
}

impl Policy {
    fn load(resource: &str) -> Policy {
        let docs = common::default_render();
        let policy = docs
            .iter()
            .map(common::to_json)
            .find(|o| {
                o["kind"] == "ValidatingAdmissionPolicy"
                    && o["spec"]["matchConstraints"]["resourceRules"][0]["resources"][0] == resource
            })
            .unwrap_or_else(|| panic!("no policy for {resource}"));
        let compile = |e: &Value| {
            let text = e["expression"].as_str().unwrap();
            Program::compile(text).unwrap_or_else(|err| panic!("{text}: {err}"))
        };
        Policy {
            variables: policy["spec"]["variables"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| (v["name"].as_str().unwrap().to_owned(), compile(v)))
                .collect(),
            validations: policy["spec"]["validations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| (v["message"].as_str().unwrap().to_owned(), compile(v)))
                .collect(),
        }
    }

    /// The messages of the validations that fail (false or an evaluation error) for `object`.
    fn denials(&self, object: &Value) -> Vec<String> {
        let mut variables: HashMap<String, Cel> = HashMap::new();
        let mut context = Context::default();
        context.add_variable_from_value("object", to_cel(object));
        for (name, program) in &self.variables {
            context.add_variable_from_value("variables", Cel::from(variables.clone()));
            let value = program
                .execute(&context)
                .unwrap_or_else(|e| panic!("variable {name}: {e:?}"));
            variables.insert(name.clone(), value);
        }
        context.add_variable_from_value("variables", Cel::from(variables));
        self.validations
            .iter()
            .filter_map(|(message, program)| match program.execute(&context) {
                Ok(Cel::Bool(true)) => None,
                Ok(Cel::Bool(false)) => Some(message.clone()),
                other => Some(format!("{message} (evaluation: {other:?})")),
            })
            .collect()
    }
}

fn claim_with(parameters: Value) -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "c", "namespace": "n"},
        "spec": {"devices": {
            "requests": [{"name": "bus", "exactly": {"deviceClassName": "can.dra.dev"}}],
            "config": [{"requests": ["bus"], "opaque": {"driver": "can.dra.dev", "parameters": parameters}}]
        }}
    })
}

fn member(fields: Value) -> Value {
    let mut config = json!({"apiVersion": "can.dra.dev/v1alpha1", "kind": "MemberConfig"});
    config
        .as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    config
}

#[test]
fn demo_templates_are_admitted() {
    let policy = Policy::load("resourceclaimtemplates");
    let mut checked = 0;
    for doc in common::demo_documents() {
        let object = common::to_json(&doc);
        if object["kind"] == "ResourceClaimTemplate" {
            let denials = policy.denials(&object);
            assert!(denials.is_empty(), "{:?}: {denials:?}", doc.name());
            checked += 1;
        }
    }
    assert!(checked >= 4);
}

#[test]
fn valid_configs_are_admitted() {
    let policy = Policy::load("resourceclaims");
    let corpus = [
        json!({}),
        json!({"interfaceName": "ecu0", "access": "readWrite", "frameFormat": "fd"}),
        json!({"interfaceName": "a-b_c.d@e", "access": "listenOnly"}),
        json!({"receiveFilters": [
            {"id": "0x100", "mask": "0x700"}, {"id": 2047}, {"id": "2047", "mask": 0},
            {"id": "0x18DAF110", "extended": true}, {"id": 536870911, "extended": true, "invert": true},
            {"id": "0X7ff"}, {"id": "0x0000000007FF"}, {"id": "000123"}
        ]}),
        json!({"transmitAllow": [{"id": "0x7E0"}]}),
        json!({"shaping": {
            "rx": {"bitrate": "500k", "dataBitrate": "2M", "delay": "10ms", "jitter": "1ms", "loss": "0.5%"},
            "tx": {"bitrate": 125000, "duplicate": "100%", "loss": "0%", "delay": "1.5ms"}
        }}),
        json!({"shaping": {"rx": {"bitrate": "125kbps", "delay": "10s", "jitter": "250us", "loss": "12.3400%"}}}),
        json!({"shaping": {"rx": {"bitrate": "1Mbit/s", "delay": "0", "loss": "0.0001%"}}}),
        json!({"shaping": {"tx": {"delay": "100ns", "jitter": "100ns", "duplicate": "005%"}}}),
        json!({"shaping": {"tx": {"delay": "10s", "jitter": "2.147483647s"}}}),
        json!({"interfaceName": "vxcan0"}),
        json!({"interfaceName": "cdr0"}),
        json!({"receiveFilters": (0..64).map(|i| json!({"id": i})).collect::<Vec<_>>()}),
    ];
    for fields in corpus {
        let parameters = member(fields);
        MemberConfig::from_json_value(&parameters)
            .unwrap_or_else(|e| panic!("the corpus holds an invalid config {parameters}: {e}"));
        let denials = policy.denials(&claim_with(parameters.clone()));
        assert!(denials.is_empty(), "{parameters}: {denials:?}");
    }
}

#[test]
fn invalid_configs_are_denied_naming_the_field() {
    let policy = Policy::load("resourceclaims");
    let too_many: Vec<Value> = (0..65).map(|i| json!({"id": i})).collect();
    let corpus = [
        (
            json!({"apiVersion": "can.dra.dev/v1", "kind": "MemberConfig"}),
            "apiVersion",
        ),
        (json!({"apiVersion": "can.dra.dev/v1alpha1"}), "kind"),
        (json!({"kind": "MemberConfig"}), "apiVersion"),
        (member(json!({"interfaceNme": "can0"})), "unknown field"),
        (member(json!({"interfaceName": ""})), "interfaceName"),
        (
            member(json!({"interfaceName": "a-very-long-name"})),
            "interfaceName",
        ),
        (member(json!({"interfaceName": "eth0/1"})), "interfaceName"),
        (member(json!({"interfaceName": "can 0"})), "interfaceName"),
        (member(json!({"interfaceName": "can%d"})), "interfaceName"),
        (member(json!({"interfaceName": ".."})), "interfaceName"),
        (member(json!({"interfaceName": "lo"})), "interfaceName"),
        (member(json!({"interfaceName": "cän0"})), "interfaceName"),
        (
            member(json!({"interfaceName": "cdra0123456789a"})),
            "reserves for its own links",
        ),
        (
            member(json!({"interfaceName": "vxtt-body"})),
            "reserves for its own links",
        ),
        (member(json!({"access": "readOnly"})), "access"),
        (member(json!({"frameFormat": "FD"})), "frameFormat"),
        (
            member(json!({"receiveFilters": [{"id": "0x800"}]})),
            "receiveFilters[].id",
        ),
        (
            member(json!({"receiveFilters": [{"id": 2048}]})),
            "receiveFilters[].id",
        ),
        (
            member(json!({"receiveFilters": [{"id": "2048"}]})),
            "receiveFilters[].id",
        ),
        (
            member(json!({"receiveFilters": [{"id": "0x20000000", "extended": true}]})),
            "receiveFilters[].id",
        ),
        (
            member(json!({"receiveFilters": [{"id": -1}]})),
            "receiveFilters[].id",
        ),
        (
            member(json!({"receiveFilters": [{"id": "0x1G"}]})),
            "receiveFilters[].id",
        ),
        (
            member(json!({"receiveFilters": [{"id": 1, "mask": "0xFFF"}]})),
            "receiveFilters[].mask",
        ),
        (
            member(json!({"receiveFilters": [{"id": 1, "inverted": true}]})),
            "receiveFilters entry",
        ),
        (
            member(json!({"receiveFilters": [{"mask": 1}]})),
            "receiveFilters entry",
        ),
        (
            member(json!({"receiveFilters": [{"id": 1, "extended": "yes"}]})),
            "receiveFilters entry",
        ),
        (
            member(json!({"receiveFilters": too_many})),
            "receiveFilters must be a list of at most 64",
        ),
        (
            member(json!({"transmitAllow": [{"id": "0x800"}]})),
            "transmitAllow[].id",
        ),
        (
            member(json!({"transmitAllow": []})),
            "transmitAllow must not be empty",
        ),
        (
            member(json!({"transmitAllow": [{"id": 1}], "access": "listenOnly"})),
            "listenOnly",
        ),
        (
            member(json!({"shaping": {"up": {}}})),
            "shaping may hold only",
        ),
        (
            member(json!({"shaping": {"rx": {"lossy": "1%"}}})),
            "shaping.rx and shaping.tx",
        ),
        (member(json!({"shaping": {"rx": {"loss": "120%"}}})), "loss"),
        (
            member(json!({"shaping": {"rx": {"loss": "100.5%"}}})),
            "loss",
        ),
        (member(json!({"shaping": {"rx": {"loss": "5"}}})), "loss"),
        (member(json!({"shaping": {"rx": {"loss": 5}}})), "loss"),
        (
            member(json!({"shaping": {"tx": {"duplicate": "0.00001%"}}})),
            "duplicate",
        ),
        (member(json!({"shaping": {"rx": {"delay": "10"}}})), "delay"),
        (member(json!({"shaping": {"rx": {"delay": "1h"}}})), "delay"),
        (
            member(json!({"shaping": {"rx": {"delay": "11s"}}})),
            "delay must be at most 10s",
        ),
        (
            member(json!({"shaping": {"rx": {"jitter": "1ms"}}})),
            "jitter requires delay",
        ),
        (
            member(json!({"shaping": {"rx": {"delay": "1ms", "jitter": "2ms"}}})),
            "jitter",
        ),
        (
            member(json!({"shaping": {"tx": {"delay": "10s", "jitter": "3s"}}})),
            "jitter must be at most 2.147483647s",
        ),
        (
            member(json!({"shaping": {"tx": {"delay": "10s", "jitter": "2147483648ns"}}})),
            "jitter must be at most 2.147483647s",
        ),
        (
            member(json!({"shaping": {"rx": {"bitrate": "fast"}}})),
            "bitrate",
        ),
        (
            member(json!({"shaping": {"rx": {"bitrate": "500mbit"}}})),
            "bitrate",
        ),
        (
            member(json!({"shaping": {"rx": {"bitrate": 2000000}}})),
            "bitrate must be from 1 kbit/s",
        ),
        (
            member(json!({"shaping": {"rx": {"dataBitrate": "2M"}}})),
            "dataBitrate requires bitrate",
        ),
        (
            member(
                json!({"frameFormat": "classic", "shaping": {"rx": {"bitrate": "500k", "dataBitrate": "2M"}}}),
            ),
            "frameFormat: classic",
        ),
        (json!("can0"), "must be an object"),
    ];
    for (parameters, expected) in corpus {
        assert!(
            MemberConfig::from_json_value(&parameters).is_err(),
            "the api crate accepts {parameters}, so the policy must too"
        );
        let denials = policy.denials(&claim_with(parameters.clone()));
        assert!(
            denials.iter().any(|d| d.contains(expected)),
            "{parameters}: expected a denial about {expected:?}, got {denials:?}"
        );
    }
}

#[test]
fn other_drivers_and_claims_without_config_are_not_checked() {
    let policy = Policy::load("resourceclaims");
    let mut other = claim_with(json!({"anything": true}));
    other["spec"]["devices"]["config"][0]["opaque"]["driver"] = json!("gpu.example.com");
    assert!(policy.denials(&other).is_empty());
    let mut plain = claim_with(json!({}));
    plain["spec"]["devices"]
        .as_object_mut()
        .unwrap()
        .remove("config");
    assert!(policy.denials(&plain).is_empty());
    let bare = json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "spec": {}});
    assert!(policy.denials(&bare).is_empty());
}

#[test]
fn templates_are_checked_like_claims() {
    let policy = Policy::load("resourceclaimtemplates");
    let claim = claim_with(member(json!({"access": "sometimes"})));
    let template = json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
        "spec": {"spec": claim["spec"]}
    });
    let denials = policy.denials(&template);
    assert!(denials.iter().any(|d| d.contains("access")), "{denials:?}");
}

/// The chart's admission policy and the api crate's [`InterfaceName`] are two copies of one rule
/// set: every name gets the same verdict from both, so a name the apiserver admits never fails at
/// prepare, and a name the driver would take is refused at admission.
#[test]
fn interface_names_get_the_same_verdict_from_the_chart_and_the_api() {
    let policy = Policy::load("resourceclaims");
    let mut names: Vec<String> = [
        "can0",
        "vxcan0",
        "cdr0",
        "a-b_c.d@e",
        "~!",
        "a23456789012345",
        "a234567890123456",
        "",
        ".",
        "..",
        "...",
        "lo",
        "lo0",
        "LO",
        "eth0/1",
        "/",
        "can:0",
        "can%d",
        "%",
        "can 0",
        "can\t0",
        "can\n",
        "can\u{7f}",
        "can\u{0}",
        "cän0",
        "ääääääää",
        "CDRA0",
        "cdr",
        "vxtm",
        "vxtt",
        "vxtmx",
        "xcdra",
    ]
    .map(String::from)
    .to_vec();
    for prefix in can_dra_api::RESERVED_INTERFACE_PREFIXES {
        names.push((*prefix).to_owned());
        names.push(format!("{prefix}1"));
        names.push(format!("{prefix}{}", "x".repeat(15 - prefix.len())));
    }
    let mut admitted = 0;
    for name in &names {
        let api = name.parse::<InterfaceName>();
        let chart: Vec<String> = policy
            .denials(&claim_with(member(json!({ "interfaceName": name }))))
            .into_iter()
            .filter(|denial| denial.contains("interfaceName"))
            .collect();
        assert_eq!(
            api.is_ok(),
            chart.is_empty(),
            "{name:?}: the api says {api:?}, the chart says {chart:?}"
        );
        admitted += usize::from(api.is_ok());
    }
    // Both verdicts occur, so the comparison can tell the two rule sets apart.
    assert!(
        admitted > 0 && admitted < names.len(),
        "{admitted} of {}",
        names.len()
    );
}
