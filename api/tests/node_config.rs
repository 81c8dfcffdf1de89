//! Behaviour of the kubelet plugin's `NodeConfig` file: defaults, publishing decisions and the exact
//! error for each broken rule.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test on unexpected input"
)]

use can_dra_api::{ConfigError, NodeConfig};

const HEADER: &str = "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\n";

fn yaml(body: &str) -> Result<NodeConfig, ConfigError> {
    NodeConfig::from_yaml_str(&format!("{HEADER}{body}"))
}

#[test]
fn minimal_file_equals_default() {
    let config = yaml("").unwrap();
    assert_eq!(config, NodeConfig::default());
    assert_eq!(config.physical.include.len(), 1);
    assert_eq!(config.physical.include[0].as_str(), "*");
    assert!(config.physical.exclude.is_empty());
    assert_eq!(config.physical.slots, 8);
    assert!(config.virtual_buses.is_empty());
    assert!(config.publishes_physical("can0") && config.publishes_physical("slcan12"));
    assert!(NodeConfig::default().validate().is_ok());
}

#[test]
fn virtual_bus_defaults_and_explicit_values() {
    let config = yaml(
        "virtualBuses:
- name: body
- name: powertrain-fd
  bitrate: 1M
  fd: true
  dataBitrate: 5Mbit
  slots: 64
",
    )
    .unwrap();
    let body = &config.virtual_buses[0];
    assert_eq!(body.name, "body");
    assert_eq!(body.bitrate.bits_per_second(), 500_000);
    assert!(!body.fd);
    assert_eq!(body.data_bitrate, None);
    assert_eq!(body.slots, 8);
    let pt = &config.virtual_buses[1];
    assert_eq!(pt.bitrate.bits_per_second(), 1_000_000);
    assert!(pt.fd);
    assert_eq!(
        pt.data_bitrate.map(|b| b.bits_per_second()),
        Some(5_000_000)
    );
    assert_eq!(pt.slots, 64);
}

#[test]
fn include_and_exclude_decide_what_is_published() {
    let config = yaml(
        "physical:
  include: ['can*', 'pcan?']
  exclude: ['can9', 'can1?']
  slots: 4
",
    )
    .unwrap();
    assert_eq!(config.physical.slots, 4);
    let published = |n: &str| config.publishes_physical(n);
    assert!(published("can0"));
    assert!(published("can1"));
    assert!(published("pcan3"));
    assert!(!published("pcan10"), "? matches exactly one character");
    assert!(!published("can9"), "excluded");
    assert!(!published("can12"), "excluded by can1?");
    assert!(published("can123"), "can1? does not match three digits");
    assert!(!published("vcan0"), "not included");

    let none = yaml("physical:\n  include: []\n").unwrap();
    assert!(
        !none.publishes_physical("can0"),
        "an empty include list publishes nothing"
    );
}

#[test]
fn serialising_gives_a_file_that_parses_back_identically() {
    let config = yaml(
        "physical: {include: ['can*'], exclude: [can9]}
virtualBuses: [{name: a, bitrate: 250000, fd: true, dataBitrate: 2M}]
",
    )
    .unwrap();
    let text = serde_yaml::to_string(&config).unwrap();
    assert!(text.contains("bitrate: 250kbit"), "{text}");
    assert_eq!(NodeConfig::from_yaml_str(&text).unwrap(), config);
}

#[test]
fn bad_inputs_name_the_field_and_the_rule() {
    let cases: &[(&str, &str)] = &[
        (
            "physical:\n  slot: 4\n",
            "physical.slot: unknown field (expected one of `include`, `exclude`, `slots`)",
        ),
        (
            "virtualBus: []\n",
            "virtualBus: unknown field (expected one of `apiVersion`, `kind`, `physical`, `virtualBuses`)",
        ),
        ("physical:\n  slots: 0\n", "physical.slots: 0 is below 1"),
        ("physical:\n  slots: 65\n", "physical.slots: 65 is above 64"),
        (
            "physical:\n  slots: -1\n",
            "physical.slots: invalid value: integer `-1`, expected u32",
        ),
        (
            "physical:\n  include: ['can[0-3]']\n",
            r#"physical.include[0]: "can[0-3]" contains '['; only '*' and '?' are special in patterns"#,
        ),
        (
            "physical:\n  exclude: ['can*', 'a b']\n",
            r#"physical.exclude[1]: "a b" contains whitespace"#,
        ),
        (
            "physical:\n  include: ['']\n",
            "physical.include[0]: is empty",
        ),
        (
            "physical:\n  include: can*\n",
            r#"physical.include: invalid type: string "can*", expected a sequence"#,
        ),
        (
            "virtualBuses:\n- bitrate: 500k\n",
            "virtualBuses[0].name: is required",
        ),
        (
            "virtualBuses:\n- name: Body\n",
            r#"virtualBuses[0].name: "Body" is not a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit)"#,
        ),
        (
            "virtualBuses:\n- name: body-\n",
            r#"virtualBuses[0].name: "body-" is not a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit)"#,
        ),
        (
            "virtualBuses:\n- name: ''\n",
            "virtualBuses[0].name: is empty",
        ),
        (
            "virtualBuses:\n- name: a234567890123456789012345678901234567890x\n",
            r#"virtualBuses[0].name: "a234567890123456789012345678901234567890x" is 41 characters long, at most 40 are allowed"#,
        ),
        (
            "virtualBuses:\n- name: a\n- name: b\n- name: a\n",
            r#"virtualBuses[2].name: "a" is already used by virtualBuses[0]"#,
        ),
        (
            "virtualBuses:\n- name: a\n  bitrate: 2M\n",
            "virtualBuses[0].bitrate: 2Mbit is above 1Mbit, the highest nominal CAN bitrate (an FD data phase goes in dataBitrate)",
        ),
        (
            "virtualBuses:\n- name: a\n  bitrate: 100\n",
            "virtualBuses[0].bitrate: 100bit is below 1kbit",
        ),
        (
            "virtualBuses:\n- name: a\n  bitrate: fast\n",
            r#"virtualBuses[0].bitrate: "fast" is not a bitrate (examples: 500k, 500kbit, 1M, 1Mbit, 125000, 125kbps)"#,
        ),
        (
            "virtualBuses:\n- name: a\n  dataBitrate: 2M\n",
            "virtualBuses[0].dataBitrate: is only allowed with fd: true",
        ),
        (
            "virtualBuses:\n- name: a\n  fd: true\n  dataBitrate: 32M\n",
            "virtualBuses[0].dataBitrate: 32Mbit is above 16Mbit",
        ),
        (
            "virtualBuses:\n- name: a\n  fd: true\n  bitrate: 1M\n  dataBitrate: 250k\n",
            "virtualBuses[0].dataBitrate: 250kbit is below the nominal bitrate 1Mbit; the data phase is never slower",
        ),
        (
            "virtualBuses:\n- name: a\n  fd: 'yes'\n",
            r#"virtualBuses[0].fd: invalid type: string "yes", expected a boolean"#,
        ),
        (
            "virtualBuses:\n- name: a\n  slots: 100\n",
            "virtualBuses[0].slots: 100 is above 64",
        ),
        (
            "virtualBuses:\n- name: a\n  color: red\n",
            "virtualBuses[0].color: unknown field (expected one of `name`, `bitrate`, `fd`, `dataBitrate`, `slots`)",
        ),
    ];
    for (body, expected) in cases {
        match yaml(body) {
            Ok(c) => panic!("accepted {body:?} as {c:?}"),
            Err(e) => assert_eq!(e.to_string(), *expected, "for input {body:?}"),
        }
    }
}

#[test]
fn type_meta_is_required_and_checked() {
    let cases = [
        (
            "kind: NodeConfig\n",
            r#"apiVersion: is required and must be "can.dra.dev/v1alpha1""#,
        ),
        (
            "apiVersion: can.dra.dev/v1alpha1\nkind: MemberConfig\n",
            r#"kind: "MemberConfig" is not supported; expected "NodeConfig""#,
        ),
        ("", "document: is empty"),
    ];
    for (text, expected) in cases {
        assert_eq!(
            NodeConfig::from_yaml_str(text).unwrap_err().to_string(),
            expected,
            "{text:?}"
        );
    }
}
