//! Each gated ResourceSlice field against `dropDisabledFields`: dropped when its gate is off,
//! kept when it is on, and kept on update when the stored object already uses it.

use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::super::ApiServer;
use super::FeatureGate;

fn slice(name: &str, spec_extra: Value, device_extra: Value) -> ResourceSlice {
    let mut device = json!({"name": "can0-m0", "capacity": {"slots": {"value": "4"}}});
    merge(&mut device, device_extra);
    let mut spec = json!({
        "driver": "can.dra.dev", "nodeName": "node-a",
        "pool": {"name": "node-a", "generation": 1, "resourceSliceCount": 1},
        "devices": [device],
    });
    merge(&mut spec, spec_extra);
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

/// Adds the keys of `extra` to `target` (one level, objects only).
fn merge(target: &mut Value, extra: Value) {
    if let (Some(target), Value::Object(extra)) = (target.as_object_mut(), extra) {
        target.extend(extra);
    }
}

fn taint() -> Value {
    json!({"taints": [{"key": "can.dra.dev/bus-off", "effect": "NoSchedule"}]})
}

fn partitionable() -> (Value, Value) {
    (
        json!({"sharedCounters": [{"name": "bus", "counters": {"slots": {"value": "4"}}}]}),
        json!({"consumesCounters": [{"counterSet": "bus", "counters": {"slots": {"value": "1"}}}]}),
    )
}

fn binding() -> Value {
    json!({"bindingConditions": ["can.dra.dev/ready"],
           "bindingFailureConditions": ["can.dra.dev/failed"], "bindsToNode": true})
}

fn consumable() -> Value {
    json!({"allowMultipleAllocations": true,
           "capacity": {"slots": {"value": "4", "requestPolicy": {"default": "1"}}}})
}

/// The stored spec's device 0 and whole spec as JSON.
fn stored(server: &ApiServer, name: &str) -> (Value, Value) {
    let slice = server
        .slices()
        .into_iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap();
    let spec = serde_json::to_value(&slice.spec).unwrap();
    (spec["devices"][0].clone(), spec)
}

async fn create(server: &ApiServer, slice: &ResourceSlice) -> ResourceSlice {
    let api: Api<ResourceSlice> = Api::all(server.client().unwrap());
    api.create(&PostParams::default(), slice).await.unwrap()
}

#[tokio::test]
async fn alpha_fields_are_dropped_on_create_in_1_34_and_the_response_says_so() {
    let server = ApiServer::start().await.unwrap();
    let (counters, consumes) = partitionable();
    let mut device = taint();
    for extra in [consumes, binding(), consumable()] {
        merge(&mut device, extra);
    }
    let created = create(&server, &slice("s", counters, device)).await;
    let (device, spec) = stored(&server, "s");
    for field in [
        "taints",
        "consumesCounters",
        "bindingConditions",
        "bindingFailureConditions",
        "bindsToNode",
        "allowMultipleAllocations",
    ] {
        assert!(device.get(field).is_none(), "{field} kept: {device}");
    }
    assert!(device["capacity"]["slots"].get("requestPolicy").is_none());
    assert_eq!(device["capacity"]["slots"]["value"], "4");
    assert!(spec.get("sharedCounters").is_none());
    // The client gets the object as stored.
    assert_eq!(serde_json::to_value(&created.spec).unwrap(), spec);
}

#[tokio::test]
async fn each_gate_keeps_its_own_fields_only() {
    let (counters, consumes) = partitionable();
    let cases: [(FeatureGate, Value, Value, &[&str]); 4] = [
        (
            FeatureGate::DraDeviceTaints,
            json!({}),
            taint(),
            &["taints"],
        ),
        (
            FeatureGate::DraPartitionableDevices,
            counters,
            consumes,
            &["consumesCounters"],
        ),
        (
            FeatureGate::DraDeviceBindingConditions,
            json!({}),
            binding(),
            &[
                "bindingConditions",
                "bindingFailureConditions",
                "bindsToNode",
            ],
        ),
        (
            FeatureGate::DraConsumableCapacity,
            json!({}),
            consumable(),
            &["allowMultipleAllocations"],
        ),
    ];
    for (gate, spec_extra, device_extra, fields) in cases {
        let server = ApiServer::start().await.unwrap();
        server.set_feature_gate(gate, true);
        assert!(server.feature_gate(gate));
        let mut all = taint();
        merge(&mut all, device_extra);
        create(&server, &slice("s", spec_extra, all)).await;
        let (device, spec) = stored(&server, "s");
        for field in fields {
            assert!(device.get(field).is_some(), "{gate}: {field} dropped");
        }
        // Another gate's field (taints) still goes, unless it is this gate's.
        assert_eq!(
            device.get("taints").is_some(),
            gate == FeatureGate::DraDeviceTaints,
            "{gate}"
        );
        match gate {
            FeatureGate::DraPartitionableDevices => assert!(spec.get("sharedCounters").is_some()),
            FeatureGate::DraConsumableCapacity => {
                assert_eq!(device["capacity"]["slots"]["requestPolicy"]["default"], "1");
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn defaults_follow_the_minor_version_and_overrides_win() {
    let server = ApiServer::start().await.unwrap();
    let gated = [
        FeatureGate::DraDeviceTaints,
        FeatureGate::DraPartitionableDevices,
        FeatureGate::DraDeviceBindingConditions,
        FeatureGate::DraConsumableCapacity,
    ];
    for minor in [34, 35] {
        server.set_minor_version(minor);
        assert!(gated.iter().all(|g| !server.feature_gate(*g)), "1.{minor}");
        assert!(server.feature_gate(FeatureGate::DraResourceClaimDeviceStatus));
    }
    for minor in [36, 37] {
        server.set_minor_version(minor);
        assert!(
            FeatureGate::ALL.iter().all(|g| server.feature_gate(*g)),
            "1.{minor}"
        );
    }
    create(&server, &slice("s", json!({}), taint())).await;
    assert!(stored(&server, "s").0.get("taints").is_some());
    server.set_feature_gate(FeatureGate::DraDeviceTaints, false);
    create(&server, &slice("t", json!({}), taint())).await;
    assert!(stored(&server, "t").0.get("taints").is_none());
}

#[tokio::test]
async fn binding_conditions_also_need_claim_device_status() {
    let server = ApiServer::start().await.unwrap();
    server.set_feature_gate(FeatureGate::DraDeviceBindingConditions, true);
    server.set_feature_gate(FeatureGate::DraResourceClaimDeviceStatus, false);
    create(&server, &slice("s", json!({}), binding())).await;
    assert!(stored(&server, "s").0.get("bindingConditions").is_none());
}

#[tokio::test]
async fn a_taint_gets_its_time_added() {
    let server = ApiServer::start().await.unwrap();
    server.set_feature_gate(FeatureGate::DraDeviceTaints, true);
    create(&server, &slice("s", json!({}), taint())).await;
    assert!(stored(&server, "s").0["taints"][0]["timeAdded"].is_string());
}

#[tokio::test]
async fn an_update_keeps_a_gated_field_the_stored_slice_already_uses() {
    let server = ApiServer::start().await.unwrap();
    let api: Api<ResourceSlice> = Api::all(server.client().unwrap());
    // Written while the gate was on (say before a downgrade).
    server.set_feature_gate(FeatureGate::DraDeviceTaints, true);
    let old = create(&server, &slice("s", json!({}), taint())).await;
    server.set_feature_gate(FeatureGate::DraDeviceTaints, false);
    let mut changed = slice(
        "s",
        json!({}),
        json!({"taints": [{"key": "can.dra.dev/other", "effect": "NoExecute"}]}),
    );
    changed.metadata.resource_version = old.metadata.resource_version.clone();
    let updated = api
        .replace("s", &PostParams::default(), &changed)
        .await
        .unwrap();
    let taints = updated.spec.devices.unwrap()[0].taints.clone().unwrap();
    assert_eq!(taints[0].key, "can.dra.dev/other");
}

#[tokio::test]
async fn update_and_apply_drop_a_field_the_stored_slice_does_not_use() {
    let server = ApiServer::start().await.unwrap();
    let api: Api<ResourceSlice> = Api::all(server.client().unwrap());
    let old = create(&server, &slice("s", json!({}), json!({}))).await;
    let mut tainted = slice("s", json!({}), taint());
    tainted.metadata.resource_version = old.metadata.resource_version.clone();
    let updated = api
        .replace("s", &PostParams::default(), &tainted)
        .await
        .unwrap();
    assert_eq!(updated.spec.devices.as_ref().unwrap()[0].taints, None);
    // `PrepareForUpdate` compares the specs before dropping: the generation and
    // resourceVersion still move, so a client that keeps sending the field keeps writing.
    assert_eq!(updated.metadata.generation, Some(2));
    assert_ne!(
        updated.metadata.resource_version,
        old.metadata.resource_version
    );

    let applied = api
        .patch(
            "s",
            &PatchParams::apply("can.dra.dev"),
            &Patch::Apply(slice("s", json!({}), taint())),
        )
        .await
        .unwrap();
    assert_eq!(applied.spec.devices.as_ref().unwrap()[0].taints, None);
    assert_eq!(applied.metadata.generation, Some(3));
}
