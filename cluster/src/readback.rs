//! What the API server kept of the slices the publisher wrote.
//!
//! The API server may keep less than it was sent: on a cluster where a feature gate is off (alpha
//! in 1.34 and 1.35: `DRADeviceTaints`, `DRAPartitionableDevices`, `DRADeviceBindingConditions`,
//! `DRAConsumableCapacity`) it silently drops the gated fields, and it fills in defaults such as a
//! taint's `timeAdded`. [`ServerEdits`] remembers, per slice, the spec sent and the spec kept, so
//! that a later sync with the same desired spec finds the kept one up to date instead of writing
//! it again on every pass, and logs each dropped field path once.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::resource::v1::{ResourceSlice, ResourceSliceSpec};
use serde_json::Value;

use crate::pool::normalised;

/// The paths of the fields present in `sent` but not in `kept` (what the server dropped), with
/// list indexes and map keys written `[*]`, e.g. `spec.devices[*].capacity[*].requestPolicy`.
pub(crate) fn dropped_paths(
    sent: &ResourceSliceSpec,
    kept: &ResourceSliceSpec,
) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    if let (Ok(sent), Ok(kept)) = (serde_json::to_value(sent), serde_json::to_value(kept)) {
        collect_dropped(&sent, &kept, "spec", &mut paths);
    }
    paths
}

fn collect_dropped(sent: &Value, kept: &Value, path: &str, paths: &mut BTreeSet<String>) {
    match (sent, kept) {
        (Value::Object(sent), Value::Object(kept)) => {
            // Maps keyed by name, as opposed to objects with fixed fields.
            let keyed = [".attributes", ".capacity", ".counters"]
                .iter()
                .any(|suffix| path.ends_with(suffix));
            for (key, value) in sent.iter().filter(|(_, v)| !v.is_null()) {
                let child = if keyed {
                    format!("{path}[*]")
                } else {
                    format!("{path}.{key}")
                };
                match kept.get(key).filter(|k| !k.is_null()) {
                    Some(kept) => collect_dropped(value, kept, &child, paths),
                    None => {
                        paths.insert(child);
                    }
                }
            }
        }
        (Value::Array(sent), Value::Array(kept)) => {
            let child = format!("{path}[*]");
            for (sent, kept) in sent.iter().zip(kept) {
                collect_dropped(sent, kept, &child, paths);
            }
        }
        _ => {}
    }
}

/// What the API server made of slices the publisher wrote. The memory is the publisher's own: a
/// restarted process writes such a slice once more.
#[derive(Debug, Default)]
pub(crate) struct ServerEdits {
    /// Per slice name: the (normalised) spec sent and the spec the server kept, where they differ.
    kept: BTreeMap<String, (ResourceSliceSpec, ResourceSliceSpec)>,
    /// Dropped field paths already logged.
    logged: BTreeSet<String>,
}

impl ServerEdits {
    /// `desired` as the server would keep it, if its spec is one it changed before.
    pub(crate) fn as_kept(&self, desired: &ResourceSlice) -> ResourceSlice {
        let mut slice = desired.clone();
        if let Some((sent, kept)) = desired
            .metadata
            .name
            .as_ref()
            .and_then(|name| self.kept.get(name))
            && *sent == normalised(&desired.spec)
        {
            slice.spec = kept.clone();
        }
        slice
    }

    /// Forgets slice `name` (it was deleted).
    pub(crate) fn forget(&mut self, name: &str) {
        self.kept.remove(name);
    }

    /// Remembers what the server kept of the spec sent for slice `name`; returns the field paths
    /// it dropped, and logs those not logged before.
    pub(crate) fn record(
        &mut self,
        name: &str,
        sent: &ResourceSliceSpec,
        kept: &ResourceSliceSpec,
    ) -> BTreeSet<String> {
        let (sent, kept) = (normalised(sent), normalised(kept));
        if sent == kept {
            self.kept.remove(name);
            return BTreeSet::new();
        }
        let dropped = dropped_paths(&sent, &kept);
        for path in &dropped {
            if self.logged.insert(path.clone()) {
                tracing::warn!(
                    field = %path,
                    slice = %name,
                    "the API server dropped a ResourceSlice field it was sent; a feature gate is \
                     probably off on the cluster, so the devices are published without it"
                );
            }
        }
        self.kept.insert(name.to_owned(), (sent, kept));
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::same_content;

    fn spec(device: Value) -> ResourceSliceSpec {
        serde_json::from_value(serde_json::json!({
            "driver": "d.dev", "nodeName": "n",
            "pool": {"name": "n", "generation": 1, "resourceSliceCount": 1},
            "devices": [device],
        }))
        .unwrap()
    }

    #[test]
    fn dropped_paths_name_fields_not_values() {
        let sent = spec(serde_json::json!({
            "name": "a",
            "taints": [{"key": "k", "effect": "NoSchedule"}],
            "capacity": {"slots": {"value": "4", "requestPolicy": {"default": "1"}}},
        }));
        let kept = spec(serde_json::json!({
            "name": "a", "capacity": {"slots": {"value": "4"}},
        }));
        assert_eq!(
            dropped_paths(&sent, &kept).into_iter().collect::<Vec<_>>(),
            [
                "spec.devices[*].capacity[*].requestPolicy",
                "spec.devices[*].taints"
            ]
        );
        // A value the server filled in is no drop.
        assert!(dropped_paths(&kept, &sent).is_empty());
    }

    #[test]
    fn a_spec_the_server_changed_counts_as_kept_until_the_desired_one_changes() {
        let mut edits = ServerEdits::default();
        let mut desired = ResourceSlice {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("n-d.dev-0".into()),
                ..Default::default()
            },
            spec: spec(serde_json::json!({"name": "a", "bindsToNode": true})),
        };
        let mut kept = desired.clone();
        kept.spec.devices.as_mut().unwrap()[0].binds_to_node = None;
        let dropped = edits.record("n-d.dev-0", &desired.spec, &kept.spec);
        assert_eq!(
            dropped.into_iter().collect::<Vec<_>>(),
            ["spec.devices[*].bindsToNode"]
        );
        assert!(same_content(&kept, &edits.as_kept(&desired)));
        desired.spec.devices.as_mut().unwrap()[0].name = "other".into();
        assert!(!same_content(&kept, &edits.as_kept(&desired)));
        // A deleted slice is forgotten.
        desired.spec.devices.as_mut().unwrap()[0].name = "a".into();
        edits.forget("n-d.dev-0");
        assert!(!same_content(&kept, &edits.as_kept(&desired)));
    }
}
