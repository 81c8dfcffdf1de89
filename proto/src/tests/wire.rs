//! Encodes known messages and compares them with bytes worked out by hand from the protobuf
//! encoding rules: a tag is the varint `(field << 3) | wire_type` (0 = varint, 2 = length
//! delimited), strings and nested messages are a varint length then the bytes, proto3 scalars
//! equal to their default are left out unless the field is `optional`, and a map entry is a
//! nested message with the key as field 1 and the value as field 2.

use std::collections::HashMap;
use std::fmt::Debug;

use prost::Message;

use crate::{dra, health, registration};

/// Joins hand-written byte pieces into one expected encoding.
fn bytes(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Asserts that `value` encodes to exactly `expected` and that `expected` decodes to `value`.
fn assert_wire<M: Message + Default + PartialEq + Debug>(value: &M, expected: &[u8]) {
    assert_eq!(value.encode_to_vec(), expected, "encoding of {value:?}");
    assert_eq!(
        &M::decode(expected).unwrap(),
        value,
        "decoding of {expected:02x?}"
    );
}

fn v1_prepared_device() -> dra::v1::Device {
    dra::v1::Device {
        request_names: vec!["r".into()],
        pool_name: "n1".into(),
        device_name: "can0-m0".into(),
        cdi_device_ids: vec!["k8s.can.dra.dev/can=c1".into()],
        share_id: Some("s".into()),
    }
}

/// The v1 `Device` above, 43 bytes.
fn v1_prepared_device_bytes() -> Vec<u8> {
    bytes(&[
        // field 1 request_names[0]: tag (1 << 3) | 2 = 0x0a, length 1, "r"
        &[0x0a, 0x01],
        b"r",
        // field 2 pool_name: tag (2 << 3) | 2 = 0x12, length 2, "n1"
        &[0x12, 0x02],
        b"n1",
        // field 3 device_name: tag (3 << 3) | 2 = 0x1a, length 7, "can0-m0"
        &[0x1a, 0x07],
        b"can0-m0",
        // field 4 cdi_device_ids[0]: tag (4 << 3) | 2 = 0x22, length 22
        &[0x22, 0x16],
        b"k8s.can.dra.dev/can=c1",
        // field 5 share_id: tag (5 << 3) | 2 = 0x2a, length 1, "s"
        &[0x2a, 0x01],
        b"s",
    ])
}

#[test]
fn dra_v1_prepare_response_map_matches_hand_encoding() {
    let response = dra::v1::NodePrepareResourcesResponse {
        claims: HashMap::from([(
            "u1".to_string(),
            dra::v1::NodePrepareResourceResponse {
                devices: vec![v1_prepared_device()],
                error: String::new(),
            },
        )]),
    };
    let expected = bytes(&[
        // field 1 claims, one map entry: tag 0x0a, entry length 4 + 2 + 45 = 51
        &[0x0a, 0x33],
        // entry field 1 (key, the claim UID): tag 0x0a, length 2, "u1"
        &[0x0a, 0x02],
        b"u1",
        // entry field 2 (value, NodePrepareResourceResponse): tag 0x12, length 2 + 43 = 45
        &[0x12, 0x2d],
        // value field 1 devices[0]: tag 0x0a, length 43; value field 2 `error` is "" and omitted
        &[0x0a, 0x2b],
        &v1_prepared_device_bytes(),
    ]);
    assert_eq!(expected.len(), 53);
    assert_wire(&response, &expected);
}

#[test]
fn dra_v1_share_id_is_sent_when_present_even_if_empty() {
    // proto3 `optional` keeps presence: Some("") is on the wire, None is not.
    let with_empty_share = dra::v1::Device {
        share_id: Some(String::new()),
        ..Default::default()
    };
    // field 5 share_id: tag 0x2a, length 0
    assert_wire(&with_empty_share, &[0x2a, 0x00]);
    assert_wire(&dra::v1::Device::default(), &[]);
    assert_ne!(
        dra::v1::Device::decode(&[0x2a, 0x00][..]).unwrap(),
        dra::v1::Device::default()
    );
}

#[test]
fn dra_v1beta1_drops_share_id_of_a_v1_device() {
    // v1beta1 has no field 5: its decoder skips it and keeps everything else.
    let from_v1 = dra::v1beta1::Device::decode(v1_prepared_device_bytes().as_slice()).unwrap();
    let expected = dra::v1beta1::Device {
        request_names: vec!["r".into()],
        pool_name: "n1".into(),
        device_name: "can0-m0".into(),
        cdi_device_ids: vec!["k8s.can.dra.dev/can=c1".into()],
    };
    assert_eq!(from_v1, expected);
    // Re-encoded without the 3 bytes of field 5.
    let v1_bytes = v1_prepared_device_bytes();
    assert_eq!(expected.encode_to_vec(), v1_bytes[..v1_bytes.len() - 3]);
}

#[test]
fn dra_v1beta1_prepare_request_matches_hand_encoding() {
    let request = dra::v1beta1::NodePrepareResourcesRequest {
        claims: vec![dra::v1beta1::Claim {
            namespace: "ns".into(),
            uid: "u1".into(),
            name: "c".into(),
        }],
    };
    let expected = bytes(&[
        // field 1 claims[0]: tag 0x0a, Claim length 4 + 4 + 3 = 11
        &[0x0a, 0x0b],
        // Claim field 1 namespace: tag 0x0a, length 2, "ns"
        &[0x0a, 0x02],
        b"ns",
        // Claim field 2 uid: tag 0x12, length 2, "u1"
        &[0x12, 0x02],
        b"u1",
        // Claim field 3 name: tag 0x1a, length 1, "c"
        &[0x1a, 0x01],
        b"c",
    ]);
    assert_wire(&request, &expected);
}

#[test]
fn dra_v1beta1_unprepare_response_keeps_claims_with_empty_results() {
    let failed = dra::v1beta1::NodeUnprepareResourcesResponse {
        claims: HashMap::from([(
            "u2".to_string(),
            dra::v1beta1::NodeUnprepareResourceResponse {
                error: "busy".into(),
            },
        )]),
    };
    let expected = bytes(&[
        // field 1 claims, one map entry: tag 0x0a, entry length 4 + 8 = 12
        &[0x0a, 0x0c],
        // entry key: tag 0x0a, length 2, "u2"
        &[0x0a, 0x02],
        b"u2",
        // entry value: tag 0x12, length 6
        &[0x12, 0x06],
        // value field 1 error: tag 0x0a, length 4, "busy"
        &[0x0a, 0x04],
        b"busy",
    ]);
    assert_wire(&failed, &expected);

    // A successful unprepare has an all-default value; the entry must still reach the
    // kubelet, which requires every requested claim in the response.
    let succeeded = dra::v1beta1::NodeUnprepareResourcesResponse {
        claims: HashMap::from([("u3".to_string(), Default::default())]),
    };
    let key_only = bytes(&[
        // field 1 claims: tag 0x0a, entry length 4 (prost leaves out a default entry value)
        &[0x0a, 0x04],
        // entry key: tag 0x0a, length 2, "u3"
        &[0x0a, 0x02],
        b"u3",
    ]);
    assert_wire(&succeeded, &key_only);
    // The Go encoder writes the empty value as `12 00`; accept both forms on decode.
    let with_explicit_value = bytes(&[
        // field 1 claims: tag 0x0a, entry length 6
        &[0x0a, 0x06],
        // entry key: tag 0x0a, length 2, "u3"
        &[0x0a, 0x02],
        b"u3",
        // entry value: tag 0x12, length 0 (empty NodeUnprepareResourceResponse)
        &[0x12, 0x00],
    ]);
    assert_eq!(
        dra::v1beta1::NodeUnprepareResourcesResponse::decode(with_explicit_value.as_slice())
            .unwrap(),
        succeeded
    );
}

#[test]
fn registration_plugin_info_matches_hand_encoding() {
    let info = registration::PluginInfo {
        r#type: crate::DRA_PLUGIN_TYPE.into(),
        name: "can.dra.dev".into(),
        endpoint: "/var/lib/kubelet/plugins/can.dra.dev/dra.sock".into(),
        supported_versions: vec![
            crate::DRA_V1_SERVICE.into(),
            crate::DRA_V1BETA1_SERVICE.into(),
        ],
    };
    let expected = bytes(&[
        // field 1 type: tag 0x0a, length 9, "DRAPlugin"
        &[0x0a, 0x09],
        b"DRAPlugin",
        // field 2 name: tag 0x12, length 11, "can.dra.dev"
        &[0x12, 0x0b],
        b"can.dra.dev",
        // field 3 endpoint: tag 0x1a, length 45
        &[0x1a, 0x2d],
        b"/var/lib/kubelet/plugins/can.dra.dev/dra.sock",
        // field 4 supported_versions[0]: tag 0x22, length 12, "v1.DRAPlugin"
        &[0x22, 0x0c],
        b"v1.DRAPlugin",
        // field 4 supported_versions[1]: tag 0x22, length 17, "v1beta1.DRAPlugin"
        &[0x22, 0x11],
        b"v1beta1.DRAPlugin",
    ]);
    assert_wire(&info, &expected);
}

#[test]
fn registration_status_bool_matches_hand_encoding() {
    let registered = registration::RegistrationStatus {
        plugin_registered: true,
        error: String::new(),
    };
    // field 1 plugin_registered: tag (1 << 3) | 0 = 0x08, varint 1; `error` "" omitted
    assert_wire(&registered, &[0x08, 0x01]);

    let rejected = registration::RegistrationStatus {
        plugin_registered: false,
        error: "nope".into(),
    };
    // false is the default and omitted; field 2 error: tag 0x12, length 4, "nope"
    assert_wire(&rejected, &bytes(&[&[0x12, 0x04], b"nope"]));

    // The empty messages encode to nothing.
    assert_wire(&registration::InfoRequest {}, &[]);
    assert_wire(&registration::RegistrationStatusResponse {}, &[]);
}

#[test]
fn health_v1alpha1_report_matches_hand_encoding() {
    use health::v1alpha1::{
        DeviceHealth, DeviceIdentifier, HealthStatus, NodeWatchResourcesResponse,
    };

    let report = NodeWatchResourcesResponse {
        devices: vec![DeviceHealth {
            device: Some(DeviceIdentifier {
                pool_name: "n1".into(),
                device_name: "can0".into(),
            }),
            health: HealthStatus::Unhealthy.into(),
            last_updated_time: 1_700_000_000,
            health_check_timeout_seconds: 60,
            message: "bus-off".into(),
        }],
    };
    let expected = bytes(&[
        // field 1 devices[0]: tag 0x0a, DeviceHealth length 12 + 2 + 6 + 2 + 9 = 31
        &[0x0a, 0x1f],
        // DeviceHealth field 1 device: tag 0x0a, DeviceIdentifier length 4 + 6 = 10
        &[0x0a, 0x0a],
        // DeviceIdentifier field 1 pool_name: tag 0x0a, length 2, "n1"
        &[0x0a, 0x02],
        b"n1",
        // DeviceIdentifier field 2 device_name: tag 0x12, length 4, "can0"
        &[0x12, 0x04],
        b"can0",
        // field 2 health: tag (2 << 3) | 0 = 0x10, enum UNHEALTHY = 2
        &[0x10, 0x02],
        // field 3 last_updated_time: tag 0x18, varint 1_700_000_000 = 0x6553f100 in 7-bit
        // groups from the low end: 0x00, 0x62, 0x4f, 0x2a, 0x06 (continuation bit on all but last)
        &[0x18, 0x80, 0xe2, 0xcf, 0xaa, 0x06],
        // field 4 health_check_timeout_seconds: tag 0x20, varint 60 = 0x3c
        &[0x20, 0x3c],
        // field 5 message: tag 0x2a, length 7, "bus-off"
        &[0x2a, 0x07],
        b"bus-off",
    ]);
    assert_wire(&report, &expected);
}

#[test]
fn health_v1_report_matches_hand_encoding() {
    use health::v1::{DeviceHealth, DeviceIdentifier, HealthStatus, NodeWatchResourcesResponse};

    let report = NodeWatchResourcesResponse {
        devices: vec![
            DeviceHealth {
                device: Some(DeviceIdentifier {
                    pool_name: String::new(),
                    device_name: "vbus".into(),
                }),
                health: HealthStatus::Healthy.into(),
                last_updated_time: 0,
                // <= 0 asks the kubelet for its default timeout.
                health_check_timeout_seconds: -1,
                message: String::new(),
            },
            DeviceHealth {
                device: None,
                health: HealthStatus::Unknown.into(),
                ..Default::default()
            },
        ],
    };
    let expected = bytes(&[
        // field 1 devices[0]: tag 0x0a, DeviceHealth length 8 + 2 + 11 = 21
        &[0x0a, 0x15],
        // DeviceHealth field 1 device: tag 0x0a, length 6; pool_name "" omitted
        &[0x0a, 0x06],
        // DeviceIdentifier field 2 device_name: tag 0x12, length 4, "vbus"
        &[0x12, 0x04],
        b"vbus",
        // field 2 health: tag 0x10, enum HEALTHY = 1; field 3 (0) omitted
        &[0x10, 0x01],
        // field 4 health_check_timeout_seconds: tag 0x20, int64 -1 is a 10-byte varint
        // (two's complement, 64 one-bits: nine 0xff groups then 0x01)
        &[
            0x20, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ],
        // field 1 devices[1]: tag 0x0a, length 0 (UNKNOWN = 0 and every other field default)
        &[0x0a, 0x00],
    ]);
    assert_wire(&report, &expected);
}

#[test]
fn health_status_names_match_upstream_enum() {
    use health::v1::HealthStatus;

    let names: Vec<_> = [
        HealthStatus::Unknown,
        HealthStatus::Healthy,
        HealthStatus::Unhealthy,
    ]
    .iter()
    .map(|status| (status.as_str_name(), i32::from(*status)))
    .collect();
    assert_eq!(names, [("UNKNOWN", 0), ("HEALTHY", 1), ("UNHEALTHY", 2)]);
    assert_eq!(
        health::v1alpha1::HealthStatus::from_str_name("UNHEALTHY"),
        Some(health::v1alpha1::HealthStatus::Unhealthy)
    );
}
