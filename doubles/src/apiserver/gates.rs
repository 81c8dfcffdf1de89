//! Feature gates of the double, and the ResourceSlice fields kube-apiserver drops when their gate
//! is off.
//!
//! Each gate is on or off by default per Kubernetes minor version as upstream declares it
//! (`pkg/features/kube_features.go` `defaultVersionedKubernetesFeatureGates`), and a test may
//! override it ([`ApiServer::set_feature_gate`](super::ApiServer::set_feature_gate)). The minor
//! version is the one set with [`ApiServer::set_minor_version`](super::ApiServer::set_minor_version)
//! (1.34 until set).
//!
//! | gate | 1.34, 1.35 | 1.36, 1.37 |
//! |---|---|---|
//! | `DRADeviceTaints` | alpha, off | beta (GA in 1.37), on |
//! | `DRAPartitionableDevices` | alpha, off | beta, on |
//! | `DRADeviceBindingConditions` | alpha, off | beta, on |
//! | `DRAConsumableCapacity` | alpha, off | beta, on |
//! | `DRAResourceClaimDeviceStatus` | beta, on | beta (GA in 1.37), on |
//!
//! On ResourceSlice create, update and server-side apply the double does what
//! `pkg/registry/resource/resourceslice/strategy.go` `dropDisabledFields` does in
//! `PrepareForCreate` (no old object) and `PrepareForUpdate` (with the stored object): a gate's
//! fields are cleared unless the gate is on or the old object already uses one of them
//! (`dra*FeatureInUse`), so an update does not strip what an earlier server version kept.
//!
//! - `dropDisabledDRADeviceTaintsFields`: `spec.devices[].taints`.
//! - `dropDisabledDRAPartitionableDevicesFields`: `spec.sharedCounters`,
//!   `spec.perDeviceNodeSelection`, and per device `consumesCounters`, `nodeName`,
//!   `nodeSelector`, `allNodes`.
//! - `dropDisabledDRADeviceBindingConditionsFields` (needs `DRAResourceClaimDeviceStatus` as
//!   well): per device `bindingConditions`, `bindingFailureConditions`, `bindsToNode`.
//! - `dropDisabledDRAConsumableCapacityFields`: per device `allowMultipleAllocations` and
//!   `capacity[].requestPolicy`.
//!
//! Before that, as decoding does, a taint without `timeAdded` gets the current time
//! (`pkg/apis/resource/v1/defaults.go` `SetDefaults_DeviceTaint`).
//!
//! Not modelled: the 1.36+ alpha fields whose types k8s-openapi's `v1_34` does not have
//! (`DRANodeAllocatableResources`, `DRAListTypeAttributes`, `DRAResourcePoolStatus`); the double
//! cannot decode them, so it never stores them, whatever the gate.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::resource::v1::{Device, ResourceSlice};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The feature gates the double knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FeatureGate {
    /// `DRADeviceTaints`: `spec.devices[].taints`.
    DraDeviceTaints,
    /// `DRAPartitionableDevices`: shared counters and per-device node selection.
    DraPartitionableDevices,
    /// `DRADeviceBindingConditions`: binding conditions on devices.
    DraDeviceBindingConditions,
    /// `DRAConsumableCapacity`: `allowMultipleAllocations` and capacity request policies.
    DraConsumableCapacity,
    /// `DRAResourceClaimDeviceStatus`: `status.devices` of claims; binding conditions need it too.
    DraResourceClaimDeviceStatus,
}

impl FeatureGate {
    /// Every gate the double knows.
    pub const ALL: [Self; 5] = [
        Self::DraDeviceTaints,
        Self::DraPartitionableDevices,
        Self::DraDeviceBindingConditions,
        Self::DraConsumableCapacity,
        Self::DraResourceClaimDeviceStatus,
    ];

    /// The gate's name as `--feature-gates` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::DraDeviceTaints => "DRADeviceTaints",
            Self::DraPartitionableDevices => "DRAPartitionableDevices",
            Self::DraDeviceBindingConditions => "DRADeviceBindingConditions",
            Self::DraConsumableCapacity => "DRAConsumableCapacity",
            Self::DraResourceClaimDeviceStatus => "DRAResourceClaimDeviceStatus",
        }
    }

    /// Whether the gate is on by default in Kubernetes `1.<minor>` (`kube_features.go`).
    pub fn default_in(self, minor: u32) -> bool {
        match self {
            // Alpha (off) from 1.33 or 1.34, beta (on) from 1.36.
            Self::DraDeviceTaints
            | Self::DraPartitionableDevices
            | Self::DraDeviceBindingConditions
            | Self::DraConsumableCapacity => minor >= 36,
            // Beta (on) from 1.33.
            Self::DraResourceClaimDeviceStatus => minor >= 33,
        }
    }
}

impl fmt::Display for FeatureGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The gates a test set explicitly; the others follow the minor version.
#[derive(Debug, Default)]
pub(crate) struct FeatureGates {
    pub(crate) overrides: BTreeMap<FeatureGate, bool>,
}

impl FeatureGates {
    fn enabled(&self, gate: FeatureGate, minor: u32) -> bool {
        self.overrides
            .get(&gate)
            .copied()
            .unwrap_or_else(|| gate.default_in(minor))
    }
}

fn devices(slice: &ResourceSlice) -> impl Iterator<Item = &Device> {
    slice.spec.devices.iter().flatten()
}

fn devices_mut(slice: &mut ResourceSlice) -> impl Iterator<Item = &mut Device> {
    slice.spec.devices.iter_mut().flatten()
}

fn non_empty<T>(list: Option<&Vec<T>>) -> bool {
    list.is_some_and(|l| !l.is_empty())
}

/// `draDeviceTaintsFeatureInUse`.
fn taints_in_use(slice: &ResourceSlice) -> bool {
    devices(slice).any(|d| non_empty(d.taints.as_ref()))
}

/// `draPartitionableDevicesFeatureInUse`.
fn partitionable_in_use(slice: &ResourceSlice) -> bool {
    non_empty(slice.spec.shared_counters.as_ref())
        || slice.spec.per_device_node_selection.is_some()
        || devices(slice).any(|d| {
            non_empty(d.consumes_counters.as_ref())
                || d.node_name.is_some()
                || d.node_selector.is_some()
                || d.all_nodes.is_some()
        })
}

/// `draBindingConditionsFeatureInUse`.
fn binding_conditions_in_use(slice: &ResourceSlice) -> bool {
    devices(slice).any(|d| {
        non_empty(d.binding_conditions.as_ref())
            || non_empty(d.binding_failure_conditions.as_ref())
            || d.binds_to_node.is_some()
    })
}

/// `draConsumableCapacityFeatureInUse`.
fn consumable_capacity_in_use(slice: &ResourceSlice) -> bool {
    devices(slice).any(|d| {
        d.allow_multiple_allocations.is_some()
            || d.capacity
                .iter()
                .flatten()
                .any(|(_, c)| c.request_policy.is_some())
    })
}

/// `SetDefaults_DeviceTaint`: a taint without `timeAdded` was added `now`.
fn default_taint_times(slice: &mut ResourceSlice, now: Time) {
    for taint in devices_mut(slice).flat_map(|d| d.taints.iter_mut().flatten()) {
        if taint.time_added.is_none() {
            taint.time_added = Some(now.clone());
        }
    }
}

impl FeatureGates {
    /// Whether `gate` is on when serving Kubernetes `1.<minor>`: its override, else its default.
    pub(crate) fn gate(&self, minor: u32, gate: FeatureGate) -> bool {
        self.enabled(gate, minor)
    }

    /// Defaults a ResourceSlice to be created at `now` and drops the fields of gates disabled
    /// in `1.<minor>` (`PrepareForCreate`).
    pub(crate) fn prepare_slice_create(&self, minor: u32, now: Time, new: &mut ResourceSlice) {
        default_taint_times(new, now);
        self.drop_disabled_fields(minor, new, None);
    }

    /// Defaults the new version of a stored ResourceSlice and drops the fields of disabled gates
    /// that `old` does not use (`PrepareForUpdate`). Returns whether the spec changed, compared as
    /// `PrepareForUpdate` does before dropping (a write whose only change is then dropped still
    /// moves `generation`).
    pub(crate) fn prepare_slice_update(
        &self,
        minor: u32,
        now: Time,
        new: &mut ResourceSlice,
        old: &ResourceSlice,
    ) -> bool {
        default_taint_times(new, now);
        let spec_changed = new.spec != old.spec;
        self.drop_disabled_fields(minor, new, Some(old));
        spec_changed
    }

    /// `dropDisabledFields`.
    fn drop_disabled_fields(
        &self,
        minor: u32,
        new: &mut ResourceSlice,
        old: Option<&ResourceSlice>,
    ) {
        let in_use = |check: fn(&ResourceSlice) -> bool| old.is_some_and(check);

        if !self.gate(minor, FeatureGate::DraDeviceTaints) && !in_use(taints_in_use) {
            for device in devices_mut(new) {
                device.taints = None;
            }
        }
        if !self.gate(minor, FeatureGate::DraPartitionableDevices) && !in_use(partitionable_in_use)
        {
            new.spec.shared_counters = None;
            new.spec.per_device_node_selection = None;
            for device in devices_mut(new) {
                device.consumes_counters = None;
                device.node_name = None;
                device.node_selector = None;
                device.all_nodes = None;
            }
        }
        let binding_conditions = self.gate(minor, FeatureGate::DraDeviceBindingConditions)
            && self.gate(minor, FeatureGate::DraResourceClaimDeviceStatus);
        if !binding_conditions && !in_use(binding_conditions_in_use) {
            for device in devices_mut(new) {
                device.binding_conditions = None;
                device.binding_failure_conditions = None;
                device.binds_to_node = None;
            }
        }
        if !self.gate(minor, FeatureGate::DraConsumableCapacity)
            && !in_use(consumable_capacity_in_use)
        {
            for device in devices_mut(new) {
                device.allow_multiple_allocations = None;
                for capacity in device.capacity.iter_mut().flat_map(|c| c.values_mut()) {
                    capacity.request_policy = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
