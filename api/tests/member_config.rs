//! Behaviour of `MemberConfig` documents as users write them: accepted inputs, defaults, the exact
//! error for each broken rule, overlay, and resolution.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test on unexpected input"
)]

use std::time::Duration;

use can_dra_api::{
    Access, Bitrate, CanFilter, ConfigError, FrameFormat, MemberConfig, Percent, ResolvedMember,
};
use serde_json::json;

const HEADER: &str = "apiVersion: can.dra.dev/v1alpha1\nkind: MemberConfig\n";

fn yaml(body: &str) -> Result<MemberConfig, ConfigError> {
    MemberConfig::from_yaml_str(&format!("{HEADER}{body}"))
}

fn json_doc(mut body: serde_json::Value) -> serde_json::Value {
    body["apiVersion"] = json!("can.dra.dev/v1alpha1");
    body["kind"] = json!("MemberConfig");
    body
}

/// Parses through all three entry points (YAML text, JSON text, JSON value) and checks they agree.
fn parse_everywhere(body: serde_json::Value) -> Result<MemberConfig, ConfigError> {
    let doc = json_doc(body);
    let from_value = MemberConfig::from_json_value(&doc);
    let from_json = MemberConfig::from_json_str(&doc.to_string());
    let from_yaml = MemberConfig::from_yaml_str(&serde_yaml::to_string(&doc).unwrap());
    assert_eq!(
        from_value, from_json,
        "JSON text and value disagree for {doc}"
    );
    assert_eq!(from_value, from_yaml, "JSON and YAML disagree for {doc}");
    from_value
}

fn resolved(body: serde_json::Value) -> ResolvedMember {
    parse_everywhere(body).unwrap().resolve(0).unwrap()
}

#[test]
fn minimal_document_resolves_to_every_default() {
    for config in [
        yaml("").unwrap(),
        MemberConfig::from_json_str(
            r#"{"apiVersion":"can.dra.dev/v1alpha1","kind":"MemberConfig"}"#,
        )
        .unwrap(),
        MemberConfig::default(),
    ] {
        let m = config.resolve(0).unwrap();
        assert_eq!(m.interface_name.as_str(), "can0");
        assert_eq!(m.access, Access::ReadWrite);
        assert_eq!(m.frame_format, None, "absent frame format follows the bus");
        assert!(
            m.receive_filters.is_empty(),
            "no receive filter means receive everything"
        );
        assert_eq!(
            m.transmit_allow, None,
            "no allow-list means transmit everything"
        );
        assert!(m.shaping.rx.is_unshaped() && m.shaping.tx.is_unshaped());
    }
}

#[test]
fn default_interface_name_follows_request_index() {
    let config = MemberConfig::default();
    assert_eq!(config.resolve(1).unwrap().interface_name.as_str(), "can1");
    assert_eq!(config.resolve(12).unwrap().interface_name.as_str(), "can12");
    // Fifteen bytes is the kernel limit: "can" + 12 digits fits, 13 digits do not.
    assert_eq!(
        config
            .resolve(999_999_999_999)
            .unwrap()
            .interface_name
            .as_str()
            .len(),
        15
    );
    let err = config.resolve(1_000_000_000_000).unwrap_err();
    assert_eq!(err.field(), "interfaceName");
    assert!(err.message().contains("at most 15"), "{err}");
}

#[test]
fn full_yaml_document() {
    let config = yaml(
        "interfaceName: vcan-ecu1
access: readWrite
frameFormat: fd
receiveFilters:
- id: 0x100
  mask: 0x700
- id: '0x18DAF110'
  extended: true
- id: 0x7DF
  invert: true
transmitAllow:
- id: 2016
shaping:
  rx:
    bitrate: 500k
    dataBitrate: 2Mbit
    delay: 1.5ms
    jitter: 250us
    loss: 0.5%
    duplicate: 1%
  tx:
    bitrate: 125000
",
    )
    .unwrap();
    let m = config.resolve(3).unwrap();
    assert_eq!(m.interface_name.as_str(), "vcan-ecu1");
    assert_eq!(m.frame_format, Some(FrameFormat::Fd));
    assert_eq!(
        m.receive_filters,
        vec![
            CanFilter {
                id: 0x100,
                mask: 0x700,
                extended: false,
                invert: false
            },
            CanFilter {
                id: 0x18DA_F110,
                mask: 0x1FFF_FFFF,
                extended: true,
                invert: false
            },
            CanFilter {
                id: 0x7DF,
                mask: 0x7FF,
                extended: false,
                invert: true
            },
        ]
    );
    assert_eq!(
        m.transmit_allow,
        Some(vec![CanFilter {
            id: 0x7E0,
            mask: 0x7FF,
            extended: false,
            invert: false
        }])
    );
    let rx = m.shaping.rx;
    assert_eq!(rx.bitrate.map(Bitrate::bits_per_second), Some(500_000));
    assert_eq!(
        rx.data_bitrate.map(Bitrate::bits_per_second),
        Some(2_000_000)
    );
    assert_eq!(rx.delay, Duration::from_micros(1500));
    assert_eq!(rx.jitter, Duration::from_micros(250));
    assert_eq!(rx.loss.millionths(), 5_000);
    assert_eq!(rx.duplicate, "1%".parse::<Percent>().unwrap());
    let tx = m.shaping.tx;
    assert_eq!(tx.bitrate.map(Bitrate::bits_per_second), Some(125_000));
    assert_eq!(
        (tx.delay, tx.jitter, tx.loss, tx.duplicate),
        (Duration::ZERO, Duration::ZERO, Percent::ZERO, Percent::ZERO)
    );
}

#[test]
fn json_and_yaml_agree_and_apply_filter_defaults() {
    let m = resolved(json!({
        "access": "listenOnly",
        "frameFormat": "classic",
        "receiveFilters": [{"id": 291}, {"id": "0x123", "mask": 0}, {"id": "8", "extended": true}],
        "shaping": {"tx": {"delay": "10ms"}},
    }));
    assert_eq!(m.access, Access::ListenOnly);
    assert_eq!(m.frame_format, Some(FrameFormat::Classic));
    assert_eq!(
        m.receive_filters[0],
        CanFilter {
            id: 0x123,
            mask: 0x7FF,
            extended: false,
            invert: false
        }
    );
    assert_eq!(
        m.receive_filters[1].mask, 0,
        "an explicit zero mask is kept (matches every standard frame)"
    );
    assert_eq!(
        m.receive_filters[2],
        CanFilter {
            id: 8,
            mask: 0x1FFF_FFFF,
            extended: true,
            invert: false
        }
    );
    assert!(m.shaping.rx.is_unshaped());
    assert_eq!(m.shaping.tx.delay, Duration::from_millis(10));
}

#[test]
fn filters_match_like_the_kernel_would() {
    let m = resolved(
        json!({"receiveFilters": [{"id": "0x100", "mask": "0x700"}, {"id": "0x7DF", "invert": true}]}),
    );
    let range = m.receive_filters[0];
    assert!(range.matches(0x100, false) && range.matches(0x1FF, false));
    assert!(!range.matches(0x200, false));
    assert!(
        !range.matches(0x100, true),
        "a standard filter never matches extended frames"
    );
    assert_eq!(range.kernel_filter(), (0x100, 0x8000_0700));
    let not_diag = m.receive_filters[1];
    assert!(!not_diag.matches(0x7DF, false));
    assert!(not_diag.matches(0x7E0, false));
    assert_eq!(not_diag.kernel_filter(), (0x2000_07DF, 0x8000_07FF));
    let ext = resolved(json!({"receiveFilters": [{"id": "0x18DAF110", "extended": true}]}))
        .receive_filters[0];
    assert_eq!(ext.kernel_filter(), (0x98DA_F110, 0x9FFF_FFFF));
}

#[test]
fn serialising_gives_a_document_that_parses_back_identically() {
    let config = yaml(
        "interfaceName: can7
transmitAllow: [{id: 0x10, mask: 0x7F0}]
shaping: {rx: {bitrate: 1000k, delay: 1500us, jitter: 0.5ms, loss: 12.50%}}
",
    )
    .unwrap();
    let text = serde_json::to_string(&config).unwrap();
    assert!(
        text.contains(r#""bitrate":"1Mbit""#),
        "canonical forms are written: {text}"
    );
    assert!(
        text.contains(r#""delay":"1.5ms""#) && text.contains(r#""loss":"12.5%""#),
        "{text}"
    );
    assert!(text.contains(r#""id":"0x10""#), "{text}");
    assert_eq!(MemberConfig::from_json_str(&text).unwrap(), config);
    let yaml_text = serde_yaml::to_string(&config).unwrap();
    assert_eq!(MemberConfig::from_yaml_str(&yaml_text).unwrap(), config);
}

/// Every broken rule, with the exact message users will read.
#[test]
fn bad_yaml_inputs_name_the_field_and_the_rule() {
    let cases: &[(&str, &str)] = &[
        // Document shape.
        (
            "shaping:\n  rx:\n    lossy: 5%\n",
            "shaping.rx.lossy: unknown field (expected one of `bitrate`, `dataBitrate`, `delay`, `jitter`, `loss`, `duplicate`)",
        ),
        (
            "interfacename: can0\n",
            "interfacename: unknown field (expected one of `apiVersion`, `kind`, `interfaceName`, `access`, `frameFormat`, `receiveFilters`, `transmitAllow`, `shaping`)",
        ),
        (
            "receiveFilters:\n- id: 1\n  mask: 2\n  ext: true\n",
            "receiveFilters[0].ext: unknown field (expected one of `id`, `mask`, `extended`, `invert`)",
        ),
        (
            "receiveFilters:\n- mask: 0x700\n",
            "receiveFilters[0].id: is required",
        ),
        (
            "shaping: 3\n",
            "shaping: invalid type: integer `3`, expected struct ShapingConfig",
        ),
        (
            "receiveFilters: {id: 1}\n",
            "receiveFilters: invalid type: map, expected a sequence",
        ),
        // Enumerations.
        (
            "access: readOnly\n",
            "access: unknown variant `readOnly`, expected `readWrite` or `listenOnly`",
        ),
        (
            "frameFormat: FD\n",
            "frameFormat: unknown variant `FD`, expected `classic` or `fd`",
        ),
        // Interface names.
        (
            "interfaceName: eth0/1\n",
            r#"interfaceName: "eth0/1" contains '/'"#,
        ),
        (
            "interfaceName: averyveryverylongname\n",
            r#"interfaceName: "averyveryverylongname" is 21 bytes long, at most 15 are allowed"#,
        ),
        (
            "interfaceName: 'can 0'\n",
            r#"interfaceName: "can 0" contains whitespace"#,
        ),
        (
            "interfaceName: 'can:0'\n",
            r#"interfaceName: "can:0" contains ':'"#,
        ),
        (
            "interfaceName: '..'\n",
            r#"interfaceName: ".." is reserved by the kernel"#,
        ),
        ("interfaceName: ''\n", "interfaceName: is empty"),
        // Filters.
        (
            "receiveFilters:\n- {id: 0x1}\n- {id: 0x2}\n- {id: 0x800}\n",
            "receiveFilters[2].id: 0x800 does not fit in 11 bits (set extended: true for 29-bit ids)",
        ),
        (
            "receiveFilters:\n- {id: 0x100, mask: 0xFFF}\n",
            "receiveFilters[0].mask: 0xFFF does not fit in 11 bits (set extended: true for 29-bit ids)",
        ),
        (
            "receiveFilters:\n- {id: 0x20000000, extended: true}\n",
            "receiveFilters[0].id: 0x20000000 does not fit in 29 bits",
        ),
        (
            "receiveFilters:\n- {id: -1}\n",
            "receiveFilters[0].id: -1 is below 0",
        ),
        (
            "receiveFilters:\n- {id: 'abc'}\n",
            r#"receiveFilters[0].id: "abc" is not a CAN id (examples: 0x7FF, 0x18DAF110, 2047)"#,
        ),
        (
            "transmitAllow: []\n",
            "transmitAllow: an empty list would block every frame; use access: listenOnly for a member that never transmits",
        ),
        (
            "access: listenOnly\ntransmitAllow: [{id: 1}]\n",
            "transmitAllow: cannot be combined with access: listenOnly (a listen-only member transmits nothing)",
        ),
        (
            "transmitAllow: [{id: 1}, {id: 0x900}]\n",
            "transmitAllow[1].id: 0x900 does not fit in 11 bits (set extended: true for 29-bit ids)",
        ),
        // Shaping values.
        (
            "shaping:\n  rx:\n    loss: 120%\n",
            "shaping.rx.loss: 120% is above 100%",
        ),
        (
            "shaping:\n  tx:\n    duplicate: 5\n",
            r#"shaping.tx.duplicate: 5 needs a unit (write "5%")"#,
        ),
        (
            "shaping:\n  rx:\n    loss: 0.00001%\n",
            r#"shaping.rx.loss: "0.00001%" is more precise than 0.0001%"#,
        ),
        (
            "shaping:\n  rx:\n    delay: 11s\n",
            "shaping.rx.delay: 11s is above 10s",
        ),
        (
            "shaping:\n  rx:\n    delay: 10\n",
            r#"shaping.rx.delay: 10 needs a unit (write "10ms")"#,
        ),
        (
            "shaping:\n  rx:\n    delay: 5 ms\n",
            r#"shaping.rx.delay: "5 ms" is not a time span (examples: 10ms, 1.5ms, 250us, 1s)"#,
        ),
        (
            "shaping:\n  rx:\n    jitter: 1ms\n",
            "shaping.rx.jitter: requires delay (jitter varies the delay around its value)",
        ),
        (
            "shaping:\n  tx:\n    delay: 10ms\n    jitter: 20ms\n",
            "shaping.tx.jitter: 20ms exceeds delay 10ms",
        ),
        (
            "shaping:\n  tx:\n    delay: 10s\n    jitter: 3s\n",
            "shaping.tx.jitter: 3s is above 2.147483647s, the largest jitter the kernel's netem accepts",
        ),
        (
            "interfaceName: cdra0123456789a\n",
            r#"interfaceName: "cdra0123456789a" starts with "cdra", which the driver reserves for its own links"#,
        ),
        (
            "interfaceName: vxtm-body\n",
            r#"interfaceName: "vxtm-body" starts with "vxtm-", which the driver reserves for its own links"#,
        ),
        (
            "shaping:\n  rx:\n    bitrate: 2M\n",
            "shaping.rx.bitrate: 2Mbit is above 1Mbit, the highest nominal CAN bitrate (an FD data phase goes in dataBitrate)",
        ),
        (
            "shaping:\n  rx:\n    bitrate: 500\n",
            "shaping.rx.bitrate: 500bit is below 1kbit",
        ),
        (
            "shaping:\n  rx:\n    bitrate: 500kb\n",
            r#"shaping.rx.bitrate: "500kb" is not a bitrate (examples: 500k, 500kbit, 1M, 1Mbit, 125000, 125kbps)"#,
        ),
        (
            "shaping:\n  rx:\n    dataBitrate: 2M\n",
            "shaping.rx.dataBitrate: requires bitrate (the nominal rate of the arbitration phase)",
        ),
        (
            "shaping:\n  rx:\n    bitrate: 1M\n    dataBitrate: 20M\n",
            "shaping.rx.dataBitrate: 20Mbit is above 16Mbit",
        ),
        (
            "shaping:\n  rx:\n    bitrate: 1M\n    dataBitrate: 500k\n",
            "shaping.rx.dataBitrate: 500kbit is below the nominal bitrate 1Mbit; the data phase is never slower",
        ),
        (
            "frameFormat: classic\nshaping:\n  rx:\n    bitrate: 1M\n    dataBitrate: 2M\n",
            "shaping.rx.dataBitrate: has no effect with frameFormat: classic (classic frames have no data phase)",
        ),
    ];
    assert!(cases.len() >= 30);
    for (body, expected) in cases {
        match yaml(body) {
            Ok(c) => panic!("accepted {body:?} as {c:?}"),
            Err(e) => assert_eq!(e.to_string(), *expected, "for input {body:?}"),
        }
    }
}

#[test]
fn error_field_accessor_gives_the_path_alone() {
    let err = yaml("shaping:\n  rx:\n    loss: 120%\n").unwrap_err();
    assert_eq!(err.field(), "shaping.rx.loss");
    assert_eq!(err.message(), "120% is above 100%");
    let err = yaml("receiveFilters:\n- {id: 1}\n- {id: 0x800}\n").unwrap_err();
    assert_eq!(err.field(), "receiveFilters[1].id");
}

#[test]
fn more_than_64_filters_are_refused() {
    let filters: Vec<_> = (0..65).map(|i| json!({"id": i})).collect();
    let err = parse_everywhere(json!({"receiveFilters": filters})).unwrap_err();
    assert_eq!(
        err.to_string(),
        "receiveFilters: 65 filters given, at most 64 are allowed"
    );
    let filters: Vec<_> = (0..64).map(|i| json!({"id": i})).collect();
    assert_eq!(
        resolved(json!({"transmitAllow": filters}))
            .transmit_allow
            .unwrap()
            .len(),
        64
    );
}

#[test]
fn type_meta_is_required_and_checked() {
    let cases = [
        (
            "kind: MemberConfig\n",
            r#"apiVersion: is required and must be "can.dra.dev/v1alpha1""#,
        ),
        (
            "apiVersion: can.dra.dev/v1\nkind: MemberConfig\n",
            r#"apiVersion: "can.dra.dev/v1" is not supported; expected "can.dra.dev/v1alpha1""#,
        ),
        (
            "apiVersion: can.dra.dev/v1alpha1\n",
            r#"kind: is required and must be "MemberConfig""#,
        ),
        (
            "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\n",
            r#"kind: "NodeConfig" is not supported; expected "MemberConfig""#,
        ),
        ("", "document: is empty"),
        (
            "- 1\n",
            "document: invalid type: sequence, expected struct MemberConfig",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(
            MemberConfig::from_yaml_str(text).unwrap_err().to_string(),
            expected,
            "{text:?}"
        );
    }
    assert_eq!(
        MemberConfig::from_json_value(&serde_json::Value::Null)
            .unwrap_err()
            .to_string(),
        "document: is empty"
    );
}

#[test]
fn json_specific_errors() {
    let dup = r#"{"apiVersion":"can.dra.dev/v1alpha1","kind":"MemberConfig","access":"readWrite","access":"listenOnly"}"#;
    assert_eq!(
        MemberConfig::from_json_str(dup).unwrap_err().to_string(),
        "access: is given twice"
    );
    let trailing = r#"{"apiVersion":"can.dra.dev/v1alpha1","kind":"MemberConfig"} {}"#;
    let err = MemberConfig::from_json_str(trailing).unwrap_err();
    assert_eq!(err.field(), "");
    assert!(
        err.message()
            .starts_with("trailing content after the object"),
        "{err}"
    );
    let err = MemberConfig::from_json_str(r#"{"apiVersion":"can.dra.dev/v1alpha1","kind":"MemberConfig","shaping":{"rx":{"loss":"1%"}}"#).unwrap_err();
    assert!(
        err.message().contains("EOF"),
        "truncated JSON is reported: {err}"
    );
    let err = parse_everywhere(json!({"shaping": {"rx": {"bitrate": 1.5}}})).unwrap_err();
    assert_eq!(
        err.to_string(),
        "shaping.rx.bitrate: invalid type: floating point `1.5`, expected a bitrate such as 500k, 1Mbit or 125000"
    );
}

#[test]
fn yaml_specific_errors() {
    let err =
        MemberConfig::from_yaml_str(&format!("{HEADER}access: readWrite\naccess: listenOnly\n"))
            .unwrap_err();
    assert!(
        err.message()
            .contains("duplicate entry with key \"access\""),
        "{err}"
    );
    let err = MemberConfig::from_yaml_str(&format!("{HEADER}---\n{HEADER}")).unwrap_err();
    assert!(err.message().contains("more than one document"), "{err}");
    let err = MemberConfig::from_yaml_str("apiVersion: [\n").unwrap_err();
    assert_eq!(err.field(), "");
    assert!(
        err.message().contains("line"),
        "syntax errors keep their position: {err}"
    );
}

#[test]
fn value_errors_are_the_same_from_every_entry_point() {
    let err = parse_everywhere(json!({"receiveFilters": [{"id": 1}, {"id": 2}, {"id": "0x800"}]}))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "receiveFilters[2].id: 0x800 does not fit in 11 bits (set extended: true for 29-bit ids)"
    );
    let err = parse_everywhere(json!({"shaping": {"rx": {"lossy": "5%"}}})).unwrap_err();
    assert_eq!(err.field(), "shaping.rx.lossy");
    assert!(err.message().starts_with("unknown field"));
}

#[test]
fn overlay_lets_later_fields_win_and_keeps_the_rest() {
    let class = yaml(
        "access: readWrite
frameFormat: fd
receiveFilters: [{id: 0x100}, {id: 0x200}]
shaping:
  rx: {delay: 10ms, jitter: 2ms, loss: 1%}
  tx: {bitrate: 250k}
",
    )
    .unwrap();
    let claim = yaml(
        "interfaceName: ecu
receiveFilters: [{id: 0x300}]
shaping:
  rx: {delay: 20ms}
",
    )
    .unwrap();
    let m = class.overlay(&claim).resolve(0).unwrap();
    assert_eq!(m.interface_name.as_str(), "ecu");
    assert_eq!(m.frame_format, Some(FrameFormat::Fd), "kept from the class");
    assert_eq!(
        m.receive_filters.len(),
        1,
        "lists are replaced, not appended"
    );
    assert_eq!(m.receive_filters[0].id, 0x300);
    assert_eq!(m.shaping.rx.delay, Duration::from_millis(20), "claim wins");
    assert_eq!(
        m.shaping.rx.jitter,
        Duration::from_millis(2),
        "class value kept inside the direction"
    );
    assert_eq!(m.shaping.rx.loss.to_string(), "1%");
    assert_eq!(
        m.shaping.tx.bitrate.map(|b| b.to_string()),
        Some("250kbit".to_owned())
    );

    // Overlaying nothing changes nothing, in either order.
    assert_eq!(class.overlay(&MemberConfig::default()), class);
    assert_eq!(MemberConfig::default().overlay(&class), class);
}

#[test]
fn overlay_results_are_validated_when_resolved() {
    let class = yaml("transmitAllow: [{id: 0x10}]\n").unwrap();
    let claim = yaml("access: listenOnly\n").unwrap();
    let err = class.overlay(&claim).resolve(0).unwrap_err();
    assert_eq!(err.field(), "transmitAllow");

    let class = yaml("shaping: {rx: {delay: 10ms, jitter: 5ms}}\n").unwrap();
    let claim = yaml("shaping: {rx: {delay: 2ms}}\n").unwrap();
    let err = class.overlay(&claim).resolve(0).unwrap_err();
    assert_eq!(err.to_string(), "shaping.rx.jitter: 5ms exceeds delay 2ms");

    // A later config can also repair an earlier one's combination.
    let fixed = class.overlay(&yaml("shaping: {rx: {delay: 2ms, jitter: 1ms}}\n").unwrap());
    assert_eq!(
        fixed.resolve(0).unwrap().shaping.rx.jitter,
        Duration::from_millis(1)
    );

    // Each document must be consistent on its own, even if a layer below would complete it.
    let err = yaml("shaping: {rx: {jitter: 1ms}}\n").unwrap_err();
    assert_eq!(err.field(), "shaping.rx.jitter");
}

#[test]
fn hand_built_configs_are_checked_too() {
    let config = MemberConfig {
        api_version: String::new(),
        ..MemberConfig::default()
    };
    assert_eq!(config.resolve(0).unwrap_err().field(), "apiVersion");
    let config = MemberConfig {
        transmit_allow: Some(vec![]),
        ..MemberConfig::default()
    };
    assert_eq!(config.validate().unwrap_err().field(), "transmitAllow");
}

#[test]
fn jitter_up_to_the_kernels_limit_is_accepted() {
    let config = yaml("shaping: {rx: {delay: 10s, jitter: 2.147483647s}}\n").unwrap();
    let member = config.resolve(0).unwrap();
    assert_eq!(member.shaping.rx.jitter, can_dra_api::MAX_JITTER);
    let err = yaml("shaping: {rx: {delay: 10s, jitter: 2.147483648s}}\n").unwrap_err();
    assert_eq!(err.field(), "shaping.rx.jitter");
}
