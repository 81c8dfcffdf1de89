//! This driver's entries in `ResourceClaim.status.devices`: a `Ready` condition and the interface
//! name inside the pod (`networkData.interfaceName`), per prepared device.
//!
//! Written with server-side apply on the claim's `status` subresource, field manager = driver name,
//! `force`: the apply lists every entry this driver wants, so entries it listed before and no
//! longer lists are removed by the API server, and other drivers' entries are left alone. Clearing
//! on unprepare applies an empty list.

use std::fmt;

use k8s_openapi::Resource;
use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, NetworkDeviceData, ResourceClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::claims::ClaimRef;

/// The condition type written for a prepared device.
pub const READY: &str = "Ready";
/// The default reason of the `Ready` condition.
pub const REASON_PREPARED: &str = "MemberPrepared";

/// A device whose member is ready, as it should appear in the claim's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReady {
    /// The pool.
    pub pool: String,
    /// The device.
    pub device: String,
    /// The share ID, if the allocation has one.
    pub share_id: Option<String>,
    /// The interface name inside the pod.
    pub interface_name: String,
    /// The condition's reason (CamelCase).
    pub reason: String,
    /// The condition's message.
    pub message: String,
}

impl DeviceReady {
    /// A ready device with the default reason and a message naming the interface.
    pub fn new(
        pool: impl Into<String>,
        device: impl Into<String>,
        interface_name: impl Into<String>,
    ) -> Self {
        let interface_name = interface_name.into();
        Self {
            pool: pool.into(),
            device: device.into(),
            share_id: None,
            message: format!("CAN bus member prepared as {interface_name} in the pod"),
            interface_name,
            reason: REASON_PREPARED.to_owned(),
        }
    }
}

/// The status could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The API server refused or did not answer.
    #[error("claim {claim}: cannot {action} status.devices: {source}")]
    Api {
        /// `namespace/name`.
        claim: String,
        /// `read` or `write`.
        action: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

/// What [`StatusWriter::clear`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleared {
    /// Our entries were removed.
    Removed,
    /// There was nothing of ours to remove (or the claim is gone or was replaced).
    NothingToDo,
}

/// Writes this driver's `status.devices` entries.
#[derive(Clone)]
pub struct StatusWriter {
    client: Client,
    driver: String,
}

impl fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusWriter")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

/// The server-side apply body setting this driver's entries to `devices` (a pure function).
///
/// `previous` is the claim as last read: a `Ready=True` condition already there keeps its
/// `lastTransitionTime`, so repeating a prepare does not pretend the device changed state.
pub fn apply_body(
    driver: &str,
    claim: &ClaimRef,
    devices: &[DeviceReady],
    previous: Option<&ResourceClaim>,
    now: Timestamp,
) -> Value {
    let generation = previous.and_then(|c| c.metadata.generation);
    let entries: Vec<AllocatedDeviceStatus> = devices
        .iter()
        .map(|d| {
            let since = previous
                .and_then(|c| c.status.as_ref())
                .and_then(|s| s.devices.as_ref())
                .into_iter()
                .flatten()
                .find(|e| {
                    e.driver == driver
                        && e.pool == d.pool
                        && e.device == d.device
                        && e.share_id == d.share_id
                })
                .and_then(|e| e.conditions.as_ref())
                .into_iter()
                .flatten()
                .find(|c| c.type_ == READY && c.status == "True")
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            AllocatedDeviceStatus {
                driver: driver.to_owned(),
                pool: d.pool.clone(),
                device: d.device.clone(),
                share_id: d.share_id.clone(),
                conditions: Some(vec![Condition {
                    type_: READY.to_owned(),
                    status: "True".to_owned(),
                    reason: d.reason.clone(),
                    message: d.message.clone(),
                    last_transition_time: since,
                    observed_generation: generation,
                }]),
                network_data: Some(NetworkDeviceData {
                    interface_name: Some(d.interface_name.clone()),
                    ..NetworkDeviceData::default()
                }),
                data: None,
            }
        })
        .collect();
    json!({
        "apiVersion": ResourceClaim::API_VERSION,
        "kind": ResourceClaim::KIND,
        "metadata": { "name": claim.name, "namespace": claim.namespace },
        "status": { "devices": entries },
    })
}

impl StatusWriter {
    /// A writer for `driver` (also the field manager).
    pub fn new(client: Client, driver: impl Into<String>) -> Self {
        Self {
            client,
            driver: driver.into(),
        }
    }

    fn api(&self, claim: &ClaimRef) -> Api<ResourceClaim> {
        Api::namespaced(self.client.clone(), &claim.namespace)
    }

    fn params(&self) -> PatchParams {
        PatchParams::apply(&self.driver).force()
    }

    /// Sets this driver's entries of the claim to `devices`, all `Ready`.
    /// Pass the claim as read during prepare as `previous` to keep transition times.
    pub async fn mark_ready(
        &self,
        claim: &ClaimRef,
        devices: &[DeviceReady],
        previous: Option<&ResourceClaim>,
    ) -> Result<(), StatusError> {
        let body = apply_body(&self.driver, claim, devices, previous, Timestamp::now());
        self.api(claim)
            .patch_status(&claim.name, &self.params(), &Patch::Apply(&body))
            .await
            .map_err(|source| StatusError::Api {
                claim: crate::claims::label(claim),
                action: "write",
                source,
            })?;
        tracing::debug!(claim = %claim, devices = devices.len(), "claim status written");
        Ok(())
    }

    /// Removes this driver's entries from the claim. Idempotent: a claim that is gone, was
    /// replaced (another UID) or has no entries of ours is left alone without a write.
    pub async fn clear(&self, claim: &ClaimRef) -> Result<Cleared, StatusError> {
        let api = self.api(claim);
        let current = api
            .get_opt(&claim.name)
            .await
            .map_err(|source| StatusError::Api {
                claim: crate::claims::label(claim),
                action: "read",
                source,
            })?;
        let Some(current) = current else {
            return Ok(Cleared::NothingToDo);
        };
        let ours = current.metadata.uid.as_deref() == Some(claim.uid.as_str())
            && current
                .status
                .as_ref()
                .and_then(|s| s.devices.as_ref())
                .is_some_and(|d| d.iter().any(|e| e.driver == self.driver));
        if !ours {
            return Ok(Cleared::NothingToDo);
        }
        let body = apply_body(&self.driver, claim, &[], None, Timestamp::now());
        match api
            .patch_status(&claim.name, &self.params(), &Patch::Apply(&body))
            .await
        {
            Ok(_) => Ok(Cleared::Removed),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(Cleared::NothingToDo),
            Err(source) => Err(StatusError::Api {
                claim: crate::claims::label(claim),
                action: "write",
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim_ref() -> ClaimRef {
        ClaimRef {
            namespace: "ns".into(),
            uid: "u1".into(),
            name: "c".into(),
        }
    }

    #[test]
    fn body_carries_ready_condition_and_interface_name() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let body = apply_body(
            "can.dra.dev",
            &claim_ref(),
            &[DeviceReady::new("node-a", "can0-m1", "ecu0")],
            None,
            now,
        );
        let entry = &body["status"]["devices"][0];
        assert_eq!(entry["driver"], "can.dra.dev");
        assert_eq!(entry["device"], "can0-m1");
        assert_eq!(entry["networkData"]["interfaceName"], "ecu0");
        assert_eq!(entry["conditions"][0]["type"], "Ready");
        assert_eq!(entry["conditions"][0]["status"], "True");
        assert_eq!(entry["conditions"][0]["reason"], "MemberPrepared");
        assert_eq!(
            entry["conditions"][0]["lastTransitionTime"],
            "2027-01-15T08:00:00Z"
        );
        assert_eq!(body["metadata"]["name"], "c");
    }

    #[test]
    fn repeated_prepare_keeps_the_transition_time() {
        let first = Timestamp::from_second(1_800_000_000).unwrap();
        let later = Timestamp::from_second(1_800_000_500).unwrap();
        let devices = [DeviceReady::new("node-a", "can0-m1", "ecu0")];
        let body = apply_body("can.dra.dev", &claim_ref(), &devices, None, first);
        let previous: ResourceClaim = serde_json::from_value(json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": "c", "namespace": "ns", "generation": 3},
            "spec": {},
            "status": body["status"].clone(),
        }))
        .unwrap();
        let again = apply_body(
            "can.dra.dev",
            &claim_ref(),
            &devices,
            Some(&previous),
            later,
        );
        let condition = &again["status"]["devices"][0]["conditions"][0];
        assert_eq!(condition["lastTransitionTime"], "2027-01-15T08:00:00Z");
        assert_eq!(condition["observedGeneration"], 3);
    }
}
